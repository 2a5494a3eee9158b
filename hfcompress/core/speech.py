"""Calibration samples of a speech-to-text model (Whisper): its encoder reads log-mel features, its decoder token
ids, and both go through the model together, as they do when it transcribes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpeechSamples"]


@dataclass(frozen=True)
class SpeechSamples:
    """`input_features` [n, mel bins, frames] and the token ids the decoder reads with them, `decoder_input_ids`
    [n, tokens], each row `lengths[i]` tokens long and padded after them with its last token (the end of the
    transcript). Indexed, split and moved like a tensor of samples; a selection of rows keeps the tokens up to
    its longest row. `available`: how many samples they were chosen among (the record's windows available)."""

    input_features: torch.Tensor
    decoder_input_ids: torch.Tensor
    lengths: torch.Tensor
    available: int | None = None

    def __post_init__(self):
        n = len(self.input_features)
        if self.input_features.dim() != 3 or not self.input_features.is_floating_point():
            raise ValueError(
                f"speech features are a float tensor [n, mel bins, frames], got {self.input_features.dtype} of shape "
                f"{tuple(self.input_features.shape)}"
            )
        if self.decoder_input_ids.shape[0] != n or self.lengths.shape != (n,):
            raise ValueError(
                f"{n} speech samples need {n} rows of decoder ids and lengths, got "
                f"{tuple(self.decoder_input_ids.shape)} and {tuple(self.lengths.shape)}"
            )

    def __len__(self) -> int:
        return len(self.input_features)

    def __getitem__(self, rows) -> SpeechSamples:
        lengths = self.lengths[rows]
        longest = int(lengths.max()) if lengths.numel() else 0
        return SpeechSamples(self.input_features[rows], self.decoder_input_ids[rows, :longest], lengths)

    def split(self, size: int) -> list[SpeechSamples]:
        return [self[start : start + size] for start in range(0, len(self), size)]

    def to(self, device) -> SpeechSamples:
        return SpeechSamples(self.input_features.to(device), self.decoder_input_ids.to(device), self.lengths)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward pass."""
        return {"input_features": self.input_features, "decoder_input_ids": self.decoder_input_ids}
