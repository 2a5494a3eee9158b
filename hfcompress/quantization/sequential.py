"""The sequential GPTQ driver: one block at a time, each calibrated on the previous blocks' quantized outputs.

Only the current block's inputs (one hidden-state tensor per calibration batch) are held in memory.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from transformers.utils.logging import tqdm

from .capture import BlockInputs, capture_block_inputs, run_block
from .config import GPTQConfig
from .gptq import accumulate_hessian, gptq_quantize
from .modules import QuantLinear
from .structure import linear_weight, set_submodule

__all__ = ["quantize_blocks"]

logger = logging.getLogger(__name__)


class _HessianRecorder:
    """Forward hooks that fold each watched linear layer's inputs into its Hessian."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = []
        for name, module in modules.items():
            in_features = linear_weight(module).shape[1]
            device = module.weight.device
            self.hessians[name] = torch.zeros(in_features, in_features, device=device)
            self.counts[name] = 0
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            self.hessians[name], self.counts[name] = accumulate_hessian(args[0].detach(), self.hessians[name], self.counts[name])

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _groups_by_shared_input(block: nn.Module, modules: dict[str, nn.Module], sample: BlockInputs) -> list[list[str]]:
    """Linear layers grouped by the tensor they read (q/k/v together, then o, gate/up, down), in call order."""
    seen: dict[int, list[str]] = {}
    keepalive = []

    def hook(name):
        def fn(module, args):
            keepalive.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        run_block(block, [sample], keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    missing = [n for n in modules if not any(n in g for g in groups)]
    return groups + ([missing] if missing else [])


def _quantize_linears(model, names, modules, hessians, config: GPTQConfig, scale_dtype) -> None:
    for name in names:
        module = modules[name]
        start = time.perf_counter()
        quantized, loss = gptq_quantize(
            linear_weight(module).detach(),
            hessians[name],
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            act_order=config.act_order,
            static_groups=config.static_groups,
            damp_percent=config.damp_percent,
            block_size=config.block_size,
        )
        act_order = config.act_order and not config.static_groups
        layer = QuantLinear.from_quantized(quantized, config.group_size, config.sym, act_order, module.bias, scale_dtype)
        set_submodule(model, name, layer)
        logger.debug("%s: GPTQ loss %.4g in %.2fs", name, loss, time.perf_counter() - start)


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    config: GPTQConfig,
    scale_dtype: torch.dtype,
) -> set[str]:
    """Quantize every target inside `blocks` with GPTQ; returns the names it quantized."""
    block_names = {id(b): n for n, b in model.named_modules() if any(b is blk for blk in blocks)}
    inputs = capture_block_inputs(model, blocks[0], batches)
    done: set[str] = set()
    for block in tqdm(blocks, desc="GPTQ blocks"):
        prefix = block_names[id(block)] + "."
        modules = {n: m for n, m in targets.items() if n.startswith(prefix)}
        if config.true_sequential:
            groups = _groups_by_shared_input(block, modules, inputs[0])
        else:
            groups = [list(modules)]
        for names in groups:
            recorder = _HessianRecorder({n: modules[n] for n in names})
            try:
                run_block(block, inputs, keep_outputs=False)
            finally:
                recorder.remove()
            for name in names:
                if recorder.counts[name] == 0:
                    raise RuntimeError(f"{name} never ran during calibration; cannot build its Hessian")
            _quantize_linears(model, names, modules, recorder.hessians, config, scale_dtype)
            done.update(names)
        inputs = run_block(block, inputs)
    return done
