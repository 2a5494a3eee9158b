"""`compress_folder`: a model folder in, a compressed model folder out, with its record and card. The command of
every registered technique and every recipe step that runs one call it."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

from ..core.config import CALIBRATION_FIELDS
from ..core.distributed import barrier, decided_by_main, gathered, is_main, rank, world_size
from ..core.registry import Technique, technique_for
from ..core.streaming import ShardedCheckpoint
from ..core.structure import cast_unquantized
from ..data import looks_local
from ..hub.record import RANK_PEAKS, Step, peak_memory
from ..io import KeptOutputError, claim_output, copy_model_extras, partial_dir, resumable_output_dir
from .loading import (
    DTYPES,
    checkpoint_dtype,
    checkpoint_task,
    load_model,
    load_tokenizer,
    reads_text,
    require_causal_lm,
    require_tokenizer,
)
from .offload import should_stream
from .options import OutputOptions
from .recording import base_record, finish_output, push_output, quality_metrics, write_output

__all__ = ["check_step", "compress_folder"]

logger = logging.getLogger(__name__)


def check_step(technique: Technique, config, step_options: dict) -> dict:
    """The step options with their defaults, after refusing unknown names, bad choices, missing calibration data
    and combinations the technique cannot save; nothing is loaded."""
    unknown = sorted(set(step_options) - set(technique.step_options))
    if unknown:
        allowed = ", ".join(technique.step_options) or "none"
        raise ValueError(f"{technique.name} has no options {unknown} (its options: {allowed})")
    options = {name: option.default for name, option in technique.step_options.items()}
    for name, value in step_options.items():
        choices = technique.step_options[name].choices
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
        options[name] = value
    dataset = getattr(config, "dataset", None)
    if isinstance(dataset, str) and looks_local(dataset) and not os.path.exists(dataset):
        raise FileNotFoundError(
            f"dataset {dataset!r} does not exist (expected a text file, a `datasets` folder or a Hub name)"
        )
    if technique.calibrated(config) and dataset is None:
        raise ValueError(
            f"{technique.method_of(config)} needs calibration data: give `dataset` (--dataset on the command line)"
        )
    if technique.check is not None:
        technique.check(config, **options)
    return options


def compress_folder(
    model: str | os.PathLike, output: str | os.PathLike, config, options: OutputOptions | None = None, **step_options
) -> Path:
    """Compress the model at `model` (a local folder or Hub id) with the technique `config` belongs to and write
    it to `output` as a complete folder: weights (in `format` where the technique offers several), tokenizer,
    compression record and model card; push it when `options.push_to_hub` says so.

    `output` is refused if it exists and is not empty (unless `options.overwrite`) before anything loads, and
    nothing is written to it until the folder is complete. A model hfcompress wrote continues its record.
    """
    model = os.fspath(model)  # a Path is a local folder, recorded as its path
    technique = technique_for(config)
    options = options or OutputOptions()
    step_options = check_step(technique, config, step_options)
    if technique.check_model is not None:
        technique.check_model(model, config, **step_options)
    if options.eval_dataset or options.eval_tasks:
        require_causal_lm(model, _task(model, config), "--eval-dataset and --eval-tasks")
    inputs = [model, getattr(config, "dataset", None), options.eval_dataset]
    stream = should_stream(technique, config, model, options, step_options)
    if world_size() > 1:
        if technique.name not in DISTRIBUTED:
            raise ValueError(
                f"{technique.name} does not run across processes yet (those that do: {', '.join(DISTRIBUTED)})"
            )
        stream = decided_by_main(stream)  # `--offload auto` weighs the memory free now, which each rank sees apart
        if not is_main():  # calibrates its share with the others; rank 0 writes
            _follow(technique, model, output, config, options, step_options, stream)
            return Path(output)
    with claim_output(output, options.overwrite, inputs):
        if stream:
            _warn_dtype_not_applied(model, options.dtype)
            return _compress_streaming(technique, model, output, config, options, step_options)
        return _compress(technique, model, output, config, options, step_options)


# the folder inside OUTPUT's partial folder where a rank other than 0 keeps its activations and progress
RANK_FOLDER = ".hfcompress-rank"

# techniques whose calibration statistics are summed across processes (their Hessians, which AWQ's and the
# codebooks' weights come from, the factorization's sensitivity losses, SmoothQuant's input ranges, structured
# pruning's Taylor importance: `core.distributed`)
DISTRIBUTED = ("gptq", "rtn", "oneshot", "lowrank", "awq", "w8a8", "kmeans", "vq", "structured")


def _warn_dtype_not_applied(model: str, dtype: str) -> None:
    """A streamed run holds each block as stored: say so when `--dtype` asked for another dtype."""
    stored = checkpoint_dtype(model)
    if dtype != "auto" and DTYPES[dtype] != stored:
        logger.warning(
            "--dtype %s does not apply with --offload disk: each block is held as stored (%s), as --dtype auto holds "
            "it (calibration and solves compute in float32 either way)", dtype, str(stored).removeprefix("torch."),
        )  # fmt: skip


def _follow(technique: Technique, model: str, output, config, options: OutputOptions, step_options: dict, stream):
    """A rank other than 0: the same calibration and solves on its share of the data, nothing written. Streamed,
    its activations and progress are kept in a folder of its own inside the folder rank 0 writes OUTPUT in
    (`io.partial_dir`: kept with it when the run is killed, for `--resume`), removed before OUTPUT is published."""
    tokenizer = load_tokenizer(model, required=False)
    if stream:
        barrier()  # rank 0 has made its folder (and removed what a killed run left, unless resuming)
        folder = partial_dir(output) / f"{RANK_FOLDER}{rank()}"
        earlier = options.resume and folder.is_dir()
        folder.mkdir(exist_ok=True)
        technique.stream(
            model,
            folder,
            config,
            tokenizer,
            task=_task(model, config),
            resume=earlier,
            **_streamed(technique, step_options),
        )
        shutil.rmtree(folder)
        _rank_peaks()  # rank 0 publishes OUTPUT after this, recording every rank's peak memory
        return
    loaded = load_model(model, options.dtype, task=_task(model, config))
    technique.run(loaded, config, tokenizer)
    _rank_peaks()


# the folder inside OUTPUT's partial folder where a streamed run writes hfcompress's format before the rewrite
# into another one (`--offload disk --format compressed-tensors`)
STREAMED_FOLDER = ".hfcompress-streamed"


def _rewrites(technique: Technique, step_options: dict) -> bool:
    """Whether a streamed run's checkpoint is rewritten at the end into the format the step options name."""
    format = step_options.get("format", "hfcompress")
    return technique.streamed_format(format) != format


