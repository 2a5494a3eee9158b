"""Speech for calibration: a folder of WAV files or a float tensor of log-mel features, prepared by the model's own
feature extractor (its `preprocessor_config.json`) as its pipeline prepares them, with what the model itself
transcribes from them as its decoder's input (greedy decoding before any compression: the decoder is calibrated
on the text it produces, as a user would run it)."""

from __future__ import annotations

import inspect
import logging
import os
import wave
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoFeatureExtractor

from .core.speech import SpeechSamples
from .image_data import spread

__all__ = ["AUDIO_SUFFIXES", "audio_files", "load_speech", "read_wav", "resample", "transcribe"]

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav",)
_PCM = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # bytes per sample -> how it is stored


def audio_files(folder: str | os.PathLike) -> list[Path]:
    """The WAV files under `folder` (its subfolders too), in a fixed order."""
    path = Path(folder)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        others = sorted({p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.suffix})
        raise ValueError(
            f"folder {os.fspath(folder)!r} holds no WAV files (.wav, PCM), which speech calibration reads"
            + (
                f"; it holds {', '.join(others)} files: convert them to WAV (e.g. ffmpeg -i in.flac out.wav)"
                if others
                else ""
            )
        )
    return files


def read_wav(path: str | os.PathLike, start: int = 0, frames: int | None = None) -> tuple[torch.Tensor, int]:
    """`frames` frames (None: the rest) of the PCM WAV file at `path` from frame `start`, as a mono float waveform
    in [-1, 1] (channels averaged), and its sampling rate."""
    try:
        with wave.open(os.fspath(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            f.setpos(start)
            data = f.readframes(f.getnframes() - start if frames is None else frames)
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"calibration audio {os.fspath(path)!r} cannot be read as a PCM WAV file: {e}") from e
    if width == 3:  # 24-bit: widen each little-endian sample to 32 bits
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 3)
        samples = torch.cat([torch.zeros_like(raw[:, :1]), raw], dim=1).contiguous().view(torch.int32)
        width = 4
    elif width in _PCM:
        samples = torch.frombuffer(bytearray(data), dtype=_PCM[width])
    else:
        raise ValueError(f"calibration audio {os.fspath(path)!r} has {8 * width}-bit samples; 8, 16, 24 or 32 are read")
    waveform = samples.double()
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        waveform = waveform - 128
    waveform = waveform / 2 ** (8 * width - 1)
    return waveform.view(-1, channels).mean(dim=1).float(), rate


