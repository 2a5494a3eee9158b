"""A toy technique defined outside hfcompress, the way a third-party package adds one: a config, an apply
function, a layer that declares what it stores, a rebuilder and one registration each.

Per-row absmax int8: every linear layer (except the output embedding) keeps int8 codes and one scale per
output row. Not useful next to GPTQ; small enough to read in one go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from hfcompress import CompressionConfig, register_technique
from hfcompress.checkpoint import linear_to_replace, register_rebuilder, update_manifest
from hfcompress.core.structure import candidate_linears, linear_weight, set_submodule


@dataclass
class ToyConfig(CompressionConfig):
    """Per-row absmax int8 codes."""

    technique: ClassVar[str] = "toy"

    clip: float = field(default=1.0, metadata={"help": "Fraction of each row's absolute maximum the grid spans."})
    modules_to_not_convert: list[str] | None = field(default=None, metadata={"help": "Layers left as they are."})

    def __post_init__(self):
        if not 0 < self.clip <= 1:
            raise ValueError(f"`clip` must be in (0, 1], got {self.clip!r}")


class ToyLinear(nn.Module):
    STORED_TENSORS = ("weight", "weight_scale")
    KEEPS_DTYPE = True

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, clip: float) -> ToyLinear:
        W = linear_weight(linear).detach().float()
        layer = cls(W.shape[1], W.shape[0], linear.bias is not None, linear.weight.dtype, W.device)
        scale = (W.abs().amax(dim=1, keepdim=True) * clip / 127).clamp(min=1e-12)
        layer.weight.copy_(torch.clamp(torch.round(W / scale), -127, 127).to(torch.int8))
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x):
        W = (self.weight.float() * self.weight_scale).to(x.dtype)
        return nn.functional.linear(x, W, self.bias)


def toy_quantize(model: nn.Module, config: ToyConfig, tokenizer=None) -> nn.Module:
    targets = candidate_linears(model, config.modules_to_not_convert)
    for name, module in targets.items():
        set_submodule(model, name, ToyLinear.from_linear(module, config.clip))
    update_manifest(model, "toy", layers={"toy": {name: {"clip": config.clip} for name in targets}})
    return model


def rebuild_toy(model: nn.Module, manifest) -> None:
    for name in manifest.section("toy"):
        module = linear_to_replace(model, name, "stores as toy int8")
        out_features, in_features = linear_weight(module).shape
        layer = ToyLinear(in_features, out_features, module.bias is not None, module.weight.dtype, module.weight.device)
        set_submodule(model, name, layer)


register_rebuilder("toy", rebuild_toy, order=70)
register_technique("toy", ToyConfig, toy_quantize, kind="quantize", layer_types=(ToyLinear,), summary="Toy int8.")
