"""Writing a model folder so that nothing is lost: a temporary folder beside OUTPUT, moved in when complete."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output_dir", "check_output_dir", "copy_model_extras"]

logger = logging.getLogger(__name__)

# Files from the source model folder that belong with the compressed model.
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def check_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an OUTPUT that exists and is not an empty folder, unless `overwrite`."""
    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"output {str(output)!r} exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output folder {str(output)!r} exists and is not empty; pass --overwrite to replace it"
            )
    return output


@contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it is removed."""
    output = check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~umask)
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_model_extras(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation config files of a local model folder; returns the copied names."""
    source, destination = Path(source), Path(destination)
    copied = []
    if not source.is_dir():
        return copied
    for name in EXTRA_FILES:
        if (source / name).is_file() and not (destination / name).exists():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied
