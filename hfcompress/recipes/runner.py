"""Checking a recipe as a whole, then running its steps one after the other, each into its own folder."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any

from ..core.config import warn_deprecated
from ..core.registry import Technique, resolve_technique
from ..data import looks_local
from ..hub.card import generate_card
from ..hub.record import CompressionRecord, command_line
from ..io import atomic_output_dir, claim_output, resumable_output_dir
from ..steps import DistillArguments, OutputOptions, check_step, compress_folder, distill_folder, merge_lora_folder
from ..steps.loading import resolve_model_path
from ..steps.merge import parse_rank
from ..steps.offload import parse_size, streaming_refusal
from .recipe import DEFAULT_METHODS, Recipe, RecipeError, RecipeStep

__all__ = ["PreparedStep", "run_recipe", "validate_recipe"]

logger = logging.getLogger(__name__)

STEP_MARKER = "recipe_step.json"
# distillation options the runner owns: checkpoints of a step would outlive it
_DISTILL_OWNED = {"checkpoint_dir", "resume"}
OFFLOAD = ("auto", "none", "disk")


@dataclasses.dataclass
class PreparedStep:
    """A validated step: the technique and config it runs (or the arguments of a distill / merge_lora step), the
    step options, and the dtype it loads its model in (None: the run's)."""

    index: int
    step: RecipeStep
    config: Any
    technique: Technique | None = None
    step_options: dict[str, str] = dataclasses.field(default_factory=dict)
    dtype: str | None = None

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-{self.step.name}"

    def run(self, source: str, folder: Path, options: OutputOptions) -> None:
        if self.step.kind == "distill":
            distill_folder(source, folder, self.config, options)
        elif self.step.kind == "merge_lora":
            merge_lora_folder(source, self.config["adapter"], folder, self.config["rank"], options)
        else:
            compress_folder(source, folder, self.config, options, **self.step_options)


def _check_type(where: str, key: str, value, hint) -> None:
    """Refuse a value whose type the field cannot hold (the config's own checks cover the ranges)."""
    if value is None:
        return
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else typing.Any
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise RecipeError(
                f"{where}: `{key}` must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}"
            )
    elif hint is bool and not isinstance(value, bool):
        raise RecipeError(f"{where}: `{key}` must be true or false, got {value!r}")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(f"{where}: `{key}` must be an integer, got {value!r}")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RecipeError(f"{where}: `{key}` must be a number, got {value!r}")


def _fields(where: str, cls, settings: dict) -> dict:
    """`settings` as keyword arguments of dataclass `cls`: deprecated names renamed (a comma-separated string
    becomes a list where the field is one), types checked, unknown names refused."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in settings.items():
        if key in getattr(cls, "aliases", {}):
            new = cls.aliases[key]
            warn_deprecated(where, key, new)
            if isinstance(value, str) and typing.get_origin(hints[new]) in (list, typing.Union, types.UnionType):
                value = [v.strip() for v in value.split(",") if v.strip()]
            key = new
        if key not in names:
            raise RecipeError(f"{where}: unknown field {key!r}; it takes {', '.join(sorted(names))}")
        _check_type(where, key, value, hints[key])
        kwargs[key] = value
    return kwargs


def _prepare(index: int, step: RecipeStep, recipe: Recipe, is_last: bool) -> PreparedStep:
    settings = dict(step.settings)
    dtype = settings.pop("dtype", None)
    if dtype is not None and dtype not in typing.get_args(typing.get_type_hints(OutputOptions)["dtype"]):
        raise RecipeError(
            f"step {index} ({step.name}): `dtype` must be float32, float16, bfloat16 or auto, got {dtype!r}"
        )
    if step.kind == "distill":
        return _prepare_distill(index, step, recipe, settings, dtype)
    if step.kind == "merge_lora":
        return _prepare_merge(index, step, settings, dtype)
    where = f"step {index} ({step.kind})"
    method = settings.get("method", DEFAULT_METHODS.get(step.kind))
    try:
        technique = resolve_technique(step.kind, method)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None
    config_cls = technique.config_class
    if method is not None and "method" in {f.name for f in dataclasses.fields(config_cls)}:
        settings["method"] = method  # the variant of the technique (sparsegpt, whiten)
    else:
        settings.pop("method", None)  # the technique's own name (gptq, structured)
    where = f"step {index} ({step.name})"
    step_options = {k: settings.pop(k) for k in list(settings) if k in technique.step_options}
    kwargs = _fields(where, config_cls, settings)
    if "dataset" in {f.name for f in dataclasses.fields(config_cls)} and kwargs.get("dataset") is None:
        kwargs["dataset"] = recipe.dataset
    for name, option in technique.step_options.items():
        if name not in step_options and option.between_steps is not None and not is_last:
            step_options[name] = option.between_steps  # what the next step can read
    try:
        config = config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e
    if technique.calibrated(config) and getattr(config, "dataset", None) is None:
        raise RecipeError(f"{where} needs data: set `dataset` in the step or at the top of the recipe")
    try:
        step_options = check_step(technique, config, step_options)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e
    _check_path(where, "dataset", getattr(config, "dataset", None))
    return PreparedStep(index, step, config, technique, step_options, dtype)


def _prepare_distill(index, step, recipe, settings, dtype) -> PreparedStep:
    where = f"step {index} (distill)"
    owned = sorted(set(settings) & _DISTILL_OWNED)
    if owned:
        raise RecipeError(f"{where}: {owned} belong to the recipe runner, not to a step")
    kwargs = _fields(where, DistillArguments, settings)
    kwargs.setdefault("dataset", recipe.dataset)
    try:
        arguments = DistillArguments(**kwargs)
        arguments.loss()
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e
    _check_path(where, "dataset", arguments.dataset)
    return PreparedStep(index, step, arguments, dtype=dtype)


def _prepare_merge(index, step, settings, dtype) -> PreparedStep:
    where = f"step {index} (merge-lora)"
    unknown = sorted(set(settings) - {"adapter", "rank"})
    if unknown:
        raise RecipeError(f"{where}: unknown field {unknown[0]!r}; it takes adapter, rank")
    adapter = settings.get("adapter")
    if not adapter:
        raise RecipeError(f"{where}: `adapter` (a peft adapter folder or Hub id) is required")
    if looks_local(adapter) and not os.path.isdir(adapter):
        raise RecipeError(f"{where}: adapter folder {adapter!r} does not exist")
    try:
        rank = parse_rank(settings.get("rank", "original"))
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e
    return PreparedStep(index, step, {"adapter": adapter, "rank": rank}, dtype=dtype)


def _check_path(where: str, key: str, path) -> None:
    if isinstance(path, str) and looks_local(path) and not os.path.exists(path):
        raise RecipeError(f"{where}: {key} {path!r} does not exist")


def _check_order(prepared: list[PreparedStep]) -> None:
    """Refuse orders that cannot work, saying why; warn about those that work but lose something."""
    seen: dict[str, int] = {}
    for p in prepared:
        step, where = p.step, f"step {p.index} ({p.step.name})"
        if "quantize" in seen:
            raise RecipeError(
                f"{where} comes after step {seen['quantize']} (quantize): quantized weights cannot be "
                f"{'quantized again' if step.kind == 'quantize' else 'changed by ' + step.kind}; put quantization last"
            )
        if step.kind == "distill" and p.index != 1:
            raise RecipeError(
                f"{where}: distillation must be the first step (its student is copied from the teacher's blocks and "
                "trained in full precision); compress the student in the steps after it"
            )
        if p.step_options.get("format") == "compressed-tensors" and "factorize" in seen:
            raise RecipeError(
                f"{where}: format compressed-tensors cannot hold the factorized layers of step {seen['factorize']}; "
                "leave `format` unset (hfcompress's)"
            )
        if step.kind == "factorize" and "factorize" in seen:
            raise RecipeError(
                f"{where}: the model is already factorized by step {seen['factorize']}; use one factorize step"
            )
        if step.kind == "prune" and "factorize" in seen:
            raise RecipeError(
                f"{where}: pruning after step {seen['factorize']} (factorize) would prune the factors; prune first"
            )
        if step.kind == "merge_lora" and "prune" in seen:
            raise RecipeError(
                f"{where}: merging an adapter after step {seen['prune']} (prune) refills the pruned weights; merge first"
            )
        if step.kind == "factorize" and "prune" in seen:
            previous = prepared[seen["prune"] - 1]
            if previous.step_options.get("storage") == "bitmask":
                raise RecipeError(
                    f"{where}: step {previous.index} stores its layers as bitmasks, which factorization cannot read; "
                    "leave its `storage` unset (dense between steps)"
                )
            logger.warning(
                "%s factorizes the pruned weights of step %d: the factors are dense, so the sparsity itself does not "
                "survive, only its effect on the weights",
                where,
                seen["prune"],
            )
        seen[step.kind] = p.index


def _check_streaming(prepared: list[PreparedStep]) -> None:
    """With `--offload disk`, refuse a step that cannot stream its model from disk, naming it and why."""
    for p in prepared:
        where = f"step {p.index} ({p.step.name})"
        if p.technique is None:
            raise RecipeError(
                f"{where} cannot run with --offload disk: it {'trains' if p.step.kind == 'distill' else 'merges'} "
                "with the whole model in memory; use --offload auto (streams the steps that need it) or none"
            )
        reason = streaming_refusal(p.technique, p.config, OutputOptions(offload="disk"), p.step_options)
        if reason is not None:
            raise RecipeError(f"{where}: {reason}")


def validate_recipe(recipe: Recipe, offload: str = "auto") -> list[PreparedStep]:
    """Every step's fields, values, data and the order of steps, checked without loading anything; with `offload`
    "disk", that every step can stream its model from disk."""
    if offload not in OFFLOAD:
        raise RecipeError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    last = len(recipe.steps)
    prepared = [_prepare(i, step, recipe, i == last) for i, step in enumerate(recipe.steps, 1)]
    _check_order(prepared)
    if offload == "disk":
        _check_streaming(prepared)
    return prepared


def run_recipe(
    recipe: Recipe | str | os.PathLike | list,
    model: str,
    output: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    dtype: str = "auto",
    offload: str = "auto",
    max_memory: str | None = None,
) -> Path:
    """Run `recipe` (a `Recipe`, a YAML path, or a list of configs) on `model`; returns the output folder.

    Each step writes a complete model to `OUTPUT/steps/NN-name/` (with its compression record); the last one is
    copied to `OUTPUT` with the whole chain in its record and card, and `OUTPUT/recipe.yaml` keeps the recipe.
    With `resume`, steps whose folder was completed with the same recipe up to and including them are reused.
    `dtype`: what each step holds its model's weights in, unless the step names its own (default auto: the
    checkpoint's, as the command's `--dtype`; the maths run in float32 either way).

    `offload` is every step's `--offload`: "disk" streams each step's model from the previous step's shards one
    block at a time (every step must be able to: refused before any starts otherwise), and a killed run keeps its
    finished steps and the streamed step's finished blocks beside OUTPUT for `resume`; "auto" streams a step
    whose model would not fit in `max_memory` (default: the memory available when it starts).
    """
    recipe_file = recipe if isinstance(recipe, (str, os.PathLike)) else None
    if recipe_file is not None:
        recipe = Recipe.from_yaml(recipe_file)
    elif isinstance(recipe, list):
        recipe = Recipe.from_configs(recipe)
    prepared = validate_recipe(recipe, offload)
    if max_memory is not None:
        parse_size(max_memory)
    resolve_model_path(model)
    output = Path(output)
    inputs = [model, recipe_file, recipe.dataset, recipe.eval_dataset, *(i for p in prepared for i in _inputs_of(p))]
    run = functools.partial(_run_steps, recipe, prepared, model, quiet=quiet, dtype=dtype, offload=offload,
                            max_memory=max_memory)  # fmt: skip
    with claim_output(output, overwrite=True, inputs=inputs):  # _resuming decides what may be replaced
        if _resuming(output, resume, overwrite):
            # completed steps are what a resume reuses; the model, record and recipe.yaml change only at the end
            run(output, resume=True)
        elif offload == "disk":  # a killed run keeps what it finished, for `resume`
            with resumable_output_dir(output, overwrite=True, resume=resume) as (staging, earlier):
                run(staging, resume=earlier)
        else:  # OUTPUT is replaced only when every step has succeeded
            with atomic_output_dir(output, overwrite=True) as staging:
                run(staging, resume=False)
    logger.info("wrote %s", output)
    return output


def _inputs_of(prepared: PreparedStep) -> list:
    """What a step reads besides the model before it: its data, adapter or student."""
    if isinstance(prepared.config, dict):
        return [prepared.config.get("adapter")]
    return [getattr(prepared.config, "student", None), getattr(prepared.config, "dataset", None)]


def _resuming(output: Path, resume: bool, overwrite: bool) -> bool:
    """Whether the run continues the recipe in OUTPUT; refuses an OUTPUT it may not replace. Changes nothing."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {os.fspath(output)!r} exists and is not a folder")
    if not (output.is_dir() and any(output.iterdir())):
        return False
    if resume:
        if not (output / "steps").is_dir():
            raise FileExistsError(f"{os.fspath(output)!r} is not empty and holds no recipe steps to resume")
        return True
    if not overwrite:
        raise FileExistsError(
            f"output folder {os.fspath(output)!r} exists and is not empty: pass --resume to continue its recipe, "
            "or --overwrite to start over"
        )
    return False


