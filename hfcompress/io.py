"""Writing a model folder so that nothing is lost: OUTPUT may not be, contain or lie inside anything the run
reads; one run at a time writes it (a lock beside it); the folder is written to a temporary folder beside it
and moved in when complete; temporary folders that interrupted runs left behind are removed."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

__all__ = [
    "KeptOutputError",
    "atomic_output_dir",
    "check_output_dir",
    "claim_output",
    "copy_model_extras",
    "output_lock",
    "partial_dir",
    "resumable_output_dir",
    "weight_bytes",
]

logger = logging.getLogger(__name__)


class KeptOutputError(ValueError):
    """A failure whose message says itself where the finished work is kept and what to do with it (resuming would
    not help): `resumable_output_dir` then adds no advice of its own."""


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
    "spiece.model",  # T5's sentencepiece vocabulary
    "sentencepiece.bpe.model",  # XLM-RoBERTa's, mBART's
    "normalizer.json",  # Whisper's English text normalizer
    "preprocessor_config.json",  # an image processor's or feature extractor's (ViT, CLIP, Whisper)
    "processor_config.json",  # a processor's own settings (vision-language models)
)


STAGING_MARKER = ".hfcompress-staging"
_HELD: dict[Path, int] = {}  # locks this process holds, with their depth (a step inside a recipe run)


def check_output_dir(
    output: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    needed_bytes: int | None = None,
) -> Path:
    """Refuse, before any work, an OUTPUT that is, contains or lies inside one of the local `inputs` (the model,
    data, adapter, teacher ... the run reads: writing OUTPUT would replace or delete them), one whose nearest
    existing folder cannot be written or has less than `needed_bytes` free, and one that exists and is not an
    empty folder, unless `overwrite`."""
    output = Path(output)
    _check_not_an_input(output, inputs)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {str(output)!r} exists and is a file, not a folder; choose a folder for OUTPUT")
    _check_writable(output, needed_bytes)
    if output.exists():
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output folder {str(output)!r} exists and is not empty; pass --overwrite to replace it"
            )
    return output


def _check_not_an_input(output: Path, inputs) -> None:
    target = output.resolve()
    if Path.cwd().resolve().is_relative_to(target):
        raise ValueError(
            f"output {os.fspath(output)!r} is or contains the current folder; writing it would replace the folder you "
            "are working in: choose a new folder for OUTPUT (nothing was changed)"
        )
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)) or not os.path.exists(item):
            continue  # a Hub id, in-memory data, or nothing
        source = Path(item).resolve()
        if source == target:
            problem = "is"
        elif source.is_relative_to(target):
            problem = "contains"
        elif source.is_dir() and target.is_relative_to(source):
            problem = "lies inside"
        else:
            continue
        raise ValueError(
            f"output {os.fspath(output)!r} {problem} the input {os.fspath(item)!r}, which this run reads; writing it "
            "would replace or delete it: choose an OUTPUT outside every input (nothing was changed)"
        )


def _check_writable(output: Path, needed_bytes: int | None = None) -> None:
    folder = output.resolve()
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {os.fspath(output)!r}: folder {os.fspath(folder)!r} is not writable")
    if needed_bytes:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OSError(
                f"not enough free space for {os.fspath(output)!r}: the run writes up to {needed_bytes / 1e6:,.1f} MB "
                f"(the size of the model's weights) and {os.fspath(folder)!r} has {free / 1e6:,.1f} MB free; free some "
                "space or choose another OUTPUT (nothing was changed)"
            )


def weight_bytes(model: str | os.PathLike | None) -> int | None:
    """The bytes of a local model folder's weight files (what writing a model like it needs at most), or None
    for a Hub id."""
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
        return None
    return sum(p.stat().st_size for p in Path(model).iterdir() if p.suffix in (".safetensors", ".bin"))


@contextmanager
def output_lock(output: str | os.PathLike):
    """Hold the lock of `output` (a file beside it) for the block: a second run writing the same folder is
    refused at once instead of replacing this one's result. Re-entrant within one process."""
    path = Path(output).resolve()
    if fcntl is None or _HELD.get(path):
        _HELD[path] = _HELD.get(path, 0) + 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = path.parent / f".{path.name}.hfcompress-lock"
    descriptor = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FileExistsError(
            f"another hfcompress run is writing {os.fspath(output)!r} (it holds {os.fspath(lock_file)!r}); wait for it "
            "to finish or choose another OUTPUT"
        ) from None
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        lock_file.unlink(missing_ok=True)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


