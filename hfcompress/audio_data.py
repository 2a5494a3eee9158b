"""Speech for calibration: a folder of audio files, a `datasets` audio dataset or a float tensor of log-mel features,
prepared by the model's own feature extractor (its `preprocessor_config.json`) as its pipeline prepares them, with
what the model itself
transcribes from them as its decoder's input (greedy decoding before any compression: the decoder is calibrated
on the text it produces, as a user would run it)."""

from __future__ import annotations

import inspect
import io
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoFeatureExtractor

from .audio_io import audio_info, read_audio, resample
from .core.samples import SpeechSamples
from .image_data import spread

__all__ = ["AUDIO_SUFFIXES", "audio_files", "load_speech", "transcribe"]

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")  # all but WAV: soundfile


def audio_files(folder: str | os.PathLike) -> list[Path]:
    """The audio files under `folder` (its subfolders too), in a fixed order."""
    path = Path(folder)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        others = sorted({p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.suffix})
        raise ValueError(
            f"folder {os.fspath(folder)!r} holds no audio files ({', '.join(AUDIO_SUFFIXES)})"
            + (f"; it holds {', '.join(others)} files" if others else "")
        )
    return files


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
    """`num_samples` calibration samples (None: all) of a speech-to-text `model` (Whisper), spread evenly over
    `source`: a folder of audio files (`audio_files`) cut into pieces of the feature extractor's length (30 s for
    Whisper), a `datasets.Dataset` with an audio column (a row a sample, cut to that length), or a float tensor of
    log-mel features [n, mel bins, frames] as the model reads them. Audio is resampled to the extractor's rate and
    prepared by the feature extractor saved with the model; each sample comes with the model's own greedy
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
        extractor = _feature_extractor(model.name_or_path)
        if hasattr(source, "column_names"):
            waveforms, available = _dataset_waveforms(source, extractor, num_samples)
            where = f"a dataset of {len(source)} rows"
        else:
            waveforms, available = _folder_waveforms(source, extractor, num_samples)
            where = os.fspath(source)
        rate = extractor.sampling_rate
        features = extractor([w.numpy() for w in waveforms], sampling_rate=rate, return_tensors="pt")["input_features"]
    positions = getattr(model.config, "max_target_positions", None) or 448
    ids, lengths = transcribe(model, features.float(), batch_size, max_tokens=positions // 2 - 1)
    logger.info(
        "%d calibration audio samples from %s; the model transcribed them into %d tokens each on average",
        len(features), where, round(lengths.float().mean().item()),
    )  # fmt: skip
    return SpeechSamples(features.float(), ids, lengths, available)


def _feature_extractor(model_path):
    try:
        return AutoFeatureExtractor.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {os.fspath(model_path)!r} has no feature extractor to prepare the calibration audio "
            "(preprocessor_config.json); save it beside the model (processor.save_pretrained)"
        ) from e


def _folder_waveforms(folder, extractor, num_samples: int | None) -> tuple[list[torch.Tensor], int]:
    """`num_samples` pieces of the extractor's length of the audio files under `folder`, spread over all of them,
    at the extractor's rate; and how many pieces there were."""
    rate, seconds = extractor.sampling_rate, extractor.n_samples / extractor.sampling_rate
    pieces = []  # (file, its rate, first frame, frames): every piece of every file
    for file in audio_files(folder):
        frames, file_rate = audio_info(file)
        step = max(1, round(seconds * file_rate))
        pieces += [(file, file_rate, begin, min(step, frames - begin)) for begin in range(0, frames, step)]
    if not pieces:
        raise ValueError(f"the audio files under {os.fspath(folder)!r} hold no samples")
    chosen = pieces if num_samples is None else [pieces[i] for i in spread(len(pieces), num_samples).tolist()]
    logger.info("%d pieces of up to %g s of the %d there are", len(chosen), seconds, len(pieces))
    return [resample(read_audio(file, begin, n)[0], file_rate, rate) for file, file_rate, begin, n in chosen], len(
        pieces
    )


def _dataset_waveforms(dataset, extractor, num_samples: int | None) -> tuple[list[torch.Tensor], int]:
    """The audio of `num_samples` rows of `dataset` spread over it (its column of `datasets.Audio` feature, decoded
    here: WAV by Python, other formats by soundfile), each cut to the extractor's length, at its rate."""
    import datasets

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Audio)]
    if not columns:
        raise ValueError(
            f"the dataset has no audio column (a `datasets.Audio` feature); its columns are {dataset.column_names}"
        )
    rows = range(len(dataset)) if num_samples is None else spread(len(dataset), num_samples).tolist()
    raw = dataset.select(rows).cast_column(columns[0], datasets.Audio(decode=False))  # bytes or a path per row
    rate, seconds = extractor.sampling_rate, extractor.n_samples / extractor.sampling_rate
    waveforms = []
    for row in raw[columns[0]]:
        source = io.BytesIO(row["bytes"]) if row.get("bytes") else row["path"]
        row_rate = audio_info(source)[1]
        waveform, _ = read_audio(source, 0, round(seconds * row_rate))
        waveforms.append(resample(waveform, row_rate, rate))
    return waveforms, len(dataset)
