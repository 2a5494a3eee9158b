"""A recipe: compression steps to run in order, validated completely before any of them starts.

Each step names a kind of registered technique (`prune`, `factorize`, `quantize`, or one registered from
outside) with the fields of the technique's config class, its step options and `method` to choose it:

    steps:
      - prune: {method: sparsegpt, sparsity: 0.3}          # OneShotPruningConfig (method structured: heads, ffn)
      - factorize: {param_ratio: 0.85, method: whiten}     # LowRankConfig
      - quantize: {method: gptq, bits: 4, group_size: 128} # GPTQConfig / RTNConfig / KMeansConfig / VQConfig / BnbConfig
    dataset: calib.txt                                      # default `dataset` of every step that takes one

`distill: {student_layers: 6, max_steps: 500, ...}` trains a student of the model so far (`DistillArguments`,
the options of `hfcompress distill`), and `merge_lora: {adapter: PATH, rank: original}` folds in a peft adapter.

In a recipe file, relative paths (`dataset`, `eval_dataset`, a step's `dataset`, `adapter`, `student`, ...) are
relative to the recipe file's folder, not to where the command runs; a name that is no path there (`wikitext`)
stays a Hub dataset name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..core.registry import kinds, resolve_technique, technique_for
from ..data import looks_local

__all__ = ["STEP_KINDS", "Recipe", "RecipeError", "RecipeStep", "step_kinds"]

logger = logging.getLogger(__name__)

# steps that are not a registered technique: they train a student, or fold in an adapter
STEP_KINDS = ("distill", "merge_lora")
TOP_LEVEL = ("steps", "dataset", "eval_dataset", "eval_seq_len", "eval_max_windows")
# the method of a step that names none: pruning without data by default
DEFAULT_METHODS = {"prune": "magnitude"}


def step_kinds() -> tuple[str, ...]:
    """What a recipe step may be: every kind of registered technique, `distill` and `merge_lora`."""
    return (*kinds(), *STEP_KINDS)


class RecipeError(ValueError):
    """A recipe that cannot run, found before any step starts."""


@dataclass
class RecipeStep:
    """One step: `kind` (prune, factorize, quantize, distill, merge_lora) and its `settings` as written."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str | None:
        return self.settings.get("method")

    @property
    def name(self) -> str:
        """`quantize-gptq`, `prune-sparsegpt`, `factorize-whiten`, ... (the step folder's suffix)."""
        kind = self.kind.replace("_", "-")
        if self.kind in STEP_KINDS:
            return kind
        method = self.method or DEFAULT_METHODS.get(self.kind)
        if method is None:
            try:  # a technique whose config's `method` field has a default (factorize: whiten)
                config_fields = dataclasses.fields(resolve_technique(self.kind, None).config_class)
                method = next((f.default for f in config_fields if f.name == "method"), None)
            except ValueError:
                method = None
        return f"{kind}-{method}" if method else kind

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: dict(self.settings)}


@dataclass
class Recipe:
    steps: list[RecipeStep]
    dataset: str | None = None
    eval_dataset: str | None = None
    eval_seq_len: int | None = None
    eval_max_windows: int = 50

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping with `steps:`, got {type(data).__name__}")
        unknown = sorted(set(data) - set(TOP_LEVEL))
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; expected {', '.join(TOP_LEVEL)}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError("`steps:` must be a non-empty list, e.g. `- quantize: {method: gptq, bits: 4}`")
        steps = []
        for i, raw in enumerate(raw_steps, 1):
            if not isinstance(raw, dict) or len(raw) != 1:
                raise RecipeError(f"step {i}: each step is one `technique: {{fields}}` mapping, got {raw!r}")
            ((kind, settings),) = raw.items()
            if kind not in step_kinds():
                raise RecipeError(f"step {i}: unknown technique {kind!r}; expected one of {', '.join(step_kinds())}")
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                raise RecipeError(f"step {i} ({kind}): its fields must be a mapping, got {settings!r}")
            steps.append(RecipeStep(kind, dict(settings)))
        recipe = cls(steps=steps, **{k: data[k] for k in TOP_LEVEL[1:] if k in data})
        for key in ("dataset", "eval_dataset"):
            value = getattr(recipe, key)
            if value is not None and not isinstance(value, str):
                raise RecipeError(f"`{key}` must be a path or a dataset name, got {value!r}")
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file {os.fspath(path)!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{os.fspath(path)} is not valid YAML: {e}") from e
        recipe = cls.from_dict(data)
        recipe.resolve_paths(os.path.dirname(os.path.abspath(path)))
        return recipe

    def resolve_paths(self, folder: str) -> None:
        """Make the relative paths of the recipe relative to `folder` (the recipe file's)."""
        self.dataset = _resolved(self.dataset, folder)
        self.eval_dataset = _resolved(self.eval_dataset, folder)
        for step in self.steps:
            for key in PATH_FIELDS:
                if key in step.settings:
                    step.settings[key] = _resolved(step.settings[key], folder)

    @classmethod
    def from_configs(cls, steps: list, dataset: str | None = None, **kwargs) -> Recipe:
        """A recipe from hfcompress config objects (`OneShotPruningConfig`, `LowRankConfig`, `GPTQConfig`, ...)
        and `{"distill": {...}}` / `{"merge_lora": {...}}` mappings, in order."""
        return cls.from_dict({"steps": [_step_of(s) for s in steps], "dataset": dataset, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"steps": [s.to_dict() for s in self.steps]}
        for key in TOP_LEVEL[1:]:
            value = getattr(self, key)
            if value != Recipe.__dataclass_fields__[key].default:
                data[key] = value
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def step_fingerprints(self) -> list[str]:
        """Per step, a hash of it and every step before it (with the recipe-wide settings): a completed step
        is reused on `--resume` only when its fingerprint is unchanged."""
        shared = {k: getattr(self, k) for k in TOP_LEVEL[1:]}
        digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode())
        prints = []
        for step in self.steps:
            digest.update(json.dumps(step.to_dict(), sort_keys=True, default=str).encode())
            prints.append(digest.copy().hexdigest()[:16])
        return prints


# the step fields that hold a path (or a Hub name)
PATH_FIELDS = ("dataset", "eval_dataset", "adapter", "student", "checkpoint_dir", "resume", "sensitivity_cache")


def _resolved(value, folder: str):
    """`value` joined to `folder` if it is a relative path (it looks like one, or names something there)."""
    if not isinstance(value, str) or os.path.isabs(value) or value.startswith("~"):
        return value
    candidate = os.path.normpath(os.path.join(folder, value))
    return candidate if looks_local(value) or os.path.exists(candidate) else value


def _step_of(item) -> dict:
    if isinstance(item, dict):
        return item
    try:
        technique = technique_for(item)
    except TypeError:
        raise RecipeError(
            f"a recipe step must be an hfcompress config or a {{technique: fields}} mapping, got {item!r}"
        ) from None
    settings = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.init}
    if "method" not in settings:
        settings = {"method": technique.name, **settings}
    if settings.get("dataset") is not None and not isinstance(settings["dataset"], str):
        raise RecipeError(
            f"{type(item).__name__}.dataset must be a path or dataset name in a recipe (so a resumed run "
            f"finds the same data), got {type(settings['dataset']).__name__}"
        )
    return {technique.kind: settings}
