"""Convolutions made cheaper: Tucker-2 decomposition (1x1 -> kxk -> 1x1) and depthwise-separable pairs.

Pure tensor functions first, then the modules they produce and `decompose_convolutions`, which replaces the
`Conv2d` layers of a model (ResNet, ConvNeXt, ... in transformers) in place. Both change the architecture
and lose accuracy on their own: follow them with distillation (the original model as teacher) to recover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..checkpoint import update_manifest
from ..core.config import CompressionConfig
from ..core.structure import is_excluded, set_submodule

__all__ = [
    "ConvDecompositionConfig",
    "SeparableConv2d",
    "Tucker2Conv2d",
    "decompose_convolutions",
    "separable_factors",
    "tucker2_factors",
]

logger = logging.getLogger(__name__)


def _leading_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank]


def tucker2_factors(
    W: torch.Tensor, rank_in: int, rank_out: int, iterations: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 decomposition of a convolution weight `W` [out, in, kh, kw] along its channel modes:
    `W ~ core x_0 U_out x_1 U_in` with `U_in` [in, rank_in], `U_out` [out, rank_out] (orthonormal columns) and
    `core` [rank_out, rank_in, kh, kw]. Starts from the truncated HOSVD and refines by alternating (HOOI)."""
    out_channels, in_channels = W.shape[:2]
    if not 0 < rank_in <= in_channels or not 0 < rank_out <= out_channels:
        raise ValueError(
            f"Tucker ranks must be in [1, {in_channels}] (input) and [1, {out_channels}] (output), got {rank_in}, {rank_out}"
        )
    W = W.detach().double()
    U_in = _leading_vectors(W.transpose(0, 1).reshape(in_channels, -1), rank_in)
    U_out = _leading_vectors(W.reshape(out_channels, -1), rank_out)
    for _ in range(iterations):
        U_out = _leading_vectors(torch.einsum("oikl,is->oskl", W, U_in).reshape(out_channels, -1), rank_out)
        U_in = _leading_vectors(
            torch.einsum("oikl,or->rikl", W, U_out).transpose(0, 1).reshape(in_channels, -1), rank_in
        )
    core = torch.einsum("oikl,or,is->rskl", W, U_out, U_in)
    return U_in, core, U_out


def separable_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise [in, 1, kh, kw] and pointwise [out, in] weights closest to `W` [out, in, kh, kw] in
    Frobenius norm: for each input channel, the best rank-1 approximation of its [out, kh*kw] slice."""
    out_channels, in_channels, kh, kw = W.shape
    slices = W.detach().double().transpose(0, 1).reshape(in_channels, out_channels, kh * kw)
    U, S, Vh = torch.linalg.svd(slices, full_matrices=False)
    root = S[:, 0].sqrt()
    pointwise = (U[:, :, 0] * root[:, None]).T  # [out, in]
    depthwise = (Vh[:, 0, :] * root[:, None]).reshape(in_channels, 1, kh, kw)
    return depthwise, pointwise


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """A convolution with `conv`'s kernel, stride, padding and dilation between other channel counts."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=False,
        padding_mode=conv.padding_mode,
        dtype=conv.weight.dtype,
        device=conv.weight.device,
    )


class _Placeholder(nn.Module):
    """An empty `weight` saved with the replacement so transformers without hfcompress refuses the checkpoint
    on a shape mismatch instead of initializing the missing dense kernel at random."""

    def __init__(self, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device))


class Tucker2Conv2d(_Placeholder):
    """`first` (1x1, in -> rank_in), `core` (the original kernel, rank_in -> rank_out), `last` (1x1, rank_out
    -> out, with the bias)."""

    def __init__(self, conv: nn.Conv2d, rank_in: int, rank_out: int):
        super().__init__(conv.weight.dtype, conv.weight.device)
        self.in_channels, self.out_channels, self.ranks = conv.in_channels, conv.out_channels, (rank_in, rank_out)
        kwargs = {"dtype": conv.weight.dtype, "device": conv.weight.device}
        self.first = nn.Conv2d(conv.in_channels, rank_in, 1, bias=False, **kwargs)
        self.core = _conv_like(conv, rank_in, rank_out)
        self.last = nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None, **kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank_in: int, rank_out: int) -> Tucker2Conv2d:
        layer = cls(conv, rank_in, rank_out)
        U_in, core, U_out = tucker2_factors(conv.weight, rank_in, rank_out)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(U_in.T[:, :, None, None].to(dtype))
            layer.core.weight.copy_(core.to(dtype))
            layer.last.weight.copy_(U_out[:, :, None, None].to(dtype))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


