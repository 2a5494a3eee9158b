"""`verify_folder`: check a model folder the way a user would want before serving it (`hfcompress verify`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers

from ..checkpoint import CheckpointError
from ..core.linalg import all_finite
from ..core.registry import compressed_layer_types
from ..evaluation.footprint import file_digest
from ..hub.record import RECORD_FILE
from ..quantization.ct_import import load_compressed_tensors, why_hfcompress_reads

__all__ = ["verify_folder"]


def verify_folder(folder: str | os.PathLike) -> dict:
    """Load the model folder as `from_pretrained` would (the manifest's checks included), then check that no
    tensor was missing, unexpected or mismatched, that every weight is finite, and that a forward pass on a few
    tokens gives finite outputs. A compressed-tensors folder transformers cannot load (zero points the installed
    compressed-tensors does not read) or would decompress (quantized experts) is read by `load_compressed_tensors`
    instead (`reader`: "hfcompress", `why`: the reason; `ct_import.why_hfcompress_reads`). Returns what was
    checked; raises `CheckpointError` naming the first problem."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{os.fspath(folder)!r} is not a model folder (no config.json)")
    checked_files = _check_files(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    reader, why = "transformers", why_hfcompress_reads(folder, getattr(config, "quantization_config", None))
    if why is not None:
        try:
            model = load_compressed_tensors(folder)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        reader = "hfcompress"
    else:
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model_class = model_class or transformers.AutoModel
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(kind):
                raise CheckpointError(
                    f"{os.fspath(folder)}: {kind.replace('_', ' ')} when loading: {sorted(info[kind])[:10]}"
                )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"{os.fspath(folder)}: {name} holds NaN or infinite values")
    outputs = None
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if vocab:
        with torch.no_grad():
            outputs = model.eval()(input_ids=torch.arange(min(8, vocab)).unsqueeze(0))
        first = outputs[0] if isinstance(outputs, tuple) else next(iter(outputs.values()))
        if not bool(torch.isfinite(first).all()):
            raise CheckpointError(f"{os.fspath(folder)}: a forward pass on 8 tokens gives NaN or infinite outputs")
    return {
        "model": os.fspath(folder),
        "class": type(model).__name__,
        "compressed_layers": sum(isinstance(m, compressed_layer_types()) for m in model.modules()),
        "tensors": len(model.state_dict()),
        "forward": outputs is not None,
        "files": checked_files,
        "reader": reader,
        **({"why": why} if why is not None else {}),
    }


def _check_files(folder: Path) -> int:
    """Compare the weight files with the sizes and SHA-256 digests the compression record took when hfcompress
    wrote them (a folder without a record, or a record without digests, has nothing to compare)."""
    record = folder / RECORD_FILE
    files = json.loads(record.read_text(encoding="utf-8")).get("files", {}) if record.is_file() else {}
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{os.fspath(folder)}: {name} is missing (the compression record lists it)")
        if file_digest(path) != expected:
            raise CheckpointError(
                f"{os.fspath(path)} is not the file hfcompress wrote (size or SHA-256 differs from {RECORD_FILE}): it was "
                "changed or corrupted since; download or write it again"
            )
    return len(files)
