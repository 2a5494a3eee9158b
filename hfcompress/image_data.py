"""Images for calibration: a folder of image files, read with PIL and prepared by the model's own image
processor (its `preprocessor_config.json`), as the model's pipeline prepares them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoImageProcessor

__all__ = ["IMAGE_SUFFIXES", "image_files", "load_images", "spread"]

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


def load_images(folder: str | os.PathLike, model_path: str | os.PathLike, num_samples: int | None) -> torch.Tensor:
    """`num_samples` images of `folder` (None: all), spread evenly over its files, as the float tensor [n,
    channels, height, width] the image processor saved with `model_path` makes of them."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError("reading calibration images needs Pillow: pip install 'hfcompress[images]'") from e

    files = image_files(folder)
    chosen = files if num_samples is None else [files[i] for i in spread(len(files), num_samples).tolist()]
    try:
        processor = AutoImageProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {os.fspath(model_path)!r} has no image processor to prepare the calibration images "
            "(preprocessor_config.json); save it beside the model (processor.save_pretrained)"
        ) from e
    images = []
    for file in chosen:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"calibration image {os.fspath(file)!r} cannot be read: {e}") from e
    logger.info("%d of the %d images in %s, prepared by %s", len(images), len(files), folder, type(processor).__name__)
    return processor(images=images, return_tensors="pt")["pixel_values"].float()