def _task(model: str, config) -> str:
    """The head `model` is compressed with: the config's `task` (structured pruning), else the checkpoint's own."""
    return getattr(config, "task", None) or checkpoint_task(model)


def _streamed(technique: Technique, step_options: dict) -> dict:
    """The step options the streamed run is given: the format it writes (`Technique.streamed_format`)."""
    if "format" not in step_options:
        return step_options
    return {**step_options, "format": technique.streamed_format(step_options["format"])}


def _rewrite(technique: Technique, written: Path, staging: Path, task: str, step_options: dict) -> None:
    """Rewrite the streamed checkpoint in `written` into `staging` in the format of the step options, then remove
    it; where that format cannot hold what only the quantized layers show, say where the streamed run is kept."""
    try:
        technique.rewrite(written, staging, task, **step_options)
    except ValueError as error:
        raise KeptOutputError(
            f"{error}. The streamed checkpoint, in format hfcompress, is kept in {written}: move it out before running "
            "again (a new run removes it)"
        ) from error
    shutil.rmtree(written)


def _rank_peaks() -> dict | None:
    """Across processes, every rank's peak resident memory so far, as `Step.memory` starts it (rank 0 then puts
    its own peak at the end in first place: `finish_output`); None in a single process. Every rank calls it at
    the same point: the others when their work is done, rank 0 before it writes."""
    if world_size() == 1:
        return None
    return {RANK_PEAKS: gathered(peak_memory().get("peak_rss_bytes", 0))}


