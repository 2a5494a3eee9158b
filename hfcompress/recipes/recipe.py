"""A recipe: compression steps to run in order, validated completely before any of them starts.

Each step is one of hfcompress's writing commands, named by its technique, with the same fields as its
Python config class (and the command's own options, by their Python names):

    steps:
      - prune: {method: sparsegpt, sparsity: 0.3}          # OneShotPruningConfig (method structured: heads, ffn)
      - factorize: {param_ratio: 0.85, method: whiten}     # LowRankConfig
      - quantize: {method: gptq, bits: 4, group_size: 128} # GPTQConfig / RTNConfig / KMeansConfig / VQConfig / BnbConfig
    dataset: calib.txt                                      # default `dataset` of every step that takes one

`distill: {student_layers: 6, max_steps: 500, ...}` trains a student of the model so far (the options of
`hfcompress distill`), and `merge_lora: {adapter: PATH, rank: original}` folds in a peft adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Recipe", "RecipeError", "RecipeStep"]

logger = logging.getLogger(__name__)

KINDS = ("prune", "factorize", "quantize", "distill", "merge_lora")
TOP_LEVEL = ("steps", "dataset", "eval_dataset", "eval_seq_len", "eval_max_windows")
# options every step gets from the recipe runner, not from the recipe
_RUNNER_OWNED = {"model", "output", "teacher", "overwrite", "push_to_hub", "private", "quiet", "help", "version",
                 "command", "method", "kind", "eval_dataset", "eval_seq_len", "eval_max_windows", "checkpoint_dir",
                 "resume"}  # fmt: skip
_QUANTIZE_METHODS = ("gptq", "rtn", "kmeans", "vq", "bnb")
_PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "structured")


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
        method = self.method
        if self.kind == "factorize":
            method = self.settings.get("method", "whiten")
        return f"{self.kind.replace('_', '-')}-{method}" if method else self.kind.replace("_", "-")

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: dict(self.settings)}


@dataclass
class Recipe:
    steps: list[RecipeStep]
    dataset: str | None = None
    eval_dataset: str | None = None
    eval_seq_len: int = 512
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
            if kind not in KINDS:
                raise RecipeError(f"step {i}: unknown technique {kind!r}; expected one of {', '.join(KINDS)}")
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
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file {os.fspath(path)!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{os.fspath(path)} is not valid YAML: {e}") from e
        return cls.from_dict(data)

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
        import yaml

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


def _step_of(item) -> dict:
    if isinstance(item, dict):
        return item
    from ..lowrank.config import LowRankConfig
    from ..pruning.oneshot import OneShotPruningConfig
    from ..quantization.bnb import BnbConfig
    from ..quantization.codebook_config import KMeansConfig, VQConfig
    from ..quantization.config import GPTQConfig, RTNConfig

    kinds = [
        (OneShotPruningConfig, "prune"), (LowRankConfig, "factorize"), (GPTQConfig, "quantize"),
        (RTNConfig, "quantize"), (KMeansConfig, "quantize"), (VQConfig, "quantize"), (BnbConfig, "quantize"),
    ]  # fmt: skip
    for cls, kind in kinds:
        if isinstance(item, cls):
            settings = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
            if kind == "quantize":
                settings = {"method": _quantize_method(item), **settings}
            if settings.get("dataset") is not None and not isinstance(settings["dataset"], str):
                raise RecipeError(
                    f"{type(item).__name__}.dataset must be a path or dataset name in a recipe (so a resumed run "
                    f"finds the same data), got {type(settings['dataset']).__name__}"
                )
            return {kind: settings}
    raise RecipeError(f"a recipe step must be an hfcompress config or a {{technique: fields}} mapping, got {item!r}")


def _quantize_method(config) -> str:
    from ..quantization.bnb import BnbConfig

    return "bnb" if isinstance(config, BnbConfig) else config.method


def command_for(step: RecipeStep) -> list[str]:
    """The `hfcompress` subcommand a step runs."""
    if step.kind == "quantize":
        return ["quantize", step.method]
    if step.kind == "prune":
        return ["prune", "structured" if step.method == "structured" else "oneshot"]
    return {"factorize": ["factorize"], "distill": ["distill"], "merge_lora": ["merge-lora"]}[step.kind]


def namespace_defaults(parser: argparse.ArgumentParser, command: list[str]) -> tuple[argparse.Namespace, dict]:
    """The defaults of subcommand `command` of `parser` as a Namespace, and its actions by destination."""
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    values = {dest: a.default for dest, a in actions.items()}
    values.update(parser._defaults)
    return argparse.Namespace(**values), actions
