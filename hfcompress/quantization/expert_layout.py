"""Where the experts of a mixture-of-experts model go in a checkpoint other libraries read: one linear per expert
and projection under the model's original names (`<experts>.3.w1`, `<experts>.3.gate_proj`), the layout that
transformers merges into its fused 3-D experts while loading (its conversion mapping) and that vLLM reads.
hfcompress holds those experts as `ExpertLinears` (`<experts>.gate_up_proj.3`, gate and up stacked by rows)."""

from __future__ import annotations

import re

import torch.nn as nn
from transformers.conversion_mapping import get_model_conversion_mapping

from ..core.experts import expert_modules, is_fused_experts
from ..core.stored_layout import SavedNames

__all__ = ["expert_checkpoint_names", "plain_expert_patterns", "split_rows"]

_PER_EXPERT_SOURCE = re.compile(r".*experts\.\*\.(\w+)\.weight")
# what transformers does to per-expert tensors to build a fused one: stack the experts (dim 0), then, for several
# sources (gate and up), concatenate them along the rows of each expert (dim 1 of the stack)
_STACK_ONLY = [("MergeModulelist", 0)]
_STACK_THEN_ROWS = [("MergeModulelist", 0), ("Concatenate", 1)]


def expert_checkpoint_names(model: nn.Module) -> dict[str, list[str]]:
    """Each linear of the model's `ExpertLinears` (`<experts>.gate_up_proj.3`) and the checkpoint names of its rows,
    split into equal parts in order (`[<experts>.3.w1, <experts>.3.w3]`); {} without held experts. A ValueError
    where the model's conversion mapping gives no per-expert layout (GPT-OSS's checkpoints store the fused
    tensors themselves)."""
    held = expert_modules(model)
    if not held:
        return {}
    converters = _converters(model)
    names = {}
    for prefix, experts in held.items():
        for projection in ("gate_up_proj", "up_proj", "down_proj"):
            if not hasattr(experts, projection):
                continue
            leaves = _per_expert_leaves(converters, projection)
            if leaves is None:
                raise ValueError(
                    f"{type(model).__name__} has no per-expert checkpoint layout for {prefix}.{projection} (transformers "
                    "stores its experts fused), so a compressed-tensors checkpoint cannot hold its quantized experts; "
                    "save with --format hfcompress"
                )
            for e in range(experts.num_experts):
                names[f"{prefix}.{projection}.{e}"] = [f"{prefix}.{e}.{leaf}" for leaf in leaves]
    return names


def plain_expert_patterns(model: nn.Module) -> dict[str, bool]:
    """One `re:` pattern per fused experts module of `model` (experts no technique compressed) matching the names
    of its per-expert linears as the checkpoint stores them (Mixtral's `model.layers.0.block_sparse_moe.experts.3.w1`,
    `save_pretrained`'s renaming included), for compressed-tensors' `ignore`: vLLM takes such experts as plain
    only when their names are ignored (it looks up expert 0's). Experts stored fused (GPT-OSS's
    `model.layers.0.mlp.experts.gate_up_proj`) have no per-expert linears to name: their pattern matches any name
    under an expert's index (`...experts.0.gate_proj`, the names vLLM looks up for them), which nothing stored has.
    Gives each pattern with whether its experts are stored one per expert (False: stored fused)."""
    fused = {name: module for name, module in model.named_modules() if is_fused_experts(module)}
    if not fused:
        return {}
    converters = _converters(model)
    saved = SavedNames.of(model)
    patterns = {}
    for prefix, experts in fused.items():
        projections = [p for p in ("gate_up_proj", "up_proj", "down_proj") if hasattr(experts, p)]
        leaves = [_per_expert_leaves(converters, projection) for projection in projections]
        stored = prefix if saved is None else saved.saved_module(prefix)
        if not leaves or any(found is None for found in leaves):  # stored fused
            patterns[rf"re:^{re.escape(stored)}\.\d+\.[^.]+$"] = False
            continue
        names = "|".join(leaf for found in leaves for leaf in found)
        patterns[rf"re:^{re.escape(stored)}\.\d+\.({names})$"] = True
    return patterns


def _converters(model: nn.Module) -> list:
    """The tensor conversions of the model's conversion mapping, as `save_pretrained` takes it."""
    return [c for c in get_model_conversion_mapping(model, add_legacy=False) if type(c).__name__ == "WeightConverter"]


def _per_expert_leaves(converters, projection: str) -> list[str] | None:
    """The per-expert linears' names (`["w1", "w3"]`) that transformers' converter builds the fused `projection`
    from, or None where none does so by stacking and row concatenation alone."""
    for converter in converters:
        targets = converter.target_patterns
        if len(targets) != 1 or not targets[0].endswith(f"experts.{projection}"):
            continue
        operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
        expected = _STACK_ONLY if len(converter.source_patterns) == 1 else _STACK_THEN_ROWS
        matches = [_PER_EXPERT_SOURCE.fullmatch(source) for source in converter.source_patterns]
        if operations != expected or not all(matches):
            return None
        return [match.group(1) for match in matches]
    return None


def split_rows(tensors: dict[str, object], parts: list[str]) -> dict[str, object]:
    """A linear's compressed-tensors tensors ({leaf: tensor}, rows first) as `len(parts)` linears' tensors, under
    `{part}.{leaf}`; `weight_shape` ([out, in]) is each part's."""
    split = {}
    for leaf, tensor in tensors.items():
        if leaf == "weight_shape":
            out_features, in_features = (int(v) for v in tensor)
            pieces = [tensor.new_tensor([out_features // len(parts), in_features]) for _ in parts]  # not shared
        else:
            pieces = [piece.contiguous() for piece in tensor.chunk(len(parts), dim=0)]
        split.update({f"{part}.{leaf}": piece for part, piece in zip(parts, pieces, strict=True)})
    return split
