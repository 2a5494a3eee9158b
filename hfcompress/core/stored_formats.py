"""Checkpoints another library quantized, read by hfcompress's own layers one block at a time: the formats a
technique registers a reader for, by the `quant_method` of their config's `quantization_config`.

    register_stored_format("compressed-tensors", lazy("hfcompress.quantization.ct_import:CompressedTensorsLayout"))

A reader is called as `reader(folder, model, quantization_config, stored_dtypes)` with the model built on the meta
device from the config (its `quantization_config` taken out), puts the layers that hold the stored tensors in it,
and answers `stored_name(model tensor)`, `model_name(stored tensor)` (None: not kept) and `as_loaded(stored
name, tensor)`. `core.streaming.ShardedCheckpoint` reads such a folder through it for passes that run the
model as stored (the streamed perplexity), never to compress it again. Registering imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["register_stored_format", "stored_format_reader"]

_READERS: dict[str, Callable] = {}


def register_stored_format(quant_method: str, reader: Callable) -> None:
    """Register how a checkpoint whose `quantization_config` says `quant_method` is read (see the module)."""
    existing = _READERS.get(quant_method)
    if existing is not None and existing is not reader and existing != reader:
        raise ValueError(f"quant_method {quant_method!r} already has a reader ({existing!r})")
    _READERS[quant_method] = reader


def stored_format_reader(quant_method: str | None) -> Callable | None:
    """The reader registered for `quant_method`, None where there is none."""
    return _READERS.get(quant_method) if quant_method else None