class SeparableConv2d(_Placeholder):
    """`depthwise` (the original kernel, one filter per input channel) then `pointwise` (1x1, with the bias)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight.dtype, conv.weight.device)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.depthwise = _conv_like(conv, conv.in_channels, conv.in_channels, groups=conv.in_channels)
        self.pointwise = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            1,
            bias=conv.bias is not None,
            dtype=conv.weight.dtype,
            device=conv.weight.device,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SeparableConv2d:
        layer = cls(conv)
        depthwise, pointwise = separable_factors(conv.weight)
        with torch.no_grad():
            layer.depthwise.weight.copy_(depthwise.to(conv.weight.dtype))
            layer.pointwise.weight.copy_(pointwise[:, :, None, None].to(conv.weight.dtype))
            if conv.bias is not None:
                layer.pointwise.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@dataclass
class ConvDecompositionConfig(CompressionConfig):
    """Which `Conv2d` layers (groups 1, kernel larger than 1x1) to decompose, and how."""

    technique: ClassVar[str] = "convolutions"

    method: Literal["tucker2", "separable"] = field(
        default="tucker2",
        metadata={"help": "tucker2: 1x1 -> kxk -> 1x1 with fewer channels inside. separable: depthwise kxk then 1x1."},
    )
    rank_ratio: float = field(
        default=0.5, metadata={"help": "tucker2: fraction of the input and output channels kept inside, in (0, 1]."}
    )
    modules_to_not_convert: list[str] = field(
        default_factory=list, metadata={"help": "Module names (or suffixes, or 're:' regexes) left as they are."}
    )

    def __post_init__(self):
        if self.method not in ("tucker2", "separable"):
            raise ValueError(f"`method` must be 'tucker2' or 'separable', got {self.method!r}")
        if not 0 < self.rank_ratio <= 1:
            raise ValueError(f"`rank_ratio` must be in (0, 1], got {self.rank_ratio!r}")


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decompose_convolutions(model: nn.Module, config: ConvDecompositionConfig) -> nn.Module:
    """Replace every eligible `Conv2d` of `model` in place where the replacement has fewer parameters; record
    them in the model's hfcompress config so `save_pretrained`/`from_pretrained` rebuild them."""
    if not isinstance(config, ConvDecompositionConfig):
        raise TypeError(f"`config` must be a ConvDecompositionConfig, got {type(config).__name__}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("the model is already compressed by hfcompress or quantized; decompose the original model")
    done: dict[str, dict] = {}
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d and module.groups == 1 and module.kernel_size != (1, 1)
    ]
    for name, conv in candidates:
        if is_excluded(name, config.modules_to_not_convert):
            continue
        if config.method == "tucker2":
            rank_in = max(1, round(config.rank_ratio * conv.in_channels))
            rank_out = max(1, round(config.rank_ratio * conv.out_channels))
            replacement = Tucker2Conv2d.from_conv(conv, rank_in, rank_out)
            record = {"kind": "tucker2", "ranks": [rank_in, rank_out]}
        else:
            replacement = SeparableConv2d.from_conv(conv)
            record = {"kind": "separable"}
        if _parameters(replacement) >= _parameters(conv):
            logger.info("%s stays as it is: the %s replacement would not be smaller", name, config.method)
            continue
        set_submodule(model, name, replacement)
        done[name] = record
    if not done:
        raise ValueError(
            f"no Conv2d layer of {type(model).__name__} gets smaller with {config.method} at these settings"
        )
    logger.info("decomposed %d convolutions with %s", len(done), config.method)
    _attach(model, config, done)
    return model


def rebuild_convolution(model: nn.Module, name: str, record: dict) -> None:
    """Swap the `Conv2d` at `name` for the (uninitialized) replacement `record` describes, before loading."""
    conv = model.get_submodule(name)
    if type(conv) is not nn.Conv2d:
        raise ValueError(f"the checkpoint decomposes {name!r}, a {type(conv).__name__}, not a Conv2d")
    if record.get("kind") == "tucker2":
        set_submodule(model, name, Tucker2Conv2d(conv, *record["ranks"]))
    elif record.get("kind") == "separable":
        set_submodule(model, name, SeparableConv2d(conv))
    else:
        raise ValueError(f"the checkpoint decomposes {name!r} with unknown kind {record.get('kind')!r}")


def _attach(model: nn.Module, config: ConvDecompositionConfig, done: dict[str, dict]) -> None:
    update_manifest(model, "none", convolutions=done, lowrank_recipe=config.to_dict())