def _compress_streaming(
    technique: Technique, model: str, output, config, options: OutputOptions, step_options: dict
) -> Path:
    tokenizer = load_tokenizer(model, required=False)
    task = _task(model, config)
    if technique.calibrated(config) and not _is_token_ids(config.dataset) and reads_text(model, task):
        require_tokenizer(tokenizer, model, "the calibration data")
    if options.eval_dataset:
        require_tokenizer(tokenizer, model, "the evaluation data")
    # the model as `from_pretrained` loads it (a pruned model's bitmask layers as such), as a run in memory counts it
    record = base_record(
        ShardedCheckpoint(model).skeleton(task, compressed=True), model, options, tokenizer, streamed=True
    )
    with resumable_output_dir(output, options.overwrite, options.resume) as (staging, earlier):
        barrier()  # across processes: the others keep their progress in `staging` too (`_follow`)
        # blocks are written in hfcompress's format as they are finished; another format is a rewrite at the end
        written = staging / STREAMED_FOLDER if _rewrites(technique, step_options) else staging
        written.mkdir(exist_ok=True)
        start = time.perf_counter()
        compressed = technique.stream(
            model, written, config, tokenizer, task=task, resume=earlier, **_streamed(technique, step_options)
        )
        seconds = time.perf_counter() - start
        rank_peaks = _rank_peaks()  # the others' folders are gone
        logger.info("%s %s streamed from disk in %.1fs", technique.kind, technique.name, seconds)
        technique.check_coverage(compressed, config)
        step = Step(
            technique.record_kind, technique.method_of(config), *_settings(technique, config, compressed), seconds
        )
        step.config["offload"] = "disk"
        if world_size() > 1:
            step.config["processes"] = world_size()
            step.memory = rank_peaks
        quality = quality_metrics(compressed, options, tokenizer, folder=written, streamed=True)
        if written != staging:
            start = time.perf_counter()
            _rewrite(technique, written, staging, task, step_options)
            step.seconds += time.perf_counter() - start  # the step wrote this format: its time counts
        copy_model_extras(model, staging)
        finish_output(record, step, compressed, options, staging, quality, streamed=True)
    logger.info("wrote %s", output)
    push_output(output, options)
    return Path(output)


def _compress(technique: Technique, model: str, output, config, options: OutputOptions, step_options: dict) -> Path:
    tokenizer = load_tokenizer(model, required=False)  # RTN, bitsandbytes, magnitude pruning read no text
    task = _task(model, config)
    if technique.calibrated(config) and not _is_token_ids(config.dataset) and reads_text(model, task):
        require_tokenizer(tokenizer, model, "the calibration data")
    if options.eval_dataset or options.eval_tasks:
        require_tokenizer(tokenizer, model, "the evaluation data")
    loaded = load_model(model, options.dtype, task=task)
    record = base_record(loaded, model, options, tokenizer)
    start = time.perf_counter()
    compressed = technique.run(loaded, config, tokenizer)
    seconds = time.perf_counter() - start
    rank_peaks = _rank_peaks()
    logger.info("%s %s in %.1fs", technique.kind, technique.name, seconds)
    if not technique.in_place:
        del loaded
    compressed.eval()
    step = Step(technique.record_kind, technique.method_of(config), *_settings(technique, config, compressed), seconds)
    if world_size() > 1:
        step.config["processes"] = world_size()
        step.memory = rank_peaks
    quality = quality_metrics(compressed, options, tokenizer)
    if technique.before_save is not None:
        technique.before_save(compressed, config, **step_options)
    if technique.cast:  # what stayed dense goes back to the checkpoint's own dtype (often float16)
        cast_unquantized(compressed, checkpoint_dtype(model))
    save = None if technique.save is None else functools.partial(_save_with, technique.save, step_options)
    return write_output(compressed, model, output, tokenizer, record, step, options, quality, save=save)


def _is_token_ids(dataset) -> bool:
    return hasattr(dataset, "dim")  # a tensor of token ids [n, seq_len]


def _save_with(save, step_options: dict, model, folder) -> None:
    save(model, folder, **step_options)


def _settings(technique: Technique, config, model) -> tuple[dict, dict | None]:
    """The step's settings and its calibration data, as the record keeps them: the window length and the number
    of windows really used (the defaults resolved against the model and the data), and how many there were."""
    settings = config.to_dict()
    data = {k: settings.pop(k) for k in CALIBRATION_FIELDS if k in settings}
    data.update(getattr(model, "hfcompress_calibration", None) or {})
    if getattr(model, "hfcompress_coverage", None):
        settings["coverage"] = model.hfcompress_coverage
    if technique.record is not None:
        settings.update(technique.record(model, config))
    return settings, (data if technique.calibrated(config) else None)
