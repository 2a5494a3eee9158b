"""Configuration of weight quantization: what the user asks for (the checkpoint's record is
`checkpoint.manifest.HfcompressQuantizationConfig`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from ..core.config import (
    CalibrationArguments,
    CompressionConfig,
    allow_partial_field,
    check_hessian_dtype,
    hessian_dtype_field,
    modules_to_not_convert_field,
)
from ..core.grids import SCALE_DTYPES, SUPPORTED_BITS, check_grid

__all__ = ["FORMATS", "SCALE_DTYPES", "AWQConfig", "GPTQConfig", "RTNConfig", "W8A8Config"]

# the checkpoint formats a uniform grid saves to (`save_quantized(format=...)`, `--format`)
FORMATS = ("hfcompress", "compressed-tensors")

logger = logging.getLogger(__name__)


@dataclass
class RTNConfig(CompressionConfig):
    """Round-to-nearest weight quantization of every `nn.Linear` (and GPT-2 `Conv1D`) outside
    `modules_to_not_convert`. Needs no calibration data."""

    technique: ClassVar[str] = "rtn"
    method: ClassVar[str] = "rtn"  # the algorithm, as records name it

    bits: int = field(default=4, metadata={"help": "Bits per weight: 2, 3, 4 or 8."})
    group_size: int = field(
        default=128,
        metadata={"help": "Input columns sharing one scale and zero point; -1 for one per output row (per-channel)."},
    )
    sym: bool = field(default=False, metadata={"help": "Symmetric grid (zero point fixed at the middle code)."})
    modules_to_not_convert: list[str] | None = modules_to_not_convert_field()
    scale_dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float16", metadata={"help": "Storage dtype of the scales."}
    )
    clip_search: bool = field(
        default=False,
        metadata={"help": "Pick each group's range among shrunk min-max ranges by its rounding error (MSE grid)."},
    )
    allow_partial: bool = allow_partial_field()
    layer_bits: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Mixed precision: {module name, name suffix or 're:' regex: bits}; the first match wins, "
            "other layers get `bits`."
        },
    )
    keep_sparsity: bool = field(
        default=True,
        metadata={
            "help": "Layers with at least 25% exact zeros (a pruned model) keep them exactly and are stored as a "
            "bitmask plus the codes of the non-zeros."
        },
    )

    def __post_init__(self):
        check_grid(self.bits, self.group_size, self.scale_dtype)
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict):
                raise ValueError(f"`layer_bits` must map module names to bits, got {self.layer_bits!r}")
            for pattern, bits in self.layer_bits.items():
                if bits not in SUPPORTED_BITS:
                    raise ValueError(
                        f"`layer_bits[{pattern!r}]` must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}"
                    )

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"method": cls.method}

    def searches_clip(self, bits: int) -> bool:
        """Whether a layer of `bits` bits gets the clip search: `clip_search`, or where that is None (GPTQ's
        default) at 2 and 3 bits only."""
        return bits <= 3 if self.clip_search is None else self.clip_search


@dataclass
class GPTQConfig(CalibrationArguments, RTNConfig):
    """GPTQ: quantize each layer's weights column by column, spreading the error over the columns not yet
    quantized with the inverse Hessian of calibration activations."""

    technique: ClassVar[str] = "gptq"
    method: ClassVar[str] = "gptq"

    act_order: bool = field(
        default=True,
        metadata={
            "help": "Quantize columns by decreasing Hessian diagonal (on a 20.8M-parameter Llama at 4-bit g128: perplexity "
            "+1.24% over fp32 with it, +1.85% without, RTN +1.53%)."
        },
    )
    static_groups: bool = field(
        default=True,
        metadata={
            "help": "With act_order, fix the groups on the original column order: no g_idx, the plain layout (fast "
            "kernels, compressed-tensors export). Off: groups follow the visiting order and a g_idx is stored."
        },
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "Dampening added to diag(H), as a fraction of its mean."}
    )
    block_size: int = field(default=128, metadata={"help": "Columns per lazy-batch block."})
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()
    clip_search: bool | None = field(
        default=None,
        metadata={
            "help": "Pick each group's range among shrunk min-max ranges by clip_objective. Default: at 2 and 3 bits "
            "only (on a 20.8M-parameter Llama at w3 it cut perplexity 1-3% on held-out texts; at w4 it did not help)."
        },
    )
    clip_objective: Literal["hessian", "rounding"] = field(
        default="hessian",
        metadata={
            "help": "With clip_search, what a shrunk range is scored by: hessian weighs each column's squared "
            "rounding error by its cost in the GPTQ loss (1/[H^-1]_jj); rounding sums |error|^2.4 (reference GPTQ)."
        },
    )
    true_sequential: bool = field(
        default=True,
        metadata={
            "help": "Within a block, calibrate each group of linears on the outputs of the already quantized ones, "
            "staged so each matmul runs once (about one forward pass of the model in all). Off: two passes per block, "
            "full-precision Hessians then quantized outputs, as llm-compressor does (~1.4x slower; on a 20.8M-parameter "
            "Llama neither was better at every setting, see scripts/bench_gptq.py --draws)."
        },
    )
    calibrate_all_experts: bool = field(
        default=True,
        metadata={
            "help": "Mixture-of-experts models: while calibrating, run every token through every expert, so each "
            "expert's Hessian sees all the calibration data (the block's outputs stay those of the model's routing). "
            "Off: each expert is calibrated on the tokens routed to it; rarely chosen experts then see few."
        },
    )

    lowrank_compensation: int = field(
        default=0,
        metadata={
            "help": "Add to each quantized layer a low-rank correction of its quantization error, fitted to the "
            "calibration inputs (the whitened SVD of the error) and stored in float16: the mean rank per layer. The "
            "budget, rank x (in + out) parameters per layer, goes to the layers whose error each rank reduces most. "
            "0: none."
        },
    )
    compensation_bits: float | None = field(
        default=None,
        metadata={
            "help": "The correction's budget in stored bits per quantized weight (e.g. 0.25) instead of a mean rank."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lowrank_compensation, bool) or not isinstance(self.lowrank_compensation, int):
            raise ValueError(f"`lowrank_compensation` must be a whole rank, got {self.lowrank_compensation!r}")
        if self.lowrank_compensation < 0:
            raise ValueError(
                f"`lowrank_compensation` must be 0 (none) or a positive rank, got {self.lowrank_compensation}"
            )
        if self.compensation_bits is not None and not 0 < self.compensation_bits <= 16:
            raise ValueError(f"`compensation_bits` must be in (0, 16] bits per weight, got {self.compensation_bits!r}")
        if self.lowrank_compensation and self.compensation_bits is not None:
            raise ValueError("give `lowrank_compensation` (a mean rank) or `compensation_bits` (a budget), not both")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"`damp_percent` must be in [0, 1), got {self.damp_percent!r}")
        if self.block_size < 1:
            raise ValueError(f"`block_size` must be positive, got {self.block_size!r}")
        check_hessian_dtype(self.hessian_dtype)
        if self.clip_objective not in ("hessian", "rounding"):
            raise ValueError(f"`clip_objective` must be 'hessian' or 'rounding', got {self.clip_objective!r}")
        self.check_calibration()
        if self.static_groups and not self.act_order:
            logger.info("`static_groups` only matters with `act_order`; ignoring it")

    @property
    def compensates(self) -> bool:
        return bool(self.lowrank_compensation or self.compensation_bits)


@dataclass
class AWQConfig(CalibrationArguments, RTNConfig):
    """AWQ: scale each input channel of the linears that share an input by its activation magnitude (searched
    on the calibration data), fold the inverse scales into the module that produced that input, then round to
    nearest. Scales change no output; they give the weights of salient channels finer steps."""

    technique: ClassVar[str] = "awq"
    method: ClassVar[str] = "awq"

    n_grid: int = field(
        default=20, metadata={"help": "Exponents α tried for the scales a^α / w^(1-α), from 0 in steps of 1/n_grid."}
    )
    duo_scaling: bool = field(
        default=True,
        metadata={"help": "Scales from activation and weight magnitudes (a^α / w^(1-α)); off: activations only (a^α)."},
    )
    activation_statistic: Literal["mean_abs", "rms"] | None = field(
        default=None,
        metadata={
            "help": "The activation magnitude `a` of each input channel: mean_abs (mean |x|, as the paper and "
            "llm-compressor) or rms (from the input Hessian's diagonal). Default: mean_abs with round-to-nearest "
            "weights, rms with GPTQ weights (the better of the two for each on the reference model)."
        },
    )
    clip: bool | None = field(
        default=None,
        metadata={
            "help": "After scaling, clamp each group's largest weights where that lowers the group's output error "
            "after rounding (AWQ's clipping search, measured through the input Hessian). Round-to-nearest weights "
            "only: GPTQ compensates its rounding errors itself, and clamping first made it worse. Default: at 2 and "
            "3 bits only (on a 20.8M-parameter Llama at w3 g128 it more than halved the perplexity increase; at w4 "
            "it raised perplexity on every held-out text measured)."
        },
    )
    weights: Literal["rtn", "gptq"] = field(
        default="rtn",
        metadata={
            "help": "How the smoothed weights are quantized: rtn (round to nearest, AWQ as published) or gptq (GPTQ "
            "with its defaults on the same calibration data)."
        },
    )
    search_objective: Literal["module", "hessian"] | None = field(
        default=None,
        metadata={
            "help": "What the scale search minimizes for linears that share an input: module (the output of the "
            "smallest module holding them, the attention or the MLP, with them rounded and the rest in full "
            "precision, on `search_samples` calibration windows, as AutoAWQ and llm-compressor) or hessian (each "
            "linear's own output error through its input Hessian, on every window; faster, blind to what the "
            "softmax and the MLP's gate do with the errors). A linear alone is always scored by its Hessian: "
            "that is its exact output error. Default: module with round-to-nearest weights at 4 bits and more, "
            "hessian at 2 and 3 bits and with GPTQ weights (the better of the two for each on the reference model)."
        },
    )
    search_samples: int = field(
        default=32,
        metadata={"help": "Calibration windows the module-output search runs on (the first ones; whole batches)."},
    )
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()

    def __post_init__(self):
        super().__post_init__()
        check_hessian_dtype(self.hessian_dtype)
        if self.activation_statistic not in (None, "mean_abs", "rms"):
            raise ValueError(
                f"activation_statistic={self.activation_statistic!r}: expected 'mean_abs', 'rms' or None (by weights)"
            )
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"`weights` must be 'rtn' or 'gptq', got {self.weights!r}")
        if self.n_grid < 1:
            raise ValueError(f"`n_grid` must be at least 1, got {self.n_grid!r}")
        if self.search_objective not in (None, "module", "hessian"):
            raise ValueError(
                f"search_objective={self.search_objective!r}: expected 'module', 'hessian' or None (by weights)"
            )
        if self.search_samples < 1:
            raise ValueError(f"`search_samples` must be at least 1, got {self.search_samples!r}")
        self.check_calibration()

    def gptq_config(self) -> GPTQConfig:
        """What quantizes the smoothed weights with `weights="gptq"`: GPTQ with the fields this config shares
        with `GPTQConfig` (grid, calibration data), GPTQ's defaults for the rest."""
        shared = {f.name: getattr(self, f.name) for f in fields(GPTQConfig) if f.init and hasattr(self, f.name)}
        return GPTQConfig(**shared)

    def statistic(self) -> str:
        """The activation magnitude the scales start from: `activation_statistic`, or where that is None mean_abs
        with round-to-nearest weights, rms with GPTQ weights."""
        if self.activation_statistic is not None:
            return self.activation_statistic
        return "mean_abs" if self.weights == "rtn" else "rms"

    def objective(self) -> str:
        """What the scale search minimizes: `search_objective`, or where that is None the module's output with
        round-to-nearest weights at 4 bits and more, the Hessian's measure otherwise."""
        if self.search_objective is not None:
            return self.search_objective
        return "module" if self.weights == "rtn" and self.bits > 3 else "hessian"

    def clips(self) -> bool:
        """Whether the clipping search runs: `clip`, or where that is None at 2 and 3 bits only; never with GPTQ
        weights."""
        return self.weights == "rtn" and (self.bits <= 3 if self.clip is None else self.clip)


