"""Checkpoints another library quantized, read by hfcompress's own layers one block at a time: the formats a
technique registers a reader for, by the `quant_method` of their config's `quantization_config`.

    register_stored_format(
        "compressed-tensors",
        lazy("hfcompress.quantization.ct_import:CompressedTensorsLayout"),
        obstacle=lazy("hfcompress.quantization.ct_import:reader_obstacle"),
    )

A reader is called as `reader(folder, model, quantization_config, stored_dtypes)` with the model built on the meta
device from the config (its `quantization_config` taken out), puts the layers that hold the stored tensors in it,
and answers `sources[model tensor]` (the stored tensors it is made of), `filled(stored names)` (the model tensors
those hold) and `as_loaded(model tensor, stored tensors)`. `obstacle(folder, quantization_config)` says why a
checkpoint of that format cannot be read so (None when it can), from its config alone, before any model is built.
`core.streaming.ShardedCheckpoint` reads such a folder through its reader for passes that run the model as stored
(the streamed perplexity), never to compress it again. Registering imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["StoredFormat", "register_stored_format", "stored_format"]


@dataclass(frozen=True)
class StoredFormat:
    reader: Callable
    obstacle: Callable | None = None


_FORMATS: dict[str, StoredFormat] = {}


def register_stored_format(quant_method: str, reader: Callable, obstacle: Callable | None = None) -> None:
    """Register how a checkpoint whose `quantization_config` says `quant_method` is read (see the module)."""
    existing = _FORMATS.get(quant_method)
    if existing is not None and existing.reader is not reader and existing.reader != reader:
        raise ValueError(f"quant_method {quant_method!r} already has a reader ({existing.reader!r})")
    _FORMATS[quant_method] = StoredFormat(reader, obstacle)


def stored_format(quant_method: str | None) -> StoredFormat | None:
    """What is registered for `quant_method`, None where nothing is."""
    return _FORMATS.get(quant_method) if quant_method else None
