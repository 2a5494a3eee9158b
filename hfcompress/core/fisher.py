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

__all__ = ["output_fisher"]


def output_fisher(
    model: nn.Module, windows: torch.Tensor, names: list[str], batch_size: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """`{name: F}`, `F` [out_features] the mean over every token of `windows` [n, seq_len] of the squared
    gradient, at the output of module `name`, of the log-likelihood of next tokens sampled from the model's own
    distributions (one draw per position, from a generator seeded with `seed`). One forward and one backward
    pass per batch; no gradient of any parameter is computed, and the model's parameters are left as they were."""
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: None for name in names}
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = 0

    def accumulate(name):
        def on_gradient(grad):
            squares = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(dim=0)
            sums[name] = squares if sums[name] is None else sums[name] + squares

        return on_gradient

    def watch(name):
        def hook(module, args, output):
            if not output.requires_grad:  # nothing before it needs a gradient
                output.requires_grad_(True)
            output.register_hook(accumulate(name))

        return hook

    requires = {p: p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(watch(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for p in requires:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in tqdm(windows.split(batch_size), desc="Fisher"):
                logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
                flat = logits.reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    probabilities = torch.softmax(flat, dim=-1).cpu()
                    drawn = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(device)
                F.cross_entropy(flat, drawn, reduction="sum").backward()
                tokens += flat.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    never = [name for name, total in sums.items() if total is None]
    if never:
        raise RuntimeError(f"{never} received no gradient: they do not reach the model's logits")
    return {name: total / tokens for name, total in sums.items()}
