"""What a compression covered: every weight matrix of a model, compressed or left out with its reason, so no
layer is skipped silently (a mixture-of-experts model whose fused 3-D expert weights no technique handles yet,
say). `coverage` is a pure walk over the model; `check_coverage` logs it and refuses a run that left a large
share of the linear-like weights in full precision without being asked to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .registry import compressed_layer_types
from .structure import LINEAR_TYPES, is_excluded, is_router, task_head, vision_modules

__all__ = ["Coverage", "check_coverage", "coverage"]

logger = logging.getLogger(__name__)

# left out on purpose: full precision by design, not by omission
INTENDED = ("embedding", "output embedding", "task head", "router", "modules_to_not_convert", "vision tower")
# the share of linear-like weights that may stay uncompressed unintentionally before a run is refused
MAX_UNINTENDED_SHARE = 0.25


@dataclass
class Coverage:
    """`compressed`: {layer class: [layers, weights]}; `left_out`: [(name, weights, reason)] of every weight
    matrix (2-D or more) left in full precision; `unintended`: weights left out for no chosen reason;
    `experts`: for each mixture-of-experts layer, the calibration tokens each expert saw (`core.experts`)."""

    compressed: dict[str, list[int]] = field(default_factory=dict)
    left_out: list[tuple[str, int, str]] = field(default_factory=list)
    experts: dict[str, dict] = field(default_factory=dict)

    @property
    def compressed_weights(self) -> int:
        return sum(weights for _, weights in self.compressed.values())

    @property
    def unintended(self) -> int:
        return sum(weights for _, weights, reason in self.left_out if not reason.startswith(INTENDED))

    @property
    def unintended_share(self) -> float:
        linear_like = self.compressed_weights + self.unintended
        return self.unintended / linear_like if linear_like else 0.0

    def summary(self) -> dict:
        """For the compression record: counts per compressed class, and each reason with its layers and weights."""
        reasons: dict[str, list[int]] = {}
        for _, weights, reason in self.left_out:
            entry = reasons.setdefault(reason, [0, 0])
            entry[0] += 1
            entry[1] += weights
        summary = {
            "compressed": {cls: {"layers": n, "weights": w} for cls, (n, w) in self.compressed.items()},
            "left_out": {reason: {"tensors": n, "weights": w} for reason, (n, w) in sorted(reasons.items())},
        }
        if self.experts:
            summary["experts"] = self.experts
        return summary

    def describe(self) -> str:
        total = self.compressed_weights + sum(w for _, w, _ in self.left_out)
        parts = [f"{n} {cls} ({w:,} weights)" for cls, (n, w) in self.compressed.items()]
        text = f"compressed {', '.join(parts) or 'nothing'}: {self.compressed_weights:,} of {total:,} matrix weights"
        for reason, entry in self.summary()["left_out"].items():
            text += f"; left out: {entry['tensors']} x {reason} ({entry['weights']:,})"
        return text


def _is_bitsandbytes(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def coverage(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> Coverage:
    """Every weight matrix of `model`: in a compressed layer (a registered compressed class or bitsandbytes), or
    left out with its reason (embedding, output embedding, task head, router, modules_to_not_convert, a linear
    layer the technique did not take, or a type no technique handles: e.g. fused 3-D expert weights)."""
    result = Coverage()
    compressed_types = compressed_layer_types()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, _ in model.named_modules()}
    vision = tuple(f"{n}." for n in vision_modules(model)) if modules_to_not_convert is None else ()
    head = tuple(f"{n}." for n in task_head(model)) if modules_to_not_convert is None else ()
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, compressed_types) or _is_bitsandbytes(module) or hasattr(type(module), "STORED_MODULES"):
            entry = result.compressed.setdefault(type(module).__name__, [0, 0])
            entry[0] += 1
            entry[1] += module.in_features * module.out_features
            inside = name + "."
            continue
        for key, tensor in module.named_parameters(recurse=False):
            if tensor.dim() < 2:
                continue  # norms and biases
            full = f"{name}.{key}" if name else key
            if isinstance(module, nn.Embedding) or ("embed" in full and not isinstance(module, LINEAR_TYPES)):
                reason = "embedding"  # a vision model's patch projection, class token and positions too
            elif module is output:
                reason = "output embedding (lm_head)"
            elif f"{name}.".startswith(head):
                reason = "task head (left out unless modules_to_not_convert is given)"
            elif is_router(name, module, names):
                reason = "router (kept in full precision)"
            elif name.startswith(vision):
                reason = "vision tower (left out unless modules_to_not_convert is given)"
            elif (
                isinstance(module, LINEAR_TYPES)
                and modules_to_not_convert
                and is_excluded(name, modules_to_not_convert)
            ):
                reason = "modules_to_not_convert"
            elif isinstance(module, LINEAR_TYPES):
                reason = "linear layer not compressed"
            else:
                reason = f"unsupported: {type(module).__name__}.{key} ({tensor.dim()}-D)"
            result.left_out.append((full, tensor.numel(), reason))
    return result


def check_coverage(model: nn.Module, config, allow_partial: bool = False) -> Coverage:
    """Log what the run covered; refuse, unless `allow_partial`, a run that left more than a quarter of the
    linear-like weights in full precision for no chosen reason (a layer type no technique handles)."""
    result = coverage(model, getattr(config, "modules_to_not_convert", None))
    result.experts = dict(getattr(model, "hfcompress_expert_tokens", None) or {})
    logger.info("%s", result.describe())
    if result.unintended_share > MAX_UNINTENDED_SHARE and not allow_partial:
        worst = sorted({reason for _, _, reason in result.left_out if not reason.startswith(INTENDED)})
        raise ValueError(
            f"{100 * result.unintended_share:.0f}% of the model's linear-like weights were left in full precision "
            f"({result.unintended:,} weights: {'; '.join(worst)}); the compressed model would be much larger than "
            "asked for. Pass allow_partial=True (--allow-partial) to accept that"
        )
    if result.unintended:
        logger.warning(
            "%d weight matrices (%s weights) stay in full precision: %s", sum(1 for *_, r in result.left_out if not r.startswith(INTENDED)),
            f"{result.unintended:,}", "; ".join(sorted({r for *_, r in result.left_out if not r.startswith(INTENDED)})),
        )  # fmt: skip
    return result
