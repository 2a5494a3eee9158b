"""The technique registry: each technique registers itself once, at import, and everything that dispatches on a
technique (`quantize`, `compress`, the commands, recipes, the footprint and the compression record) asks here.

    register_technique(
        "gptq", GPTQConfig, quantize_uniform, kind="quantize", layer_types=(QuantLinear, SparseQuantLinear)
    )

Registration imports no torch: `apply`, `check`, `save` and the other functions, and the layer types, may be
given as `lazy("package.module:name")`, imported the first time they are used (so `hfcompress --help` builds
every command from the registry in well under a second).

A compressed layer class declares what it stores (`STORED_TENSORS`, the tensors that hold its weight, and
`KEEPS_DTYPE`, whether its floating-point buffers keep their own dtype when the model is cast), so the
footprint and the dtype handling need no list of classes either.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "StepOption",
    "Technique",
    "always",
    "compress",
    "compressed_layer_types",
    "get_technique",
    "kinds",
    "lazy",
    "load_plugins",
    "register_technique",
    "resolve_technique",
    "resolved",
    "stored_tensors",
    "technique_for",
    "techniques",
]

logger = logging.getLogger(__name__)


class lazy:
    """A reference to `module:name`, imported on first use: calling it calls the object it names."""

    def __init__(self, path: str):
        module, sep, name = path.partition(":")
        if not (module and sep and name):
            raise ValueError(f"a lazy reference must look like 'package.module:name', got {path!r}")
        self.path = path
        self._target = None

    def resolve(self):
        if self._target is None:
            module, _, name = self.path.partition(":")
            self._target = getattr(importlib.import_module(module), name)
        return self._target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return isinstance(other, lazy) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"lazy({self.path!r})"


def resolved(value):
    """`value`, or what it names if it is a `lazy` reference."""
    return value.resolve() if isinstance(value, lazy) else value


def _never(config) -> bool:
    return False


def always(config) -> bool:
    """`calibrated=always`: every config of the technique calibrates on data."""
    return True


@dataclass(frozen=True)
class StepOption:
    """A choice a step makes beyond its config (how it stores or saves); `choices[0]` is the default.
    `between_steps`: the value a recipe uses when another step follows, if that differs (a bitmask-stored
    layer cannot be read by the next technique, so pruning stores dense weights between steps)."""

    choices: tuple[str, ...]
    help: str = ""
    between_steps: str | None = None

    @property
    def default(self) -> str:
        return self.choices[0]


@dataclass(frozen=True)
class Technique:
    """A compression technique as the rest of hfcompress sees it.

    - `name`: its method name in a recipe step (`- <kind>: {method: <name>}`) and on the command line.
    - `config_class`: its config dataclass. `apply(model, config, tokenizer)` compresses `model` in place and
      returns it (with `in_place=False` it returns a new model: bitsandbytes quantizes while loading).
    - `kind`: the command group and recipe step it belongs to (`quantize`, `prune`, `factorize`, ...);
      `command`: its command words (default `hfcompress <kind> <name>`).
    - `record_kind`: the step's kind in the compression record; `describe(config)`: the method the record names
      (default: the config's `method`, else `name`); `record(model, config)`: extra settings to record.
    - `layer_types`: the module classes it puts into a model (each declares `STORED_TENSORS`), or `lazy`
      references to them.
    - `calibrated(config)`: whether that config calibrates on data (then `dataset` is required; `always` when
      every config does).
    - `step_options`: options of the step beyond the config (`format`, `storage`), by name;
      `check(config, **step_options)` refuses bad combinations before any work;
      `check_model(model_path, config, **step_options)` refuses what the model's structure shows they cannot do
      (read from its config on the meta device), before it loads;
      `before_save(model, config, **step_options)` runs after the quality measurement (a storage form);
      `save(model, folder, **step_options)` writes the weights (default: `save_pretrained`).
    - `stream(model_path, folder, config, tokenizer, resume, **step_options)`: the technique run block by block
      from a checkpoint on disk straight into `folder` (`--offload disk`, `core.streamed_run`), continuing the run
      kept there when `resume`; returns the model skeleton for the record. None: cannot stream.
      It writes hfcompress's format; `rewrite(folder, destination, task, **step_options)` rewrites what it wrote
      in `folder` into `destination` in the format the step options name, where that is another (None: the
      technique streams in hfcompress's format only).
    - `expert_linears`: whether it works on linear layers one by one, experts included: fused mixture-of-experts
      weights are then held as one linear per expert while it runs (`core.experts`), and fused back where
      nothing was compressed.
    - `cast`: whether what stayed dense goes back to the checkpoint's dtype before saving.
    - `summary`: one line for `--help`.
    """

    name: str
    config_class: type
    apply: Callable[..., nn.Module]
    kind: str = "quantize"
    command: tuple[str, ...] = ()
    record_kind: str = "quantization"
    describe: Callable[[Any], str] | None = None
    record: Callable[[nn.Module, Any], dict] | None = None
    layer_types: tuple[type | lazy, ...] = ()
    calibrated: Callable[[Any], bool] = _never
    step_options: dict[str, StepOption] = field(default_factory=dict)
    check: Callable[..., None] | None = None
    check_model: Callable[..., None] | None = None
    before_save: Callable[..., None] | None = None
    save: Callable[..., None] | None = None
    stream: Callable[..., nn.Module] | None = None
    rewrite: Callable[..., None] | None = None
    expert_linears: bool = False
    cast: bool = True
    in_place: bool = True
    summary: str = ""

    def __post_init__(self):
        if not self.command:
            object.__setattr__(self, "command", (self.kind, self.name))

    def run(self, model: nn.Module, config, tokenizer=None) -> nn.Module:
        """`apply`, then for a quantization the coverage check (`core.coverage`): what was compressed and what
        was left out is logged and kept as `model.hfcompress_coverage`, and a run that left a large share of the
        linear-like weights in full precision is refused unless `config.allow_partial`. With `expert_linears`,
        fused experts are unfused first (see `core.experts`)."""
        if not (self.expert_linears and self.in_place):
            return self.check_coverage(self.apply(model, config, tokenizer), config)
        from .experts import run_on_expert_linears  # torch: the registry itself must import none

        return run_on_expert_linears(model, lambda: self.check_coverage(self.apply(model, config, tokenizer), config))

    def check_coverage(self, result: nn.Module, config) -> nn.Module:
        """For a quantization, the coverage check (`core.coverage`) on `result`, kept as its
        `hfcompress_coverage`; `result` is returned."""
        if self.kind == "quantize":
            from .coverage import check_coverage  # torch: the registry itself must import none

            covered = check_coverage(result, config, getattr(config, "allow_partial", False))
            result.hfcompress_coverage = covered.summary()
        return result

    def streamed_format(self, format: str = "hfcompress") -> str:
        """The format its streamed run writes for an output in `format`: hfcompress's where `rewrite` turns that
        into `format` at the end."""
        return "hfcompress" if self.rewrite is not None else format

    def method_of(self, config) -> str:
        if self.describe is not None:
            return self.describe(config)
        method = getattr(config, "method", None)
        return method if isinstance(method, str) else self.name

    def variants(self) -> tuple[str, ...]:
        """The recipe method names that select this technique: its name, and the choices of its config's
        `method` field where it has one (`prune: {method: sparsegpt}` is the one-shot technique)."""
        hint = typing.get_type_hints(self.config_class).get("method")
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        return (self.name, *choices)


PLUGIN_GROUP = "hfcompress.techniques"

_TECHNIQUES: dict[tuple[str, str], Technique] = {}
_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import the techniques other packages declare under the `hfcompress.techniques` entry-point group (each
    entry point names a module that registers its technique on import). Runs once; the commands call it, and
    lookups call it before saying a technique is unknown. A plugin that fails to import is logged and skipped."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry_point.load()
        except Exception as e:  # one broken plugin must not take the built-in techniques down with it
            logger.warning("could not load the hfcompress plugin %r (%s): %s", entry_point.name, entry_point.value, e)


_LAYER_TYPES: dict[type, None] = {}


def register_technique(
    name: str, config_class: type, apply: Callable[..., nn.Module], kind: str = "quantize", **options
) -> Technique:
    """Register technique `name` of `kind` (see `Technique` for `options`). Its config class must be a
    dataclass; its layer types must declare `STORED_TENSORS`. Registering the same name twice with another config
    class is an error; registering it again with the same one replaces it (reloading a module)."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"the config class of technique {name!r} must be a dataclass, got {config_class!r}")
    for layer_type in options.get("layer_types", ()):
        if not isinstance(layer_type, lazy):
            _check_layer_type(layer_type, name)
    existing = _TECHNIQUES.get((kind, name))
    if existing is not None and existing.config_class.__qualname__ != config_class.__qualname__:
        raise ValueError(f"technique {kind} {name!r} is already registered with {existing.config_class.__name__}")
    technique = Technique(name, config_class, apply, kind, **options)
    _TECHNIQUES[(kind, name)] = technique
    for layer_type in technique.layer_types:
        _LAYER_TYPES[layer_type] = None
    return technique


def _check_layer_type(layer_type: type, name: str) -> None:
    if not hasattr(layer_type, "STORED_TENSORS"):
        raise TypeError(
            f"layer type {layer_type.__name__} of technique {name!r} must declare STORED_TENSORS, the names of "
            "the tensors that hold its weight"
        )


def techniques(kind: str | None = None) -> list[Technique]:
    """The registered techniques (of one `kind`), in registration order."""
    return [t for t in _TECHNIQUES.values() if kind is None or t.kind == kind]


def get_technique(kind: str, name: str) -> Technique:
    """Technique `name` of `kind`, or an error listing the known ones."""
    if (kind, name) not in _TECHNIQUES:
        load_plugins()
    if (kind, name) not in _TECHNIQUES:
        known = ", ".join(t.name for t in techniques(kind)) or "none"
        raise ValueError(f"unknown {kind} method {name!r}; expected one of {known}")
    return _TECHNIQUES[(kind, name)]


def resolve_technique(kind: str, method: str | None) -> Technique:
    """The technique a recipe step `- <kind>: {method: <method>}` runs: the one named `method`, or the one whose
    config's `method` field offers it; without a method, the one technique of `kind` whose config has a `method`
    field with a default (`prune` is one-shot magnitude pruning, `factorize` whitened SVD)."""
    if not any(method in t.variants() for t in techniques(kind)):
        load_plugins()
    candidates = techniques(kind)
    if method is None:
        defaults = [t for t in candidates if len(t.variants()) > 1]
        if len(candidates) == 1 or len(defaults) == 1:
            return candidates[0] if len(candidates) == 1 else defaults[0]
        raise ValueError(f"a {kind} step needs `method`: one of {', '.join(_all_variants(kind))}")
    for technique in candidates:
        if method in technique.variants():
            return technique
    raise ValueError(f"`method` must be one of {', '.join(_all_variants(kind))}, got {method!r}")


def _all_variants(kind: str) -> list[str]:
    names = []
    for technique in techniques(kind):
        names.extend(v for v in technique.variants()[1:] or technique.variants() if v not in names)
    return names


def kinds() -> list[str]:
    """The kinds of registered techniques, in registration order (plugins loaded)."""
    load_plugins()
    return list(dict.fromkeys(t.kind for t in _TECHNIQUES.values()))


def technique_for(config: Any, kind: str | None = None) -> Technique:
    """The technique whose config class `config` is (the most specific registered class wins: a `GPTQConfig`
    is GPTQ, though it extends `RTNConfig`)."""
    for attempt in range(2):
        for cls in type(config).__mro__:
            for technique in techniques(kind):
                if technique.config_class is cls:
                    return technique
        if attempt == 0:
            load_plugins()
    known = ", ".join(t.config_class.__name__ for t in techniques(kind))
    what = f"{kind} config" if kind else "hfcompress config"
    raise TypeError(f"`config` must be an {what} ({known}), got {type(config).__name__}")


def compress(model: nn.Module, config: Any, tokenizer=None) -> nn.Module:
    """Compress `model` with the registered technique `config` belongs to (quantization, pruning, factorization,
    or one registered from outside): in place, except where the technique returns a new model."""
    return technique_for(config).run(model, config, tokenizer)


def compressed_layer_types() -> tuple[type, ...]:
    """Every module class a registered technique puts into a model (lazy references imported now)."""
    if any(isinstance(t, lazy) for t in _LAYER_TYPES):
        for reference in [t for t in _LAYER_TYPES if isinstance(t, lazy)]:
            layer_type = reference.resolve()
            _check_layer_type(layer_type, reference.path)
            del _LAYER_TYPES[reference]
            _LAYER_TYPES[layer_type] = None
    return tuple(_LAYER_TYPES)


def stored_tensors(module: nn.Module) -> list:
    """The tensors that hold the weight of a compressed layer (None where a buffer is absent), or [] for a
    module no technique registered."""
    if not isinstance(module, compressed_layer_types()):
        return []
    return [getattr(module, name, None) for name in type(module).STORED_TENSORS]
