"""The manifest: what an hfcompress checkpoint holds, in one structure for every technique: quantized layers and
their grids, sparse layers, factor ranks, decomposed convolutions, codebooks, resized layers, the layers of
techniques registered from outside the package (`layers`), the blocks a student kept and the one-shot pruning
that zeroed its weights. Every technique records its changes with `update_manifest`.

It lives in one of two places in `config.json`, by what loading needs: in `quantization_config` (with
`quant_method: "hfcompress"`) when some layer must be rebuilt before the weights load (`from_pretrained`
does it after `import hfcompress`, see `rebuild.py`); otherwise, for a model plain transformers loads as it
is (a distilled student, a pruned model with dense zeros), under `config.json["hfcompress"]`, with only the
fields that say something.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.grids import SCALE_DTYPES, check_grid

__all__ = [
    "FORMAT_VERSION",
    "LEGACY_ATTRIBUTES",
    "PLAIN_ATTRIBUTE",
    "SCALE_DTYPES",
    "CheckpointManifest",
    "HfcompressQuantizationConfig",
    "check_grid",
    "manifest_of",
]

logger = logging.getLogger(__name__)

# 2: `lowrank` (factorized layers); 3: `sparse`, `resized`, `codebooks`; 4: `overrides` (mixed precision),
# layers in both `modules` and `sparse` (`SparseQuantLinear`); 5: `layers` (techniques registered from outside),
# `student_layers` and `pruning` (config attributes before), and `config.json["hfcompress"]` for plain models;
# 6: bitmask layers store their values as `weight` (1-D), so plain transformers refuses them; 7: `experts`
# (mixture-of-experts layers held as one linear per expert); 8: `activations` (W8A8), `compensation`. A loaded checkpoint is in the current format in memory
# (older layouts are converted after loading), so it saves as the current one.
FORMAT_VERSION = 8


@dataclass
class HfcompressQuantizationConfig(QuantizationConfigMixin):
    """What `config.json["quantization_config"]` records for an hfcompress checkpoint.

    `modules` lists every quantized module by name so loading rebuilds exactly those; `layer_types` the
    classes they replaced (`Linear`, GPT-2's `Conv1D`); `recipe` keeps the settings that produced the
    checkpoint, for the record. `lowrank` maps each factorized layer to its rank (`FactorizedLinear`, rebuilt
    before any quantized module, so a quantized factor is listed in `modules` as `<layer>.up` or `.down`);
    `lowrank_recipe` keeps the factorization settings. `convolutions` maps each decomposed `Conv2d` to
    `{"kind": "tucker2", "ranks": [in, out]}` or `{"kind": "separable"}`. `sparse` maps each layer stored as
    bitmask + values (`SparseLinear`) to its number of non-zeros. `resized` records structure removed where the
    model's config cannot express it (BERT heads): `{"linears": {name: [out, in]}, "attributes": {module:
    {...}}}`. `codebooks` maps each k-means / VQ layer (`CodebookLinear`) to `{"bits", "dim", "books"}`.
    `overrides` maps a quantized module whose grid differs from the top-level one (mixed precision, a factor
    with one group per row) to `{"bits", "group_size"}`; a module in both `modules` and `sparse` is a
    `SparseQuantLinear` with that many non-zeros. `layers` maps a technique registered from outside hfcompress
    to `{module name: spec}` for its own rebuilder. `student_layers`: the teacher blocks a distilled student
    kept; `pruning`: the one-shot pruning settings that zeroed the weights. `experts` maps each fused
    mixture-of-experts module held as one linear per expert (`core.experts.ExpertLinears`, rebuilt before any
    other layer, so its experts are listed like any linear: `<module>.gate_up_proj.3`) to `{"experts": n}`.
    `activations`, when set, says the quantized modules also quantize their inputs at run time (W8A8:
    `{"bits": 8, "strategy": "token", "dynamic": true, "sym": true}`, `Int8Linear`); a reader that predates it
    ignores it with a warning and runs the same weights on float inputs. `compensation` maps each quantized layer
    that carries a low-rank correction of its quantization error (`CompensatedLinear`, rebuilt before the
    quantized modules, so its quantized weight is listed in `modules` as `<layer>.base`) to the correction's rank.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    modules: list[str] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=lambda: ["Linear"])
    scale_dtype: str = "float16"
    method: str = "rtn"
    recipe: dict[str, Any] = field(default_factory=dict)
    lowrank: dict[str, int] = field(default_factory=dict)
    lowrank_recipe: dict[str, Any] = field(default_factory=dict)
    convolutions: dict[str, dict] = field(default_factory=dict)
    sparse: dict[str, int] = field(default_factory=dict)
    codebooks: dict[str, dict] = field(default_factory=dict)
    resized: dict[str, dict] = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    experts: dict[str, dict] = field(default_factory=dict)
    activations: dict[str, Any] = field(default_factory=dict)
    compensation: dict[str, int] = field(default_factory=dict)
    student_layers: list[int] | None = None
    pruning: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    quant_method: str = "hfcompress"

    def __post_init__(self):
        check_grid(self.bits, self.group_size, self.scale_dtype)
        if self.version > FORMAT_VERSION:
            logger.warning(
                "This checkpoint was written by a newer hfcompress (format version %s, this one reads %s); "
                "loading what this version understands",
                self.version,
                FORMAT_VERSION,
            )

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            logger.warning("Ignoring unknown quantization_config keys %s (written by a newer hfcompress?)", unknown)
        config = cls(**{k: v for k, v in config_dict.items() if k in known})
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid_of(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of quantized module `name`."""
        override = self.overrides.get(name, {})
        return override.get("bits", self.bits), override.get("group_size", self.group_size)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def section(self, name: str) -> dict:
        """The records of one kind of layer: a built-in field (`lowrank`, `sparse`, ...) or a registered
        technique's entry in `layers`."""
        if name in _BUILT_IN_SECTIONS:
            return getattr(self, name)
        return self.layers.get(name, {})

    def sections_in_use(self) -> list[str]:
        """The kinds of layer this checkpoint holds."""
        used = [name for name in _BUILT_IN_SECTIONS if getattr(self, name)]
        return used + [name for name, records in self.layers.items() if records]

    def needs_hfcompress(self) -> bool:
        """Whether loading must rebuild layers (so the manifest is the model's `quantization_config`)."""
        return bool(self.sections_in_use())

    def to_plain_dict(self) -> dict[str, Any]:
        """What `config.json["hfcompress"]` keeps of a manifest that loading does not need: the fields that
        differ from their defaults, with the method and the format version."""
        defaults = type(self)()
        data = {k: v for k, v in self.to_dict().items() if v != getattr(defaults, k)}
        return {"method": self.method, "version": self.version, **data}


# the fields that record layers (the other fields describe the quantization grid and the recipe)
_BUILT_IN_SECTIONS = (
    "experts", "convolutions", "resized", "lowrank", "sparse", "codebooks", "compensation", "modules",
)  # fmt: skip

CheckpointManifest = HfcompressQuantizationConfig

# the config attribute of a manifest that loading does not need
PLAIN_ATTRIBUTE = "hfcompress"
# config attributes of format 4 and before, read into the manifest: {attribute: manifest field}
LEGACY_ATTRIBUTES = {"hfcompress_student_layers": "student_layers", "hfcompress_pruning": "pruning"}


def manifest_of(model) -> HfcompressQuantizationConfig | None:
    """The manifest `model` carries, wherever it lives (None for a model hfcompress has not changed); an error for
    a model quantized by another method, which hfcompress cannot add to. A manifest read from
    `config.hfcompress` is a copy: record changes with `update_manifest`."""
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    # checkpoints of format 4 and before kept the student's blocks and the pruning as config attributes
    legacy = {field: getattr(config, name) for name, field in LEGACY_ATTRIBUTES.items() if hasattr(config, name)}
    if isinstance(qconfig, HfcompressQuantizationConfig):
        for field_name, value in legacy.items():
            if not getattr(qconfig, field_name):
                setattr(qconfig, field_name, value)
        return qconfig
    if qconfig is None:
        plain = getattr(config, PLAIN_ATTRIBUTE, None)
        if isinstance(plain, dict):
            return HfcompressQuantizationConfig.from_dict(plain)
        return HfcompressQuantizationConfig(method="none", **legacy) if legacy else None
    method = getattr(qconfig, "quant_method", None) or (
        qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    )
    raise ValueError(
        f"the model is quantized by another method ({method or type(qconfig).__name__}); hfcompress can only extend "
        "its own checkpoints"
    )
