"""Checking a recipe as a whole, then running its steps one after the other, each into its own folder."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .recipe import (
    _PRUNE_METHODS,
    _QUANTIZE_METHODS,
    _RUNNER_OWNED,
    Recipe,
    RecipeError,
    RecipeStep,
    command_for,
    namespace_defaults,
)

__all__ = ["PreparedStep", "run_recipe", "validate_recipe"]

logger = logging.getLogger(__name__)

STEP_MARKER = "recipe_step.json"
_HANDLER = "_hfcompress_handler"


@dataclasses.dataclass
class PreparedStep:
    index: int
    step: RecipeStep
    args: argparse.Namespace

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-{self.step.name}"


def _config_class(step: RecipeStep):
    from ..distillation.config import DistillationConfig
    from ..lowrank.config import LowRankConfig
    from ..pruning.oneshot import OneShotPruningConfig
    from ..quantization.bnb import BnbConfig
    from ..quantization.codebook_config import KMeansConfig, VQConfig
    from ..quantization.config import GPTQConfig, RTNConfig

    if step.kind == "quantize":
        return {"gptq": GPTQConfig, "rtn": RTNConfig, "kmeans": KMeansConfig, "vq": VQConfig, "bnb": BnbConfig}[
            step.method
        ]
    if step.kind == "prune":
        return None if step.method == "structured" else OneShotPruningConfig
    return {"factorize": LowRankConfig, "distill": DistillationConfig}.get(step.kind)


def _check_value(where: str, key: str, value, action: argparse.Action) -> None:
    if action.choices is not None and value not in action.choices:
        raise RecipeError(f"{where}: `{key}` must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: `{key}` must be true or false, got {value!r}")
    elif action.type in (int, float) and value is not None:
        ok = isinstance(value, int) if action.type is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise RecipeError(
                f"{where}: `{key}` must be {'an integer' if action.type is int else 'a number'}, got {value!r}"
            )


def _prepare(index: int, step: RecipeStep, recipe: Recipe, is_last: bool, parser) -> PreparedStep:
    where = f"step {index} ({step.kind})"
    settings = dict(step.settings)
    if step.kind == "quantize" and step.method not in _QUANTIZE_METHODS:
        raise RecipeError(f"{where}: `method` must be one of {', '.join(_QUANTIZE_METHODS)}, got {step.method!r}")
    if step.kind == "prune":
        settings.setdefault("method", "magnitude")
        if settings["method"] not in _PRUNE_METHODS:
            raise RecipeError(
                f"{where}: `method` must be one of {', '.join(_PRUNE_METHODS)}, got {settings['method']!r}"
            )
        step = RecipeStep(step.kind, settings)
    where = f"step {index} ({step.name})"
    args, actions = namespace_defaults(parser, command_for(step))
    config_cls = _config_class(step)
    config_fields = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set()
    allowed = (set(actions) | config_fields) - _RUNNER_OWNED
    if config_cls is not None and "method" in config_fields:
        allowed.add("method")
    for key, value in settings.items():
        if key == "method" and step.kind in ("quantize", "prune"):
            continue
        if key not in allowed:
            raise RecipeError(f"{where}: unknown field {key!r}; {step.kind} takes {', '.join(sorted(allowed))}")
        if key in actions:
            _check_value(where, key, value, actions[key])
        setattr(args, key, value)
    if step.kind == "quantize":
        args.method = step.method  # the subcommand (`run_codebook` reads it)
    elif "method" in config_fields:
        args.method = settings.get("method", config_cls.__dataclass_fields__["method"].default)
    if "dataset" in actions and getattr(args, "dataset", None) is None and recipe.dataset is not None:
        args.dataset = recipe.dataset
    if step.kind == "prune" and step.method != "structured" and "storage" not in settings:
        args.storage = "bitmask" if is_last else "dense"  # a later step reads plain weights (zeros kept)
    _check_config(where, step, args, config_cls)
    _check_data(where, step, args)
    return PreparedStep(index, step, args)


def _check_config(where: str, step: RecipeStep, args: argparse.Namespace, config_cls) -> None:
    from ..commands.arguments import config_kwargs

    try:
        if step.kind == "distill":
            from ..commands.distill import parse_pairs
            from ..distillation.config import DistillationConfig

            DistillationConfig(
                temperature=args.temperature, alpha_kd=args.alpha_kd, alpha_task=args.alpha_task,
                hidden_states=parse_pairs(args.hidden_states), hidden_loss=args.hidden_loss,
            )  # fmt: skip
            if (args.student is None) == (args.student_layers is None):
                raise ValueError("give exactly one of `student_layers` or `student`")
        elif config_cls is not None:
            kwargs = config_kwargs(args, config_cls)
            if step.kind == "quantize" and step.method == "bnb":
                skip = args.skip_modules.split(",") if isinstance(args.skip_modules, str) else args.skip_modules
                kwargs = {"bits": args.bits, "quant_type": args.quant_type, "double_quant": args.double_quant,
                          "compute_dtype": args.compute_dtype, "skip_modules": skip}  # fmt: skip
            config_cls(**kwargs)
        if step.kind == "prune" and step.method == "structured":
            for name in ("heads", "ffn"):
                if not 0.0 <= getattr(args, name) < 1.0:
                    raise ValueError(f"`{name}` must be a fraction in [0, 1), got {getattr(args, name)}")
            if args.heads == 0 and args.ffn == 0:
                raise ValueError("nothing to prune: give `heads` and/or `ffn`")
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e


def _needs_data(step: RecipeStep, args: argparse.Namespace) -> bool:
    if step.kind == "quantize":
        return step.method == "gptq"
    if step.kind == "prune":
        return step.method in ("wanda", "sparsegpt")
    if step.kind == "factorize":
        return args.method != "svd" or (args.param_ratio is not None and args.allocation == "sensitivity")
    return step.kind == "distill"


def _check_data(where: str, step: RecipeStep, args: argparse.Namespace) -> None:
    dataset = getattr(args, "dataset", None)
    if _needs_data(step, args) and dataset is None:
        raise RecipeError(f"{where} needs data: set `dataset` in the step or at the top of the recipe")
    if isinstance(dataset, str) and looks_local(dataset) and not os.path.exists(dataset):
        raise RecipeError(f"{where}: dataset {dataset!r} does not exist")
    if step.kind == "merge_lora":
        adapter = getattr(args, "adapter", None)
        if not adapter:
            raise RecipeError(f"{where}: `adapter` (a peft adapter folder or Hub id) is required")
        if looks_local(adapter) and not os.path.isdir(adapter):
            raise RecipeError(f"{where}: adapter folder {adapter!r} does not exist")


def looks_local(path: str) -> bool:
    """Whether `path` can only be a local file or folder (a Hub name is `name` or `org/name`)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith((".txt", ".gz", ".jsonl", ".json"))


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
            if getattr(previous.args, "storage", None) == "bitmask":
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


