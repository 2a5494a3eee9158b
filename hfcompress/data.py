"""Text for calibration and evaluation: from strings, text files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer

from .audio_data import load_speech
from .core.config import DEFAULT_SEQ_LEN
from .core.distributed import shard_batches
from .core.samples import Samples
from .core.structure import vision_modules
from .image_data import is_folder_of_files, load_captioned_images, load_images, spread

__all__ = [
    "calibration_batches",
    "calibration_data",
    "calibration_windows",
    "check_seq_len",
    "dataset_split",
    "load_texts",
    "looks_local",
    "max_positions",
    "resolve_seq_len",
    "tokenize_windows",
]

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "content", "sentence")


def load_texts(dataset, split: str = "train") -> list[str]:
    """Texts from a list of strings, a text file, a folder saved by `datasets`, or a Hub dataset name."""
    if isinstance(dataset, str) or isinstance(dataset, os.PathLike):
        path = os.fspath(dataset)
        if os.path.isfile(path):
            opener = gzip.open if path.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    return [f.read()]
            except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
                raise ValueError(f"{path} is not UTF-8 text (or gzip of it): {e}") from None
        return _column(dataset_split(path, split))
    if isinstance(dataset, Sequence) and all(isinstance(t, str) for t in dataset):
        return list(dataset)
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        return _column(dataset)
    raise TypeError(
        f"`dataset` must be a list of strings, a text file, a `datasets` folder or a Hub dataset name, "
        f"got {type(dataset).__name__}"
    )


def dataset_split(path: str, split: str = "train"):
    """The `split` of the dataset at `path`: a folder saved by `datasets`, or a Hub dataset name."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{path!r} is not a file; reading it as a dataset needs `datasets`: pip install 'hfcompress[datasets]'"
        ) from e
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
    elif looks_local(path):
        raise FileNotFoundError(
            f"dataset {path!r} does not exist (expected a text file, a `datasets` folder or a Hub name)"
        )
    else:
        try:
            loaded = datasets.load_dataset(path, split=split)
        except (ConnectionError, OSError) as e:  # offline, an unreachable endpoint, a name the Hub does not have
            raise FileNotFoundError(
                f"dataset {path!r} is no local file or folder, and loading it from the Hub failed: {e}. Give a local "
                "text file or `datasets` folder, or check the name and the network (HF_ENDPOINT, HF_HUB_OFFLINE)"
            ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"dataset {path!r} has no split {split!r}; it has {list(loaded)}")
        loaded = loaded[split]
    return loaded


def looks_local(path: str) -> bool:
    """Whether `path` can only be a local file or folder (a Hub name is `name` or `org/name`)."""
    return path.startswith((".", "/", "~")) or os.path.splitext(path)[1] != "" or path.count("/") > 1


def _column(ds) -> list[str]:
    for column in TEXT_COLUMNS:
        if column in ds.column_names:
            return [t for t in ds[column] if t]
    raise ValueError(f"the dataset has no text column (looked for {TEXT_COLUMNS}); its columns are {ds.column_names}")


def tokenize_windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate `texts` into one token stream and cut it into non-overlapping windows of `seq_len` tokens."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and len(texts) > 1:
            ids.append(tokenizer.eos_token_id)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


def calibration_batches(windows: torch.Tensor | Samples, num_samples: int, batch_size: int) -> list:
    """`num_samples` windows (images, speech samples) spread evenly over the available ones, grouped into
    batches."""
    if len(windows) < num_samples:
        logger.warning(
            "calibration data holds %d samples, fewer than num_samples=%d; using all", len(windows), num_samples
        )
    return list(windows[spread(len(windows), num_samples)].split(batch_size))


def max_positions(config) -> int | None:
    """The number of positions a model was built for (None where its config does not say)."""
    config = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model, seq_len: int) -> None:
    """Refuse windows longer than the model's positions (a learned position table fails on them, rotary
    positions beyond training are not what the model learned)."""
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and seq_len > limit:
        raise ValueError(f"`seq_len` {seq_len} exceeds the {limit} positions of the model; use at most {limit}")


def resolve_seq_len(model, seq_len: int | None) -> int:
    """`seq_len`, checked against the model's positions; None means the default window (`DEFAULT_SEQ_LEN`, or the
    model's positions if it has fewer)."""
    if seq_len is not None:
        check_seq_len(model, seq_len)
        return seq_len
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and limit < DEFAULT_SEQ_LEN:
        logger.info("windows of %d tokens: the model's positions (the default is %d)", limit, DEFAULT_SEQ_LEN)
        return limit
    return DEFAULT_SEQ_LEN


