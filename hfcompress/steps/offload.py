"""Whether a run streams its model from disk (`--offload`): always with `disk`, never with `none`, and with
`auto` when the model, held at `--dtype`, would not fit in the memory the run may use, saying so."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..checkpoint.manifest import HfcompressQuantizationConfig
from ..checkpoint.rebuild import ordinary_weights
from ..core.registry import Technique
from ..core.streamed_run import settings_obstacle
from ..core.streaming import streaming_obstacle
from ..io import weight_bytes
from ..quantization.streaming import reads_bitmask_layers
from .loading import DTYPES, checkpoint_dtype
from .options import OutputOptions

__all__ = [
    "available_memory",
    "compressed_input",
    "decide_streaming",
    "memory_shortfall",
    "parse_size",
    "should_stream",
    "streaming_refusal",
]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in '16GB', '800MB', '1.5GiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-memory must be a size like 16GB, 800MB or 1.5GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def available_memory() -> int | None:
    """The memory available to a new allocation now (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def should_stream(technique: Technique, config, model: str, options: OutputOptions, step_options: dict) -> bool:
    """Whether this run streams `model` from disk (`decide_streaming`, refusing what streaming cannot do)."""
    if options.resume and options.offload != "disk":
        raise ValueError("--resume continues a run streamed with --offload disk; add --offload disk")
    refused = streaming_refusal(technique, config, options, step_options)
    obstacle = compressed_input(model, reads_bitmask_layers(config), factorizes=technique.kind == "factorize")
    return decide_streaming(model, options.offload, options.dtype, options.max_memory, refused, obstacle=obstacle)


def decide_streaming(
    model: str,
    offload: str,
    dtype: str,
    max_memory: str | None,
    refused: str | None,
    what: str = "this run",
    obstacle: str | None = None,
    compressed: bool = False,
) -> bool:
    """Whether `what` streams `model` from disk, one decision for every command: never with `offload` "none";
    always with "disk" (raising `refused`, why these settings cannot stream, if any; a model that cannot stream,
    `streaming_obstacle` (with `compressed`, for a pass that runs the model as stored) or the caller's
    `obstacle`, loads whole with a warning that says why); with "auto" when
    the model held in `dtype` ("auto": the checkpoint's) would not fit in `max_memory` (None: the memory available
    now), saying so, or saying why it loads whole all the same."""
    if offload == "none":
        return False
    obstacle = obstacle or streaming_obstacle(model, compressed)
    if offload == "disk":
        if refused:
            raise ValueError(refused)
        if obstacle is not None:
            logger.warning("cannot stream the model from disk: %s; loading it whole instead", obstacle)
        return obstacle is None
    shortfall = memory_shortfall(model, dtype, parse_size(max_memory) if max_memory else None)
    if shortfall is None:
        return False
    needed, limit, held = shortfall
    needs = (
        f"{model} needs about {needed / 1e9:.1f} GB in {_name(held)}, more than the {limit / 1e9:.1f} GB {what} may use"
    )
    reason = refused or obstacle
    if reason:
        logger.warning("%s, but %s: loading it whole", needs, reason)
        return False
    logger.warning("%s: streaming it from disk one block at a time (--offload disk)", needs)
    return True


def memory_shortfall(model: str, dtype: str, limit: int | None) -> tuple[int, int, torch.dtype] | None:
    """(bytes needed, bytes allowed, dtype held in) when the weights of `model`, held in `dtype` ("auto": the
    checkpoint's), would not fit in `limit` bytes (None: the memory available now); None when they fit or
    either side is unknown."""
    stored = weight_bytes(model)
    limit = limit if limit is not None else available_memory()
    if stored is None or limit is None:
        return None
    held = checkpoint_dtype(model) if dtype == "auto" else DTYPES[dtype]
    needed = stored * held.itemsize // checkpoint_dtype(model).itemsize
    return (needed, limit, held) if needed > limit else None


def compressed_input(model: str, reads_bitmask: bool = False, factorizes: bool = False) -> str | None:
    """Why compressing `model` cannot stream it because hfcompress already compressed its layers (loaded whole,
    a bitmask-sparse layer is densified, a quantized one refused), or None. With `reads_bitmask` (GPTQ and RTN),
    bitmask layers alone stream, read dense (`ShardedCheckpoint.skeleton(dense_bitmask=True)`). Layers that hold
    ordinary weights (factorized, resized: their rebuilders are `trainable`) stream for every technique: the
    skeleton rebuilds them as loading would; except factorized layers to be factorized again (`factorizes`), which
    the technique refuses once the model is loaded."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    if manifest.get("quant_method") != "hfcompress":
        return None
    sections = HfcompressQuantizationConfig.from_dict(manifest).sections_in_use()
    if reads_bitmask and sections == ["sparse"]:
        return None
    if ordinary_weights(sections) and not (factorizes and "lowrank" in sections):
        return None
    return (
        f"{model!r} holds layers hfcompress already compressed ({', '.join(sections)}), which streaming does not "
        "read back as full-precision weights"
    )


def streaming_refusal(technique: Technique, config, options: OutputOptions, step_options: dict) -> str | None:
    """Why this technique with these settings (and `options.eval_tasks`) cannot run streamed, or None."""
    if technique.stream is None:
        return f"{technique.name} cannot run with --offload disk (it needs the whole model in memory)"
    obstacle = settings_obstacle(config, technique.streamed_format(step_options.get("format", "hfcompress")))
    if obstacle is not None:
        return obstacle
    if options.eval_tasks:
        return (
            "--offload disk never holds the model whole, so it runs no lm-eval tasks: drop --eval-tasks and evaluate "
            "OUTPUT afterwards where it fits (--eval-dataset measures perplexity streamed)"
        )
    return None


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
