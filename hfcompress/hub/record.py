"""The compression record: a versioned JSON file written next to every model hfcompress saves.

It says what the model was made from (base model id and revision, its license and task), every step that
was applied with its full config and data, the library versions, the command that reproduces it, and the
metrics measured before and after (size on disk, parameters, bits per weight, perplexity with its dataset
and protocol, latency with the hardware it ran on). Model cards are generated from it, never the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

try:
    import resource
except ImportError:  # Windows has no getrusage
    resource = None

from ..data import looks_local

__all__ = [
    "RANK_PEAKS",
    "RECORD_FILE",
    "RECORD_VERSION",
    "CompressionRecord",
    "Step",
    "cpu_description",
    "hardware_description",
    "library_versions",
    "peak_memory",
]

logger = logging.getLogger(__name__)

RECORD_FILE = "hfcompress_record.json"
RECORD_VERSION = 1
_LIBRARIES = ("hfcompress", "torch", "transformers", "huggingface_hub", "safetensors", "peft", "compressed-tensors")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# the key of `Step.memory` with each rank's peak resident set size, in rank order (runs across processes)
RANK_PEAKS = "peak_rss_bytes_ranks"


def peak_memory() -> dict[str, int]:
    """The peak memory of this process so far: resident set size (loading, compressing and evaluating all
    counted) and, on a GPU, the most memory torch allocated there."""
    if resource is None:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}  # Linux says kilobytes
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return peak


# the instruction sets the kernels and torch choose paths by
CPU_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """The CPU by model name (where Linux tells it), the instruction sets that matter here, and torch's pick."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.processor(), platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    present = [f for f in CPU_FLAGS if f in flags] or ["unknown"]
    return f"{name} ({', '.join(present)}; torch {torch.backends.cpu.get_cpu_capability()})"


def hardware_description() -> str:
    """Where latency was measured: the CPU (model name, instruction sets) and threads, or the GPU."""

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


@dataclass
class Step:
    """One technique applied: `technique` ("quantization", "factorization", "lora-merge", ...), `method`
    ("gptq", "whiten", ...), its full `config`, and a description of the `data` it used."""

    technique: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    seconds: float | None = None
    # peak memory of the run that made it (`peak_memory`); across processes also each rank's peak resident set
    # size under `RANK_PEAKS`, rank 0's first
    memory: dict[str, Any] | None = None


# the Hub's pipeline tag of each task a model is loaded for (`core.tasks`); multiple choice has none
PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "masked-lm": "fill-mask",
    "seq2seq-lm": "text2text-generation",
    "speech-seq2seq": "automatic-speech-recognition",
    "image-classification": "image-classification",
    "image-text-to-text": "image-text-to-text",
    "base": "feature-extraction",
    "text-encoding": "feature-extraction",
}


@dataclass
class CompressionRecord:
    base_model: str
    base_is_local: bool | None = None  # a local folder (no Hub id to link to); None in older records
    base_revision: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    steps: list[Step] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # "before" / "after" -> name -> value
    evaluation: dict[str, Any] | None = None  # dataset and protocol of the quality metrics
    hardware: str | None = None
    command: str | None = None
    # what loading needs: {"requires_hfcompress": bool}, "packed_zero_points": true for an asymmetric
    # compressed-tensors checkpoint, "not_in_transformers": why transformers does not load its experts (who reads
    # those: `quantization.ct_readers`)
    loading: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # weight file -> {"sha256", "bytes"} as written
    libraries: dict[str, str] = field(default_factory=library_versions)
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def base_hub_id(self) -> str | None:
        """The base model's Hub id, or None when it was a local folder."""
        if self.base_is_local is None:  # an older record: what the name says
            local = os.path.isdir(self.base_model) or looks_local(self.base_model)
        else:
            local = self.base_is_local
        return None if local else self.base_model

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionRecord:
        version = data.get("version", RECORD_VERSION)
        if version > RECORD_VERSION:
            logger.warning(
                "%s was written by a newer hfcompress (version %s); reading what this one knows", RECORD_FILE, version
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown compression record keys %s", unknown)
        values = {k: v for k, v in data.items() if k in known}
        values["steps"] = [
            Step(**{k: v for k, v in s.items() if k in Step.__dataclass_fields__}) for s in data.get("steps", [])
        ]
        if "base_model" not in values:
            raise ValueError(f"the compression record has no `base_model`; keys: {sorted(data)}")
        return cls(**values)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CompressionRecord:
        path = Path(folder) / RECORD_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {RECORD_FILE}: it was not written by hfcompress (or predates compression records)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


_invocation: list[str] | None = None  # set by the `hfcompress` entry point: its own arguments


def set_invocation(argv: list[str] | None) -> None:
    """Record the arguments the `hfcompress` command was called with (also when called as `main(argv)`)."""
    global _invocation
    _invocation = None if argv is None else [str(a) for a in argv]


def command_line() -> str:
    """The command that is running, as a user would type it again."""
    if _invocation is not None:
        return shlex.join(["hfcompress", *_invocation])
    program = os.path.basename(sys.argv[0]) if sys.argv else "python"
    if program in ("cli.py", "__main__.py"):
        program = "hfcompress"
    return shlex.join([program, *sys.argv[1:]])