def calibration_data(model, config, tokenizer=None) -> list[torch.Tensor]:
    """The calibration batches of a calibrated technique's `config` (its `dataset`, `num_samples`, `seq_len`,
    `batch_size`); across processes, this rank's share of them (`core.distributed`). What was really used (the window length, the windows taken, the windows there were) is kept on
    the model as `model.hfcompress_calibration`, for the compression record."""
    windows = calibration_windows(
        model, config.dataset, config.seq_len, tokenizer, config.num_samples, batch_size=config.batch_size
    )
    batches = calibration_batches(windows, config.num_samples, config.batch_size)
    model.hfcompress_calibration = {  # images and speech have no window length
        "seq_len": int(windows.shape[1]) if isinstance(windows, torch.Tensor) and windows.dim() == 2 else None,
        "num_samples": sum(len(b) for b in batches),
        "windows_available": getattr(windows, "available", None) or len(windows),
    }
    return shard_batches(batches)  # across processes, this rank's share


def calibration_windows(
    model, dataset, seq_len: int | None, tokenizer=None, num_samples: int | None = None, batch_size: int = 4
) -> torch.Tensor | Samples:
    """Token windows [n, seq_len] from `dataset`: texts in any form `load_texts` reads (tokenized with
    `tokenizer`, or the one saved with `model`), or a tensor of token ids used as is. Windows longer than the
    model's positions are refused; `seq_len` None is the default window (`resolve_seq_len`). A model that reads
    images (ViT) calibrates on a float tensor of images [n, channels, height, width], or on a folder of image
    files or a `datasets` image dataset (a folder, a Hub name or a `datasets.Dataset`), `num_samples` images of it
    (default: all) prepared by the model's image processor (`image_data`). A speech-to-text model (Whisper)
    calibrates on a folder of audio files, a `datasets` audio dataset (a folder, a Hub name or a `datasets.Dataset`)
    or a float tensor of log-mel features [n, mel bins, frames], `num_samples` of them with the model's own
    transcriptions, decoded `batch_size` at a time (`audio_data.load_speech`). A dual encoder (CLIP) calibrates on
    captioned images: a folder of image files each with a caption file of its name (`a.jpg`, `a.txt`), a `datasets`
    dataset with an image and a caption column, or `core.samples.CaptionedImages` (`image_data.load_captioned_images`)."""
    reads = getattr(model, "main_input_name", "input_ids")
    if reads == "input_features":
        dataset = _files_or_dataset(model, dataset, seq_len, "speech", "a folder of audio files, a `datasets` audio "
                                    "dataset or a float tensor of log-mel features")  # fmt: skip
        return load_speech(dataset, model, num_samples, batch_size)
    if reads == "pixel_values" and (isinstance(dataset, (str, os.PathLike)) or hasattr(dataset, "column_names")):
        dataset = _files_or_dataset(model, dataset, seq_len, "images", "a folder of image files or a `datasets` image "
                                    "dataset")  # fmt: skip
        return load_images(dataset, model.name_or_path, num_samples)
    if isinstance(dataset, torch.Tensor) and dataset.is_floating_point():
        if dataset.dim() != 4 or reads != "pixel_values":
            raise ValueError(
                f"a float `dataset` is images [n, channels, height, width] for a model that reads pixel_values; got "
                f"shape {tuple(dataset.shape)} for {type(model).__name__}, which reads {reads}"
            )
        return dataset
    if reads != "input_ids":
        raise ValueError(
            f"{type(model).__name__} reads {reads}, not token ids: calibrate it on "
            + (
                "images, a folder of image files or a float tensor [n, channels, height, width]"
                if reads == "pixel_values"
                else f"{reads} (not built yet)"
            )
            + "; round-to-nearest (rtn) needs no data"
        )
    config = getattr(model, "config", None)
    if hasattr(config, "vision_config") and hasattr(config, "text_config") and not vision_modules(model):
        dataset = _files_or_dataset(model, dataset, seq_len, "captioned images", "a folder of images with their "
                                    "captions or a `datasets` dataset of captioned images")  # fmt: skip
        return load_captioned_images(dataset, model, num_samples)
    if isinstance(dataset, torch.Tensor) and dataset.dim() == 2:
        check_seq_len(model, dataset.shape[1])
    else:
        seq_len = resolve_seq_len(model, seq_len)
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.shape[1] < 1:
            raise ValueError(f"a token-id `dataset` must be [n_windows, seq_len], got shape {tuple(dataset.shape)}")
        return dataset
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return tokenize_windows(tokenizer, load_texts(dataset), seq_len)


def _files_or_dataset(model, dataset, seq_len: int | None, reads: str, expected: str):
    """`dataset` for a `model` that `reads` images, speech or captioned images: a folder of files or a data
    object as it is, a `datasets` folder or Hub name loaded (`dataset_split`); a file, or a window length, refused."""
    if seq_len is not None:
        raise ValueError(f"`seq_len` ({seq_len}) is a length of text; {type(model).__name__} reads {reads}")
    if not isinstance(dataset, (str, os.PathLike)) or is_folder_of_files(dataset):
        return dataset
    if os.path.isfile(dataset):
        raise ValueError(
            f"{type(model).__name__} reads {reads}: calibrate it on {expected}, not the file {os.fspath(dataset)!r}"
        )
    return dataset_split(os.fspath(dataset))  # a `datasets` folder or a Hub name
