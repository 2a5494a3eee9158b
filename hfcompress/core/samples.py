"""Calibration samples of models that read several inputs together, as they run: a speech-to-text model (Whisper)
reads log-mel features and, in its decoder, token ids; a dual encoder (CLIP) reads captions and images. Each
kind holds one sample per row of each of its tensors, and is indexed, split and moved like a tensor of samples."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["CaptionedImages", "Samples", "SpeechSamples"]


class Samples:
    """What the kinds share: their tensors (dataclass fields) have a row per sample; `available` says how many
    samples they were chosen among (the record's windows available)."""

    available: int | None

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))

    def split(self, size: int) -> list:
        return [self[start : start + size] for start in range(0, len(self), size)]

    def to(self, device):
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)})

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward pass."""
        raise NotImplementedError


def _check_rows(kind: str, tensors: dict[str, torch.Tensor]) -> None:
    rows = {name: tensor.shape[0] for name, tensor in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{kind} need one row per sample in each tensor, got {rows}")


@dataclass(frozen=True)
class SpeechSamples(Samples):
    """`input_features` [n, mel bins, frames] and the token ids the decoder reads with them, `decoder_input_ids`
    [n, tokens], each row `lengths[i]` tokens long and padded after them with its last token (the end of the
    transcript). A selection of rows keeps the tokens up to its longest row."""

    input_features: torch.Tensor
    decoder_input_ids: torch.Tensor
    lengths: torch.Tensor
    available: int | None = None

    def __post_init__(self):
        if self.input_features.dim() != 3 or not self.input_features.is_floating_point():
            raise ValueError(
                f"speech features are a float tensor [n, mel bins, frames], got {self.input_features.dtype} of shape "
                f"{tuple(self.input_features.shape)}"
            )
        _check_rows("speech samples", {"features": self.input_features, "decoder ids": self.decoder_input_ids,
                                       "lengths": self.lengths})  # fmt: skip

    def __getitem__(self, rows) -> SpeechSamples:
        lengths = self.lengths[rows]
        longest = int(lengths.max()) if lengths.numel() else 0
        return SpeechSamples(self.input_features[rows], self.decoder_input_ids[rows, :longest], lengths)

    def model_inputs(self) -> dict:
        return {"input_features": self.input_features, "decoder_input_ids": self.decoder_input_ids, "use_cache": False}


@dataclass(frozen=True)
class CaptionedImages(Samples):
    """Captions as token ids `input_ids` [n, tokens] with their `attention_mask` (padded at the end), and their
    images `pixel_values` [n, channels, height, width]. A selection of rows keeps the tokens up to its longest
    caption."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    available: int | None = None

    def __post_init__(self):
        if self.pixel_values.dim() != 4 or not self.pixel_values.is_floating_point():
            raise ValueError(
                f"images are a float tensor [n, channels, height, width], got {self.pixel_values.dtype} of shape "
                f"{tuple(self.pixel_values.shape)}"
            )
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(
                f"captions are token ids [n, tokens] with an attention mask of their shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        _check_rows("captioned images", {"captions": self.input_ids, "images": self.pixel_values})

    def __getitem__(self, rows) -> CaptionedImages:
        mask = self.attention_mask[rows]
        longest = int(mask.sum(dim=1).max()) if len(mask) else 0
        return CaptionedImages(self.input_ids[rows, :longest], mask[:, :longest], self.pixel_values[rows])

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
