"""Structured pruning: remove attention heads and FFN neurons for real (smaller `Linear` layers, config updated).

Every block keeps the same number of heads and of FFN neurons, because transformers configs describe one
`num_attention_heads` / `intermediate_size` for all layers. Llama-style decoders then load with plain
`from_pretrained` (`head_dim` is written explicitly; with grouped-query attention whole key/value groups go,
with their query heads). BERT-style encoders derive the head size from `hidden_size / num_attention_heads`,
which no config value can shrink: their smaller attention is recorded in `quantization_config.resized` and
rebuilt by `import hfcompress` before the weights load; FFN-only pruning loads with plain transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import update_manifest
from ..core.structure import find_layer_stack

__all__ = [
    "Attention",
    "FeedForward",
    "attention_of",
    "feed_forward_of",
    "keep_top_units",
    "prune_units",
    "remove_dead_structure",
]

logger = logging.getLogger(__name__)


@dataclass
class FeedForward:
    """An FFN: `inputs` produce the neurons (rows), `output` reads them (columns)."""

    owner: nn.Module
    input_names: list[str]
    output_name: str

    @property
    def inputs(self) -> list[nn.Linear]:
        return [getattr(self.owner, n) for n in self.input_names]

    @property
    def output(self) -> nn.Linear:
        return getattr(self.owner, self.output_name)

    @property
    def size(self) -> int:
        return self.output.in_features

    def unit_rows(self) -> list[tuple[nn.Linear, int]]:
        """Linears whose rows come in units (with rows per unit)."""
        return [(layer, 1) for layer in self.inputs]

    def unit_columns(self) -> list[tuple[nn.Linear, int]]:
        return [(self.output, 1)]


@dataclass
class Attention:
    """Attention heads as units of removal: one unit is a key/value head with the query heads that share it."""

    module: nn.Module  # holds q, k, v (and o for Llama)
    q: str
    k: str
    v: str
    o_owner: nn.Module
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str

    @property
    def size(self) -> int:
        return self.num_kv_heads

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def unit_rows(self) -> list[tuple[nn.Linear, int]]:
        m = self.module
        return [
            (getattr(m, self.q), self.group * self.head_dim),
            (getattr(m, self.k), self.head_dim),
            (getattr(m, self.v), self.head_dim),
        ]

    def unit_columns(self) -> list[tuple[nn.Linear, int]]:
        return [(getattr(self.o_owner, self.o), self.group * self.head_dim)]


def feed_forward_of(block: nn.Module) -> FeedForward | None:
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "down_proj"):
        inputs = [n for n in ("gate_proj", "up_proj") if isinstance(getattr(mlp, n, None), nn.Linear)]
        return FeedForward(mlp, inputs, "down_proj")
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    if intermediate is not None and isinstance(getattr(output, "dense", None), nn.Linear):
        return _BertFeedForward(block)
    return None


class _BertFeedForward(FeedForward):
    def __init__(self, block: nn.Module):
        super().__init__(block, ["intermediate"], "output")

    @property
    def inputs(self) -> list[nn.Linear]:
        return [self.owner.intermediate.dense]

    @property
    def output(self) -> nn.Linear:
        return self.owner.output.dense


def attention_of(block: nn.Module, config) -> Attention | None:
    attn = getattr(block, "self_attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        head_dim = attn.head_dim
        num_heads = attn.q_proj.out_features // head_dim
        num_kv = attn.k_proj.out_features // head_dim
        return Attention(attn, "q_proj", "k_proj", "v_proj", attn, "o_proj", num_heads, num_kv, head_dim, "llama")
    attention = getattr(block, "attention", None)
    if attention is not None and hasattr(attention, "self") and hasattr(attention.self, "query"):
        s = attention.self
        return Attention(
            s, "query", "key", "value", attention.output, "dense",
            s.num_attention_heads, s.num_attention_heads, s.attention_head_size, "bert",
        )  # fmt: skip
    return None


def _unit_index(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def _shrunk(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if dim == 1 else layer.bias.detach()[index.to(layer.bias.device)])
    new.requires_grad_(layer.weight.requires_grad)
    return new


def _replace(owner: nn.Module, old: nn.Linear, new: nn.Linear) -> None:
    for name, child in owner.named_modules():
        if child is old:
            parent_name, _, attr = name.rpartition(".")
            setattr(owner.get_submodule(parent_name) if parent_name else owner, attr, new)
            return
    raise ValueError("layer to replace not found")


def prune_units(part: FeedForward | Attention, keep: torch.Tensor) -> None:
    """Keep only units `keep` (sorted indices) of an FFN or attention, replacing its linear layers."""
    keep = keep.sort().values
    owner = part.owner if isinstance(part, FeedForward) else part.module
    for layer, width in part.unit_rows():
        _replace(owner, layer, _shrunk(layer, _unit_index(keep, width), 0))
    col_owner = part.owner if isinstance(part, FeedForward) else part.o_owner
    for layer, width in part.unit_columns():
        _replace(col_owner, layer, _shrunk(layer, _unit_index(keep, width), 1))
    if isinstance(part, Attention):
        kept_heads = len(keep) * part.group
        if part.family == "bert":
            part.module.num_attention_heads = kept_heads
            part.module.all_head_size = kept_heads * part.head_dim
        part.num_heads, part.num_kv_heads = kept_heads, len(keep)


def keep_top_units(importance: torch.Tensor, count: int) -> torch.Tensor:
    return torch.topk(importance.float(), count, sorted=False).indices


def _blocks(model: nn.Module) -> list[nn.Module]:
    _, stack = find_layer_stack(model)
    return list(stack)


def unit_norms(part: FeedForward | Attention) -> torch.Tensor:
    """Per unit, the squared L2 norm of every weight and bias that belongs to it alone."""
    total = torch.zeros(part.size)
    for layer, width in part.unit_rows():
        w = layer.weight.detach().float().reshape(part.size, width, -1).pow(2).sum(dim=(1, 2))
        if layer.bias is not None:
            w = w + layer.bias.detach().float().reshape(part.size, width).pow(2).sum(dim=1)
        total += w.cpu()
    for layer, width in part.unit_columns():
        total += (
            layer.weight.detach().float().reshape(layer.out_features, part.size, width).pow(2).sum(dim=(0, 2)).cpu()
        )
    return total


def _dead_units(part: FeedForward | Attention) -> torch.Tensor:
    """Units whose removal cannot change the output: nothing read from them (output columns all zero), or
    nothing written to them (every input row and bias zero, and activations map 0 to 0; for attention, the
    value rows: a weighted sum of zero values is zero)."""
    columns = torch.zeros(part.size)
    for layer, width in part.unit_columns():
        columns += (
            layer.weight.detach().float().reshape(layer.out_features, part.size, width).abs().sum(dim=(0, 2)).cpu()
        )
    rows_of = part.unit_rows() if isinstance(part, FeedForward) else part.unit_rows()[2:]
    rows = torch.zeros(part.size)
    for layer, width in rows_of:
        rows += layer.weight.detach().float().reshape(part.size, width, -1).abs().sum(dim=(1, 2)).cpu()
        if layer.bias is not None:
            rows += layer.bias.detach().float().reshape(part.size, width).abs().sum(dim=1).cpu()
    return (columns == 0) | (rows == 0)


def apply_uniform_removal(model: nn.Module, ffn_keep: list[torch.Tensor] | None, head_keep: list[torch.Tensor] | None):
    """Remove units from every block (the same count in each) and update the config so the model reloads (a
    vision-language model's text config, which its language model is built from)."""
    config = model.config.get_text_config()
    blocks = _blocks(model)
    if ffn_keep is not None:
        for block, keep in zip(blocks, ffn_keep, strict=True):
            prune_units(feed_forward_of(block), keep)
        config.intermediate_size = len(ffn_keep[0])
    if head_keep is not None:
        attentions = [attention_of(block, config) for block in blocks]
        family, group, head_dim = attentions[0].family, attentions[0].group, attentions[0].head_dim
        for part, keep in zip(attentions, head_keep, strict=True):
            prune_units(part, keep)
        if family == "llama":
            config.head_dim = head_dim
            config.num_key_value_heads = len(head_keep[0])
            config.num_attention_heads = len(head_keep[0]) * group
        else:
            _record_resized_attention(model, attentions)


def _record_resized_attention(model: nn.Module, attentions: list[Attention]) -> None:
    resized = {"linears": {}, "attributes": {}}
    names = {module: name for name, module in model.named_modules()}
    for part in attentions:
        for layer, _ in part.unit_rows() + part.unit_columns():
            resized["linears"][names[layer]] = [layer.out_features, layer.in_features]
        resized["attributes"][names[part.module]] = {
            "num_attention_heads": part.num_heads,
            "all_head_size": part.num_heads * part.head_dim,
        }
    update_manifest(model, "structured-pruning", resized=resized)


def remove_dead_structure(model: nn.Module) -> dict[str, int]:
    """Remove FFN neurons and heads that are entirely pruned. Every block keeps as many as the block that
    keeps most (padding with dead units, which are exact zeros). Returns the removed counts."""
    blocks = _blocks(model)
    removed = {}
    for kind, finder in (("ffn", feed_forward_of), ("heads", lambda b: attention_of(b, model.config))):
        parts = [finder(block) for block in blocks]
        if any(p is None for p in parts):
            continue
        dead = [_dead_units(p) for p in parts]
        keep_count = max(int((~d).sum()) for d in dead)
        if keep_count == parts[0].size or keep_count == 0:
            continue
        # alive units first, then the dead ones of largest norm as padding
        keep = [
            keep_top_units((~d).float() * 1e30 + unit_norms(p), keep_count) for d, p in zip(dead, parts, strict=True)
        ]
        if kind == "ffn":
            apply_uniform_removal(model, keep, None)
        else:
            apply_uniform_removal(model, None, keep)
        removed[kind] = dead[0].numel() - keep_count
        logger.info("removed dead %s: %d of %d per block remain", kind, keep_count, dead[0].numel())
    return removed
