"""Images for calibration: a folder of image files or a `datasets` image dataset, prepared by the model's own
image processor (its `preprocessor_config.json`), as the model's pipeline prepares them; for a dual encoder
(CLIP), with their captions, tokenized by the model's own tokenizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from .core.samples import CaptionedImages

__all__ = ["IMAGE_SUFFIXES", "image_files", "is_folder_of_files", "load_captioned_images", "load_images", "spread"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under `folder` (its subfolders too, as an image-folder dataset keeps one per class),
    in a fixed order."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(
            f"calibration images are a folder of image files ({', '.join(IMAGE_SUFFIXES)}); "
            f"{os.fspath(folder)!r} is not a folder"
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {os.fspath(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def spread(available: int, wanted: int) -> torch.Tensor:
    """The indices of `wanted` of `available` items spread evenly over them (all of them if there are fewer)."""
    if available <= wanted:
        return torch.arange(available)
    return torch.linspace(0, available - 1, wanted).round().long()


DATASETS_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes


def is_folder_of_files(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder of files (images, audio) rather than a folder `datasets` saved."""
    return os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in DATASETS_FILES)


def load_images(source, model_path: str | os.PathLike, num_samples: int | None) -> torch.Tensor:
    """`num_samples` images (None: all) spread evenly over `source`, a folder of image files (`image_files`) or a
    `datasets.Dataset` with an image column, as the float tensor [n, channels, height, width] the image processor
    saved with `model_path` makes of them."""
    processor = _image_processor(model_path)
    rows = hasattr(source, "column_names")
    images = _dataset_images(source, num_samples) if rows else _open(_spread_files(image_files(source), num_samples))
    where = f"a dataset of {len(source)} rows" if rows else os.fspath(source)
    logger.info("%d calibration images from %s, prepared by %s", len(images), where, type(processor).__name__)
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def _spread_files(files: list[Path], num_samples: int | None) -> list[Path]:
    return files if num_samples is None else [files[i] for i in spread(len(files), num_samples).tolist()]


def _open(files: list[Path]) -> list:
    """The image files as RGB images."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError("reading calibration images needs Pillow: pip install 'hfcompress[images]'") from e

    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"calibration image {os.fspath(file)!r} cannot be read: {e}") from e
    return images


def _dataset_images(dataset, num_samples: int | None) -> list:
    """The images of the rows of `dataset` spread evenly over it, from its column of `datasets.Image` feature."""
    import datasets

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise ValueError(
            f"the dataset has no image column (a `datasets.Image` feature); its columns are {dataset.column_names}"
        )
    rows = range(len(dataset)) if num_samples is None else spread(len(dataset), num_samples).tolist()
    return [image.convert("RGB") for image in dataset.select(rows)[columns[0]]]


CAPTION_COLUMNS = ("caption", "text", "sentence")


def load_captioned_images(source, model, num_samples: int | None) -> CaptionedImages:
    """`num_samples` captioned images (None: all) spread evenly over `source`, for a dual encoder `model` (CLIP):
    a folder of image files each with its caption in a text file of the same name (`cat.jpg`, `cat.txt`), a
    `datasets.Dataset` with an image column and a caption column (`CAPTION_COLUMNS`), or `CaptionedImages` as
    the model reads them. Images are prepared by the image processor saved with the model, captions tokenized by
    its tokenizer (padded at the end, cut to its text positions)."""
    if isinstance(source, CaptionedImages):
        chosen = source if num_samples is None else source[spread(len(source), num_samples)]
        return CaptionedImages(chosen.input_ids, chosen.attention_mask, chosen.pixel_values, len(source))
    processor = _image_processor(model.name_or_path)
    if hasattr(source, "column_names"):
        images, captions = _dataset_captioned(source, num_samples)
        available = len(source)
    else:
        images, captions, available = _files_captioned(source, num_samples)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {os.fspath(model.name_or_path)!r} has no tokenizer for the captions") from e
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    text = tokenizer(captions, padding=True, truncation=True, max_length=positions, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    logger.info("%d captioned calibration images of %d", len(images), available)
    return CaptionedImages(text["input_ids"], text["attention_mask"], pixels, available)


def _image_processor(model_path):
    try:
        return AutoImageProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {os.fspath(model_path)!r} has no image processor to prepare the calibration images "
            "(preprocessor_config.json); save it beside the model (processor.save_pretrained)"
        ) from e


def _files_captioned(folder, num_samples: int | None) -> tuple[list, list[str], int]:
    files = image_files(folder)
    uncaptioned = [f for f in files if not f.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} of the {len(files)} images under {os.fspath(folder)!r} have no caption: a dual "
            f"encoder calibrates on images with their captions, each in a text file of the image's name (e.g. "
            f"{os.fspath(uncaptioned[0].with_suffix('.txt'))!r})"
        )
    chosen = _spread_files(files, num_samples)
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in chosen]
    return _open(chosen), captions, len(files)


def _dataset_captioned(dataset, num_samples: int | None) -> tuple[list, list[str]]:
    captions = [c for c in CAPTION_COLUMNS if c in dataset.column_names]
    if not captions:
        raise ValueError(
            f"the dataset has no caption column ({', '.join(CAPTION_COLUMNS)}) beside its images; its columns are "
            f"{dataset.column_names}"
        )
    rows = range(len(dataset)) if num_samples is None else spread(len(dataset), num_samples).tolist()
    return _dataset_images(dataset, num_samples), [str(t) for t in dataset.select(rows)[captions[0]]]
