"""Which programs read a compressed-tensors checkpoint back where transformers falls short: asymmetric grids (which
installed compressed-tensors cannot), and experts transformers does not load as written.

compressed-tensors stores the zero points of an asymmetric weight-only grid packed like the codes
(`weight_zero_point`: int32 [out * bits / 32, groups]); vLLM and llm-compressor's own checkpoints use that layout.
Checked here (stop 67): vLLM 0.32's CPU build serves it (uint4 with zero points on `CPUWNA16LinearKernel`), and
transformers 5.19 and 5.25 read it with compressed-tensors 0.17.0; with compressed-tensors 0.18.0, 0.19.0 and 0.20.1
transformers builds the zero points unpacked ([out, groups]) and refuses the checkpoint on their shape
(vllm-project/llm-compressor#1618, vllm-project/compressed-tensors#458).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.version import Version

from ..core.streaming import stored_weight_map

__all__ = [
    "ZERO_POINT_READERS",
    "asymmetric_groups",
    "experts_transformers_cannot_load",
    "has_packed_zero_points",
    "installed_reads_zero_points",
    "stored_expert_tensors",
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


_EXPERT_TENSOR = re.compile(r"(.*\.experts\.\d+\.[^.]+)\.(weight|weight_packed|weight_scale)$")


def stored_expert_tensors(folder: str | Path) -> dict[str, set[str]]:
    """{expert linear as stored (`...experts.3.w1`): its weight tensors' names (`weight`, or `weight_packed` and
    `weight_scale`)} of the experts a local checkpoint stores one per expert, from its safetensors headers."""
    leaves: dict[str, set[str]] = {}
    for key in stored_weight_map(folder):
        match = _EXPERT_TENSOR.fullmatch(key)
        if match:
            leaves.setdefault(match[1], set()).add(match[2])
    return leaves


def experts_transformers_cannot_load(experts: dict[str, set[str]], quantization_config: dict) -> str | None:
    """Why transformers does not load a compressed-tensors checkpoint as written, for its `experts`
    (`stored_expert_tensors`), or None: W8A8 experts (it decompresses weight-only ones only; vLLM serves them,
    hfcompress reads them) or unquantized ones (5.25 decompresses every expert stored so and drops plain ones;
    `quantization.export` warns of both as it writes them)."""
    if quantization_config.get("quant_method") != "compressed-tensors":
        return None
    if any(found == {"weight"} for found in experts.values()):
        return "its unquantized experts are stored one per expert, which transformers drops or reinitializes"
    if quantization_config.get("format") == "int-quantized" and experts:
        return "its experts are W8A8 int8 linears; transformers decompresses weight-only experts only"
    return None