def resample(waveform: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """`waveform` sampled at `rate` resampled to `target` by its spectrum: the frequencies both rates hold are
    kept, those above the lower rate's Nyquist frequency dropped (no aliasing)."""
    if rate == target:
        return waveform
    n = waveform.shape[-1]
    m = max(1, round(n * target / rate))
    spectrum = torch.fft.rfft(waveform.double())
    kept = torch.zeros(m // 2 + 1, dtype=spectrum.dtype)
    bins = min(len(kept), len(spectrum))
    kept[:bins] = spectrum[:bins]
    return (torch.fft.irfft(kept, n=m) * (m / n)).float()


@torch.no_grad()
def transcribe(model, features: torch.Tensor, batch_size: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids `model` transcribes `features` [n, mel bins, frames] into by greedy decoding from its
    decoder's start token, at most `max_tokens` after it, stopping at its end token: [n, tokens] (each row padded
    with its end token) and each row's length."""
    config, generation = model.config, getattr(model, "generation_config", None)
    start = config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{type(model).__name__}'s config has no decoder_start_token_id to start transcribing from")
    ends = getattr(generation, "eos_token_id", None) or config.eos_token_id
    ends = torch.tensor(ends if isinstance(ends, list) else [ends] if ends is not None else [], dtype=torch.long)
    # transformers 5.25 renamed `past_key_values` to `cache`, in the forward's arguments and its output
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    rows, lengths = [], []
    for batch in tqdm(features.split(batch_size), desc="transcribing calibration audio"):
        encoded = model.get_encoder()(input_features=batch.to(device, dtype))
        ids = torch.full((len(batch), 1), start, dtype=torch.long, device=device)
        length = torch.full((len(batch),), max_tokens + 1)
        cache = None
        for step in range(max_tokens):
            step_ids = ids if cache is None else ids[:, -1:]
            out = model(encoder_outputs=encoded, decoder_input_ids=step_ids, use_cache=True, **{cache_name: cache})
            cache = getattr(out, cache_name)
            token = out.logits[:, -1].argmax(dim=-1)
            finished = length <= step + 1  # rows that ended: repeat their end token
            token = torch.where(finished.to(device), ids[:, -1], token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            ended = torch.isin(token.cpu(), ends) & ~finished
            length[ended] = step + 2
            if bool((length <= step + 2).all()):
                break
        rows.append(ids.cpu())
        lengths.append(length.clamp(max=ids.shape[1]))
    width = max(r.shape[1] for r in rows)
    padded = [torch.cat([r, r[:, -1:].expand(-1, width - r.shape[1])], dim=1) for r in rows]
    return torch.cat(padded), torch.cat(lengths)


def load_speech(source, model, num_samples: int | None, batch_size: int = 4) -> SpeechSamples:
    """`num_samples` calibration samples (None: all) of a speech-to-text `model` (Whisper): from a float tensor of
    log-mel features [n, mel bins, frames] as the model reads them, or from a folder of WAV files cut into
    pieces of the feature extractor's length (30 s for Whisper), spread evenly over all pieces, resampled to its
    sampling rate and prepared by the feature extractor saved with the model; each with the model's own greedy
    transcription of it as the decoder's input (at most half its decoder positions)."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or not source.is_floating_point():
            raise ValueError(
                f"speech features are a float tensor [n, mel bins, frames] for {type(model).__name__}; got "
                f"{source.dtype} of shape {tuple(source.shape)}"
            )
        features = source if num_samples is None else source[spread(len(source), num_samples)]
        where, available = f"a tensor of {len(source)} feature rows", len(source)
    else:
        if not os.path.isdir(source):
            raise ValueError(
                f"{type(model).__name__} reads speech: calibrate it on a folder of WAV files or a float tensor of "
                f"log-mel features [n, mel bins, frames]; {os.fspath(source)!r} is not a folder"
            )
        features, available = _folder_features(source, model.name_or_path, num_samples)
        where = os.fspath(source)
    positions = getattr(model.config, "max_target_positions", None) or 448
    ids, lengths = transcribe(model, features.float(), batch_size, max_tokens=positions // 2 - 1)
    logger.info(
        "%d calibration audio samples from %s; the model transcribed them into %d tokens each on average",
        len(features), where, round(lengths.float().mean().item()),
    )  # fmt: skip
    return SpeechSamples(features.float(), ids, lengths, available)


def _folder_features(folder, model_path, num_samples: int | None) -> tuple[torch.Tensor, int]:
    """The features of `num_samples` pieces of the WAV files under `folder` spread over all of them, and how many
    pieces there were."""
    try:
        extractor = AutoFeatureExtractor.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {os.fspath(model_path)!r} has no feature extractor to prepare the calibration audio "
            "(preprocessor_config.json); save it beside the model (processor.save_pretrained)"
        ) from e
    rate, seconds = extractor.sampling_rate, extractor.n_samples / extractor.sampling_rate
    pieces = []  # (file, its rate, first frame, frames): every piece of `seconds` of every file
    for file in audio_files(folder):
        try:
            with wave.open(os.fspath(file), "rb") as f:
                frames, file_rate = f.getnframes(), f.getframerate()
        except (wave.Error, EOFError, OSError) as e:
            raise ValueError(f"calibration audio {os.fspath(file)!r} cannot be read as a PCM WAV file: {e}") from e
        step = max(1, round(seconds * file_rate))
        pieces += [(file, file_rate, begin, min(step, frames - begin)) for begin in range(0, frames, step)]
    if not pieces:
        raise ValueError(f"the WAV files under {os.fspath(folder)!r} hold no samples")
    chosen = pieces if num_samples is None else [pieces[i] for i in spread(len(pieces), num_samples).tolist()]
    waveforms = [resample(read_wav(file, begin, n)[0], file_rate, rate).numpy() for file, file_rate, begin, n in chosen]
    logger.info(
        "%d pieces of up to %g s of %d available, prepared by %s", len(chosen), seconds, len(pieces),
        type(extractor).__name__,
    )  # fmt: skip
    return extractor(waveforms, sampling_rate=rate, return_tensors="pt")["input_features"], len(pieces)
