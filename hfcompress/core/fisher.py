"""The diagonal Fisher information of linear layers' outputs, from one backward pass.

For a small change δy of a layer's output, the KL divergence of the model's next-token distributions from its
own is, to second order, `½ δyᵀ F δy`, F being the Fisher information of that output: the expected outer
product of the gradient of the log-likelihood of tokens drawn from the model itself. Its diagonal, averaged
over the tokens (`F_r` per output channel `r`), turns a layer's mean squared output error `e_r` into the mean
KL divergence it costs: `½ Σ_r F_r e_r` (the estimate ModelOpt's and HAWQ's sensitivities build on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm

__all__ = ["OutputGradients", "output_fisher", "sampled_log_likelihood"]


def output_fisher(
    model: nn.Module, windows: torch.Tensor, names: list[str], batch_size: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """`{name: F}`, `F` [out_features] the mean over every token of `windows` [n, seq_len] of the squared
    gradient, at the output of module `name`, of the log-likelihood of next tokens sampled from the model's own
    distributions (one draw per position, from a generator seeded with `seed`). One forward and one backward
    pass per batch; no gradient of any parameter is computed, and the model's parameters are left as they were.
    `core.streamed_fisher.streamed_output_fisher` computes the same from a checkpoint, a block at a time."""
    sums = OutputGradients(names)
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    requires = {p: p.requires_grad for p in model.parameters()}
    handles = sums.watch({name: model.get_submodule(name) for name in names})
    was_training = model.training
    model.eval()
    try:
        for p in requires:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in tqdm(windows.split(batch_size), desc="Fisher"):
                logits = model(input_ids=batch.to(device), use_cache=False).logits
                sampled_log_likelihood(logits, generator).backward()
                sums.tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return sums.means()


def sampled_log_likelihood(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The summed cross-entropy of `logits` [..., vocab] against one next token per position drawn from their own
    softmax by `generator` (on the CPU, so draws do not depend on the device): its gradient is the score whose
    mean square is the Fisher information."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probabilities = torch.softmax(flat, dim=-1).cpu()
        drawn = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(flat.device)
    return F.cross_entropy(flat, drawn, reduction="sum")


class OutputGradients:
    """The squared gradients at the outputs of the modules `names`, summed per output channel over every token
    that passed while they were watched; `tokens` is counted by the caller."""

    def __init__(self, names: list[str]):
        self.sums: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        self.tokens = 0

    def watch(self, modules: dict[str, nn.Module]) -> list:
        """Hooks (to remove) that add the gradient at each module's output, whether or not anything before it
        needs a gradient."""

        def accumulate(name):
            def on_gradient(grad):
                squares = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(dim=0)
                self.sums[name] = squares if self.sums[name] is None else self.sums[name] + squares

            return on_gradient

        def hook(name):
            def watch_output(module, args, output):
                if not output.requires_grad:  # nothing before it needs a gradient
                    output.requires_grad_(True)
                output.register_hook(accumulate(name))

            return watch_output

        return [module.register_forward_hook(hook(name)) for name, module in modules.items()]

    def means(self) -> dict[str, torch.Tensor]:
        never = [name for name, total in self.sums.items() if total is None]
        if never:
            raise RuntimeError(f"{never} received no gradient: they do not reach the model's logits")
        return {name: total / self.tokens for name, total in self.sums.items()}
