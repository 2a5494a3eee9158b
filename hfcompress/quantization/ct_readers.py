"""Which programs read an asymmetric compressed-tensors checkpoint back, and which installed version cannot.

compressed-tensors stores the zero points of an asymmetric weight-only grid packed like the codes
(`weight_zero_point`: int32 [out * bits / 32, groups]); vLLM and llm-compressor's own checkpoints use that layout.
Checked here (stop 67): vLLM 0.32's CPU build serves it (uint4 with zero points on `CPUWNA16LinearKernel`), and
transformers 5.19 and 5.25 read it with compressed-tensors 0.17.0; with compressed-tensors 0.18.0, 0.19.0 and 0.20.1
transformers builds the zero points unpacked ([out, groups]) and refuses the checkpoint on their shape
(vllm-project/llm-compressor#1618, vllm-project/compressed-tensors#458).
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

__all__ = [
    "ZERO_POINT_READERS",
    "asymmetric_groups",
    "has_packed_zero_points",
    "installed_reads_zero_points",
    "zero_points_unreadable",
]

# the last compressed-tensors release whose transformers loader reads packed zero points (checked: 0.17.0 reads
# them, 0.18.0 to 0.20.1 do not)
_LAST_READING = Version("0.17.99")

ZERO_POINT_READERS = (
    "the zero points are stored packed, as compressed-tensors and vLLM define them: vLLM serves the checkpoint (0.32 "
    "CPU checked); transformers reads it with compressed-tensors 0.17 (pip install 'compressed-tensors==0.17.0'), "
    "not with 0.18 to 0.20.1, whose loader builds the zero points unpacked and refuses them "
    "(vllm-project/llm-compressor#1618)"
)


def asymmetric_groups(quantization_config: dict) -> list[str]:
    """The config groups of a compressed-tensors `quantization_config` whose weights are on an asymmetric grid."""
    groups = quantization_config.get("config_groups") or {}
    return [name for name, group in groups.items() if (group.get("weights") or {}).get("symmetric") is False]


def has_packed_zero_points(quantization_config) -> bool:
    """Whether a model config's `quantization_config` is a compressed-tensors one with asymmetric groups."""
    if not isinstance(quantization_config, dict) or quantization_config.get("quant_method") != "compressed-tensors":
        return False
    return bool(asymmetric_groups(quantization_config))


def installed_reads_zero_points() -> tuple[bool, str | None]:
    """(whether the installed compressed-tensors lets transformers read packed zero points, its version or None)."""
    try:
        version = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        return False, None
    return Version(version) <= _LAST_READING, version


def zero_points_unreadable(quantization_config) -> bool:
    """Whether a model config's `quantization_config` is an asymmetric compressed-tensors one whose packed zero
    points the installed compressed-tensors cannot read in transformers (then `ct_import.load_compressed_tensors`
    reads the checkpoint)."""
    return has_packed_zero_points(quantization_config) and not installed_reads_zero_points()[0]