@dataclass
class W8A8Config(CalibrationArguments, CompressionConfig):
    """W8A8: 8-bit weights (symmetric, one scale per output channel) and 8-bit activations (one scale per token,
    computed at run time), run as int8 matmuls (`Int8Linear`). SmoothQuant first moves part of the activations'
    outlier range into the weights, measured on the calibration data."""

    technique: ClassVar[str] = "w8a8"
    method: ClassVar[str] = "w8a8"
    bits: ClassVar[int] = 8
    group_size: ClassVar[int] = -1
    sym: ClassVar[bool] = True

    smoothquant: float = field(
        default=0.5,
        metadata={
            "help": "SmoothQuant migration strength α in [0, 1]: input-channel scales max|x|^α / max|w|^(1-α), "
            "folded into the module that produced the input where that is exact. 0: no smoothing."
        },
    )
    weights: Literal["rtn", "gptq"] = field(
        default="rtn",
        metadata={
            "help": "How the (smoothed) weights are rounded to int8: rtn (round to nearest) or gptq (on the "
            "calibration data; on a 20.8M-parameter Llama no better at 8 bits: +0.13% perplexity vs +0.09%)."
        },
    )
    modules_to_not_convert: list[str] | None = modules_to_not_convert_field()
    scale_dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float32", metadata={"help": "Storage dtype of the weight scales (one per output channel)."}
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "GPTQ weights: dampening added to diag(H), as a fraction of its mean."}
    )
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()  # GPTQ weights
    allow_partial: bool = allow_partial_field()

    def __post_init__(self):
        if isinstance(self.smoothquant, bool) or not isinstance(self.smoothquant, (int, float)):
            raise ValueError(f"`smoothquant` must be a number in [0, 1], got {self.smoothquant!r}")
        if not 0 <= self.smoothquant <= 1:
            raise ValueError(f"`smoothquant` must be in [0, 1] (0: no smoothing), got {self.smoothquant!r}")
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"`weights` must be 'rtn' or 'gptq', got {self.weights!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"`scale_dtype` must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"`damp_percent` must be in [0, 1), got {self.damp_percent!r}")
        check_hessian_dtype(self.hessian_dtype)
        self.check_calibration()

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"method": cls.method}

    def weight_config(self) -> RTNConfig:
        """The config that rounds the weights: 8-bit, symmetric, per channel, dense (no sparse storage)."""
        shared = dict(
            bits=8, group_size=-1, sym=True, modules_to_not_convert=self.modules_to_not_convert,
            scale_dtype=self.scale_dtype, allow_partial=self.allow_partial, keep_sparsity=False,
        )  # fmt: skip
        if self.weights == "rtn":
            return RTNConfig(**shared)
        calibration = {name: getattr(self, name) for name in ("dataset", "num_samples", "seq_len", "batch_size")}
        return GPTQConfig(**shared, **calibration, damp_percent=self.damp_percent, hessian_dtype=self.hessian_dtype)