def _run_steps(
    recipe: Recipe, prepared: list[PreparedStep], model: str, output: Path, resume: bool, quiet: bool, dtype: str,
    offload: str, max_memory: str | None,
) -> None:  # fmt: skip
    fingerprints = recipe.step_fingerprints()
    current = model
    for p, fingerprint in zip(prepared, fingerprints, strict=True):
        folder = output / "steps" / p.folder_name
        marker = folder / STEP_MARKER
        if (
            resume
            and marker.is_file()
            and json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        ):
            logger.info("step %d (%s): done before with the same settings, reusing %s", p.index, p.step.name, folder)
            current = os.fspath(folder)
            continue
        logger.info("step %d/%d: %s", p.index, len(prepared), p.step.name)
        streams = p.technique is not None  # distill and merge_lora load their model whole
        options = OutputOptions(
            overwrite=True, dtype=p.dtype or dtype, eval_dataset=recipe.eval_dataset, eval_seq_len=recipe.eval_seq_len,
            eval_max_windows=recipe.eval_max_windows, quiet=quiet, offload=offload if streams else "none",
            max_memory=max_memory, resume=resume and offload == "disk",
        )  # fmt: skip
        start = time.perf_counter()
        p.run(current, folder, options)
        marker.write_text(
            json.dumps({"index": p.index, "step": p.step.to_dict(), "fingerprint": fingerprint,
                        "seconds": time.perf_counter() - start}, indent=2, default=str) + "\n",
            encoding="utf-8",
        )  # fmt: skip
        current = os.fspath(folder)
    _publish(Path(current), output)
    (output / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")


def _publish(last: Path, output: Path) -> None:
    """Copy the last step's model into OUTPUT with the recipe command in its record, then its card."""
    for item in last.iterdir():
        if item.name == STEP_MARKER:
            continue
        target = output / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    record = CompressionRecord.load(output)
    record.command = command_line()
    record.save(output)
    generate_card(output)
