"""What every technique's config shares: one base class and one set of calibration arguments.

    @deprecated_aliases(blocksize="block_size")
    @dataclass
    class OneShotPruningConfig(CalibrationArguments, CompressionConfig):
        technique: ClassVar[str] = "oneshot"
        ...

`CompressionConfig` names the technique (`technique`), serializes with `to_dict` / `from_dict` (keys of a newer
version warn and are dropped) and knows its deprecated names. `CalibrationArguments` holds the calibration
fields, keyword-only, with one set of defaults for every technique.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

__all__ = [
    "HESSIAN_DTYPES",
    "CalibrationArguments",
    "CompressionConfig",
    "allow_partial_field",
    "check_hessian_dtype",
    "deprecated_aliases",
    "hessian_dtype_field",
    "modules_to_not_convert_field",
    "warn_deprecated",
]

logger = logging.getLogger(__name__)

_WARNED: set[tuple[str, str]] = set()


def warn_deprecated(where: str, old: str, new: str) -> None:
    """Say once per process that `old` is an old name of `new` in `where`."""
    if (where, old) in _WARNED:
        return
    _WARNED.add((where, old))
    warnings.warn(f"{where}: `{old}` is deprecated, use `{new}`", FutureWarning, stacklevel=3)


@dataclass
class CompressionConfig:
    """Base of every technique's config.

    `technique` names the technique in the registry, on the command line and in recipes. `to_dict()` gives the
    settings as JSON values, after the class's `header()` (the keys earlier versions wrote, such as `method`);
    `from_dict()` reads them back. `aliases` maps deprecated field names to their current names.
    """

    technique: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def header(cls) -> dict[str, Any]:
        """Keys written before the fields (`{"method": "gptq"}`, `{"pruning_method": "oneshot", "version": 1}`)."""
        return {}

    def streaming_obstacle(self) -> str | None:
        """Why these settings cannot run on a model streamed from disk (`--offload disk`), or None; asked only of
        techniques that stream at all."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**self.header(), **{f.name: _jsonable(f.name, getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config `to_dict` wrote; deprecated names are renamed (with a warning), unknown keys (written by a
        newer hfcompress?) are dropped with a warning."""
        known = {f.name for f in fields(cls)}
        settings = {}
        for key, value in data.items():
            if key in cls.aliases:
                warn_deprecated(cls.__name__, key, cls.aliases[key])
                key = cls.aliases[key]
            settings[key] = value
        unknown = sorted(set(settings) - known - set(cls.header()))
        if unknown:
            logger.warning("ignoring unknown %s keys %s (written by a newer hfcompress?)", cls.__name__, unknown)
        return cls(**{k: v for k, v in settings.items() if k in known})


def _jsonable(name: str, value: Any) -> Any:
    if name == "dataset" and not isinstance(value, (str, type(None))):
        return f"<{type(value).__name__}>"  # in-memory data: the record says what it was, not its contents
    return value


CALIBRATION_FIELDS = ("dataset", "num_samples", "seq_len", "batch_size")
# tokens per window when none is given, for calibration and evaluation alike: or the model's positions if fewer
DEFAULT_SEQ_LEN = 512


@dataclass
class CalibrationArguments:
    """The calibration data of a calibrated technique, with one set of defaults for all of them. Keyword-only,
    so a config's own fields keep their positions."""

    dataset: Any = field(
        default=None,
        kw_only=True,
        metadata={
            "help": "Calibration data: a text file, a `datasets` folder, a Hub dataset name (in Python also a list "
            "of strings or token ids [n, seq_len]); for a model that reads images, a folder of image files, or a "
            "`datasets` folder or Hub dataset with an image column (in Python also a float tensor [n, channels, "
            "height, width]); for one that transcribes speech (Whisper), a folder of audio files (WAV; FLAC, OGG, MP3 "
            "with soundfile) cut into pieces of its feature extractor's length, or a `datasets` folder or Hub dataset "
            "with an audio column (in Python also a float tensor of log-mel features [n, mel bins, frames]), its "
            "decoder reading what the model transcribes from them."
        },
    )
    num_samples: int = field(
        default=128, kw_only=True, metadata={"help": "Number of calibration windows (or images, or pieces of audio)."}
    )
    seq_len: int | None = field(
        default=None,
        kw_only=True,
        metadata={
            "help": f"Tokens per calibration window. Default: {DEFAULT_SEQ_LEN}, or the model's positions if it has "
            "fewer; more than its positions is refused."
        },
    )
    batch_size: int = field(default=4, kw_only=True, metadata={"help": "Calibration windows per forward pass."})

    def check_calibration(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if name == "seq_len" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")

    def calibration_dict(self) -> dict[str, Any]:
        return {name: _jsonable(name, getattr(self, name)) for name in CALIBRATION_FIELDS}


def allow_partial_field():
    """The `allow_partial` field of the quantization configs (see `core.coverage.check_coverage`)."""
    return field(
        default=False,
        kw_only=True,
        metadata={
            "help": "Accept a run that leaves more than a quarter of the linear-like weights in full precision "
            "(layers of a type no technique handles yet, e.g. fused 3-D expert weights); else it is refused."
        },
    )


def modules_to_not_convert_field():
    """The `modules_to_not_convert` field of the configs that pick their layers with `core.structure`."""
    return field(
        default=None,
        metadata={
            "help": "Linear layers kept in full precision: names, name suffixes or 're:' regexes. "
            "Default: the output embedding (lm_head), the task head (a classifier's score or classifier, "
            "qa_outputs) and a vision-language model's vision tower and projector."
        },
    )


HESSIAN_DTYPES = ("float32", "float64")


def hessian_dtype_field():
    """The `hessian_dtype` field of the configs that solve layers with their input Hessians (or its diagonal)."""
    return field(
        default="float32",
        metadata={
            "help": "What each layer's input Hessian (or its diagonal) is summed in over the calibration samples. "
            "float32: the sums' rounding depends on the order of the samples, on which of them share a batch and "
            "on how processes split them, and the result follows it (GPTQ on a 20.8M-parameter Llama: the order "
            "alone moved held-out perplexity by up to 1%). float64: the same result in any order, batching or "
            "number of processes (given the same threads per process: the thread count changes float32 "
            "products); twice each Hessian's memory while it is collected."
        },
    )


def check_hessian_dtype(value) -> None:
    if value not in HESSIAN_DTYPES:
        raise ValueError(f"`hessian_dtype` must be one of {', '.join(map(repr, HESSIAN_DTYPES))}, got {value!r}")


def deprecated_aliases(**aliases: str):
    """Class decorator (on top of `@dataclass`): old keyword and attribute names that keep working, with a
    warning once per process. `deprecated_aliases(blocksize="block_size")`."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in aliases.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: give `{new}` or its old name `{old}`, not both")
                    warn_deprecated(cls.__name__, old, new)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls.aliases = {**getattr(cls, "aliases", {}), **aliases}
        for old, new in aliases.items():
            setattr(cls, old, _alias_property(cls.__name__, old, new))
        return cls

    return decorate


def _alias_property(owner: str, old: str, new: str) -> property:
    def get(self):
        warn_deprecated(owner, old, new)
        return getattr(self, new)

    def set_(self, value):
        warn_deprecated(owner, old, new)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of `{new}`.")