def validate_recipe(recipe: Recipe) -> list[PreparedStep]:
    """Every step's fields, values, data and the order of steps, checked without loading anything."""
    from ..commands.cli import build_parser

    parser = build_parser()
    last = len(recipe.steps)
    prepared = [_prepare(i, step, recipe, i == last, parser) for i, step in enumerate(recipe.steps, 1)]
    _check_order(prepared)
    return prepared


def _prepare_output(output: Path, resume: bool, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {os.fspath(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if resume:
            if not (output / "steps").is_dir():
                raise FileExistsError(f"{os.fspath(output)!r} is not empty and holds no recipe steps to resume")
            return
        if not overwrite:
            raise FileExistsError(
                f"output folder {os.fspath(output)!r} exists and is not empty: pass --resume to continue its recipe, "
                "or --overwrite to start over"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def run_recipe(
    recipe: Recipe | str | os.PathLike | list,
    model: str,
    output: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    dtype: str = "float32",
) -> Path:
    """Run `recipe` (a `Recipe`, a YAML path, or a list of configs) on `model`; returns the output folder.

    Each step writes a complete model to `OUTPUT/steps/NN-name/` (with its compression record); the last one is
    copied to `OUTPUT` with the whole chain in its record and card, and `OUTPUT/recipe.yaml` keeps the recipe.
    With `resume`, steps whose folder was completed with the same recipe up to and including them are reused.
    """
    from ..commands.loading import resolve_model_path

    if isinstance(recipe, (str, os.PathLike)):
        recipe = Recipe.from_yaml(recipe)
    elif isinstance(recipe, list):
        recipe = Recipe.from_configs(recipe)
    prepared = validate_recipe(recipe)
    resolve_model_path(model)
    output = Path(output)
    _prepare_output(output, resume, overwrite)
    (output / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    fingerprints = recipe.step_fingerprints()
    current = model
    for p, fingerprint in zip(prepared, fingerprints):
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
        args = argparse.Namespace(**vars(p.args))
        if p.step.kind == "distill":
            args.teacher = current
        else:
            args.model = current
        args.output, args.overwrite, args.quiet, args.dtype = os.fspath(folder), True, quiet, dtype
        args.eval_dataset, args.eval_seq_len = recipe.eval_dataset, recipe.eval_seq_len
        args.eval_max_windows, args.push_to_hub, args.private = recipe.eval_max_windows, None, False
        start = time.perf_counter()
        module_name, _, function = getattr(args, _HANDLER).partition(":")
        getattr(importlib.import_module(module_name), function)(args)
        marker.write_text(
            json.dumps({"index": p.index, "step": p.step.to_dict(), "fingerprint": fingerprint,
                        "seconds": time.perf_counter() - start}, indent=2, default=str) + "\n",
            encoding="utf-8",
        )  # fmt: skip
        current = os.fspath(folder)
    _publish(Path(current), output)
    logger.info("wrote %s", output)
    return output


def _publish(last: Path, output: Path) -> None:
    """Copy the last step's model into OUTPUT with the recipe command in its record, then its card."""
    from ..hub.card import generate_card
    from ..hub.record import CompressionRecord, command_line

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