@contextmanager
def claim_output(output: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()):
    """Check `output` (`check_output_dir`, with room for a model as large as the first input, the model) before
    any work, then hold its lock for the whole run (and check again under it: another run may have written it
    meanwhile). Nothing is created before the first check passes."""
    inputs = list(inputs)
    needed = weight_bytes(inputs[0]) if inputs else None
    check_output_dir(output, overwrite, inputs, needed)
    with output_lock(output):
        yield check_output_dir(output, overwrite, inputs, needed)


def _remove_stale_staging(output: Path) -> None:
    """Remove the temporary folders of `output` that interrupted runs left (the lock says no run is writing it):
    only folders that hold this module's marker, never by name alone."""
    stale = [p for p in output.parent.glob(f".{output.name}.*-*") if (p / STAGING_MARKER).is_file()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        logger.warning("removed %d temporary folder(s) of %s left by interrupted runs", len(stale), output)


@contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it is removed.
    The run holds `output`'s lock throughout."""
    with output_lock(output):
        output = check_output_dir(output, overwrite)
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(output)
        with _staged(output, overwrite) as staging:
            yield staging


@contextmanager
def _staged(output: Path, overwrite: bool):
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    (staging / STAGING_MARKER).write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        yield staging
        _publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the complete folder `staging` to `output` (replacing it, when allowed), as an ordinary folder."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    (staging / STAGING_MARKER).unlink()
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    if output.exists():
        check_output_dir(output, overwrite)  # still empty, or ours to replace
        # never marked: killed between the two moves, the old result waits here for the user
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, output)


def partial_dir(output: str | os.PathLike) -> Path:
    """Where a resumable run keeps `output` while it is being written (beside it, hidden)."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


@contextmanager
def resumable_output_dir(output: str | os.PathLike, overwrite: bool = False, resume: bool = False):
    """Like `atomic_output_dir`, but the folder being written is kept when the run fails or is killed (in
    `partial_dir(output)`), for a later run with `resume` to continue, unless it failed before writing anything
    there (a refusal once the model is read); without `resume` a kept folder is removed and the run starts over.
    Yields the folder and whether it holds an earlier run's work."""
    with output_lock(output):
        output = check_output_dir(output, overwrite)
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(output)
        partial = partial_dir(output)
        earlier = partial.is_dir() and (partial / STAGING_MARKER).is_file()
        if earlier and not resume:
            logger.warning("removing the unfinished run kept in %s (pass --resume to continue it instead)", partial)
            shutil.rmtree(partial)
            earlier = False
        elif resume and not earlier:
            logger.info("nothing to resume in %s: starting from the first block", partial)
        partial.mkdir(exist_ok=True)
        (partial / STAGING_MARKER).write_text(f"{os.getpid()}\n", encoding="utf-8")
        try:
            yield partial, earlier
        except BaseException as error:
            if not earlier and all(path.name == STAGING_MARKER for path in partial.iterdir()):
                shutil.rmtree(partial, ignore_errors=True)  # it failed before writing anything: nothing to resume
            elif not isinstance(error, KeptOutputError):
                logger.error(
                    "the finished part of %s is kept in %s: run the same command with --resume to continue", output,
                    partial,
                )  # fmt: skip
            raise
        _publish(partial, output, overwrite)


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
