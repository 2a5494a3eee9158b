"""Fused low-bit matmuls behind `QuantLinear`, chosen once per layer, device and dtype.

On CPU the fused kernels serve calls of a few rows (decoding); bigger calls (prompts) dequantize, a tile at a
time inside hfcompress's kernel (`AvxCpuKernel`), else the whole layer (see `SmallBatchKernel`).

- 4 and 8 bits on an AVX2 CPU: hfcompress's own kernel (`csrc/wq_gemv_cpu.cpp`, `AvxCpuKernel`), built on
  first use; any group size that is a multiple of 8, act-order by a one-time permutation. 4-bit decoding of one
  or two rows runs an AVX-512F loop where the CPU has it and the group size is a multiple of 16 (`gemv_isa`).
  Prompts multiply dequantized tiles with torch's matmul: float32, or bfloat16 for bfloat16 models where the CPU
  has AVX-512 BF16 or AMX (`prefill_dtype`; HFCOMPRESS_PREFILL_DTYPE=bfloat16 asks for it for float32 models too).
  HFCOMPRESS_DECODE_ACTIVATIONS=int8 rounds the inputs of 4-bit decoding calls to int8 per block of 32, as
  llama.cpp does, for int8 dot products (AVX-512 VNNI where the CPU has it, else AVX2; `decode_activations`).
- Otherwise, 4 bits on CPU: torch's `_weight_int4pack_mm_for_cpu` (weight-only int4 with per-group scale and
  offset). Our codes are repacked once into its layout; act-order layers permute their input columns so
  each group is contiguous; per-channel layers use the largest supported group that divides the input
  size, with the row's scale repeated.
- 8 bits per channel on CPU: torch's `_weight_int8pack_mm` on `codes - 128`, plus a rank-one term for
  asymmetric zero points.
- 4 bits on CUDA with fp16/bf16 inputs: the experimental Triton kernel (`hfcompress/experimental/triton_w4.py`),
  only with HFCOMPRESS_EXPERIMENTAL_TRITON=1 (not yet verified on a GPU).
- (torch's ops and the Triton kernel are wrapped in `wrapped_kernels.py`; this module chooses among them all.)
- Anything else: dequantize the layer's weight for the call, then `F.linear` (no dense copy is kept).

The output layer a quantized model keeps whole (float32 or bfloat16) decodes through the same file's dense loop
(`decode_linear.DecodeLinear`, `dense_matmul`): torch's matmul reads such a weight 2-4x slower at a few rows.

Codebook layers (`CodebookLinear`: scalar k-means of 2, 4 or 8 bits, vector codebooks of 2 or 4 weights per 4-
or 8-bit index) read their codes and books directly on an AVX2 CPU for calls of up to `LUT_MAX_ROWS` rows
(`LutCpuKernel`; 4-bit k-means rows and books of 2 weights per 4-bit index in AVX-512F where the CPU has it);
longer calls (prompts) decode a tile of rows at a time into a buffer for torch's matmul, in `prefill_dtype` as for
the uniform grid, and everything else (other dtypes, calls that need a gradient) rebuilds the dense weight.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ..core.packing import pack_codes
from ..core.precision import matmuls_must_be_exact
from .cpu_extension import load, unavailable_reason
from .wrapped_kernels import Int4CpuKernel, Int8CpuKernel, TritonW4Kernel, cpu_float

__all__ = [
    "AvxCpuKernel",
    "DequantizeKernel",
    "Int4CpuKernel",
    "Int8CpuKernel",
    "LutCpuKernel",
    "SmallBatchKernel",
    "TritonW4Kernel",
    "cpu_isa",
    "gemv_isa",
    "native_bfloat16",
    "prefill_dtype",
    "select_codebook_kernel",
    "select_kernel",
]

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

# codebook loops up to this many rows, decoded tiles and torch's matmul beyond: measured on 4096x4096, 11008x4096
# and 4096x11008 (2 AMD EPYC cores), the loops took 0.44-0.98x the tiles' time at 32 rows, 0.64-1.23x at 48; the
# AVX2 loop of 2-weight books (no AVX-512F) took 0.66-1.14x at 24 rows, 0.74-1.29x at 32, so it stops at 16
LUT_MAX_ROWS = 32
VQ_AVX2_MAX_ROWS = 16
# calls of more rows (prompts, big batches) go through dequantized tiles and torch's matmul: measured on 4096x4096
# and 1024x1024 (2 AMD EPYC cores), the tiles win from 12 rows in bfloat16 (3.9 vs 4.1 ms), 24 in float32
GEMV_MAX_ROWS = {torch.bfloat16: 10, torch.float32: 16}
PREFILL_TILE = 1 << 22  # weights dequantized at a time for calls of more than GEMV_MAX_ROWS rows (16 MB in float32)
PREFILL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_ISAS = ("auto", "avx2")
DECODE_ACTIVATIONS = ("float32", "int8")


def gemv_isa(module, bits: int, group_size: int) -> str:
    """The instruction set of the decoding loops: "avx512" for 4-bit layers whose group size (a codebook layer: its
    input size) is a multiple of 16 where the CPU has AVX-512F, else "avx2". `AvxCpuKernel` and `LutCpuKernel`
    take it for calls of one or two rows (1.15-1.4x the AVX2 loop for uniform grids, 1.2-1.8x for k-means at one
    row; at more rows and at 8 bits it was not faster, so those stay AVX2); for vector codebooks of 2 weights per
    4-bit index, passes of up to four rows (3.6x at one row, 1.6x at four). HFCOMPRESS_CPU_ISA=avx2 keeps the AVX2
    loops everywhere (to compare the two, or to rule the AVX-512 ones out)."""
    wide = cpu_isa() == "auto" and bits == 4 and group_size % 16 == 0
    return "avx512" if wide and module.has_avx512() else "avx2"


def cpu_isa() -> str:
    """HFCOMPRESS_CPU_ISA: "auto" (the default: each loop takes the widest instructions this CPU has) or "avx2"."""
    choice = os.environ.get("HFCOMPRESS_CPU_ISA", "auto")
    if choice not in CPU_ISAS:
        raise ValueError(f"HFCOMPRESS_CPU_ISA={choice!r}: expected one of {', '.join(CPU_ISAS)}")
    return choice


def decode_activations(module, layer) -> str:
    """How 4-bit decoding calls (up to `GEMV_MAX_ROWS` rows) of `layer` treat their inputs: "float32" (the default:
    the codes are converted and multiplied in float32) or, with HFCOMPRESS_DECODE_ACTIVATIONS=int8, "int8": each
    input row is rounded to int8 per block of 32 inputs (scale: the block's largest magnitude / 127, llama.cpp's
    Q8_0) and multiplied with the codes by int8 dot products: `vpdpbusd` where the CPU has AVX-512 VNNI, 1.7-3.1x
    the float32 loop at one row (measured on 1024x1024 to 11008x4096 layers, groups 32 and 128, 2 AMD EPYC cores),
    else (or with HFCOMPRESS_CPU_ISA=avx2) AVX2's `vpmaddubsw`. That rounding moves the outputs (about 0.5% of their
    range on random layers), so it is asked for, not taken by default. It needs an input size that is a multiple of
    128 and groups of 32, 64 or a multiple of 128; layers that miss one of these keep float32. Calibration and
    evaluation (`exact_matmuls`) always take float32."""
    choice = os.environ.get("HFCOMPRESS_DECODE_ACTIVATIONS", "float32")
    if choice not in DECODE_ACTIVATIONS:
        raise ValueError(f"HFCOMPRESS_DECODE_ACTIVATIONS={choice!r}: expected one of {', '.join(DECODE_ACTIVATIONS)}")
    group = layer.group_size
    fits = layer.bits == 4 and layer.in_features % 128 == 0 and (group in (32, 64) or group % 128 == 0)
    return "int8" if choice == "int8" and fits else "float32"


def prefill_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which calls of many rows (prompts) on CPU multiply inputs of `dtype`: float32 inside
    `core.precision.exact_matmuls()` (calibration, evaluation); for bfloat16 inputs bfloat16 where the CPU has
    native bfloat16 dot products (AVX-512 BF16 or AMX), float32 elsewhere (faster there than emulated bfloat16);
    for float32 inputs HFCOMPRESS_PREFILL_DTYPE: "float32" (the default) or "bfloat16", which rounds the inputs,
    weights and outputs of each such matmul to bfloat16 as a bfloat16 model does, for 2-4x the speed on such CPUs."""
    if matmuls_must_be_exact():
        return torch.float32
    if dtype == torch.bfloat16:
        return dtype if native_bfloat16() else torch.float32
    choice = os.environ.get("HFCOMPRESS_PREFILL_DTYPE", "float32")
    if choice not in PREFILL_DTYPES:
        raise ValueError(f"HFCOMPRESS_PREFILL_DTYPE={choice!r}: expected 'float32' or 'bfloat16'")
    return PREFILL_DTYPES[choice]


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class DequantizeKernel:
    """Dequantize-then-matmul, `DEQUANTIZE_TILE` weights (whole rows) at a time: a large layer's dense weight, and
    the int64 copies that unpacking codes of fewer than 32 bits takes, are never whole in memory."""

    name = "dequantize"

    def __init__(self, layer, dtype):
        self.layer = layer
        # codes packed row by row unpack a tile of rows alone; others (a pruned layer's kept codes) at once
        whole = not getattr(layer, "CODES_IN_WEIGHT", False)
        self.rows = layer.out_features if whole else max(1, DEQUANTIZE_TILE // layer.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer.out_features
        if out <= self.rows:
            return F.linear(x, self.layer.dequantize_weight(x.dtype))
        tiles = [
            F.linear(x, self.layer.dequantize_weight(x.dtype, start, min(start + self.rows, out)))
            for start in range(0, out, self.rows)
        ]
        return torch.cat(tiles, dim=-1)


# weights dequantized at a time by `DequantizeKernel` (16 MB in float32)
DEQUANTIZE_TILE = 2**22


class SmallBatchKernel:
    """A fused kernel for calls of at most `max_rows` rows, dequantize-then-matmul for bigger ones.

    torch's CPU int4/int8 weight-only kernels cost in proportion to the rows of the input (measured here,
    4096x4096: 21 ms at 1 row, 640 ms at 32, while dequantizing the layer costs about as much as a few rows),
    so prefill and batched calls go through the dense matmul.
    """

    def __init__(self, fused, fallback, max_rows: int = 4):
        self.fused, self.fallback, self.max_rows = fused, fallback, max_rows
        self.name = f"{fused.name} (rows <= {max_rows}), else dequantize"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.fused(x) if rows <= self.max_rows else self.fallback(x)


class AvxCpuKernel:
    """hfcompress's own weight-only matmul for 4- and 8-bit layers on AVX2 CPUs (`csrc/wq_gemv_cpu.cpp`), any
    group size that is a multiple of 8, symmetric or asymmetric, act-order through a one-time column permutation.
    Inputs that need a gradient go through the dequantized weight (the C++ calls are not differentiable). Other
    calls of up to `GEMV_MAX_ROWS` rows read the packed codes directly (8 per 32-bit word at 4 bits) and compute
    in float32 (4-bit calls of one or two rows 16 codes a step on CPUs with AVX-512F: `gemv_isa`); longer ones
    (prompts) dequantize `PREFILL_TILE` weights at a time into a buffer and multiply it with torch's matmul, in
    `prefill_dtype` (bfloat16 for bfloat16 models on CPUs with native bfloat16 dot products, float32 otherwise
    unless HFCOMPRESS_PREFILL_DTYPE asks for bfloat16). With HFCOMPRESS_DECODE_ACTIVATIONS=int8, 4-bit calls of up
    to `GEMV_MAX_ROWS` rows round their inputs to int8 per block of 32 and take int8 dot products (AVX-512 VNNI
    where the CPU has it, else AVX2; `decode_activations`)."""

    name = "avx2-wq"

    @staticmethod
    def supports(layer, device, dtype) -> str | None:
        if layer.bits not in (4, 8):
            return f"{layer.bits}-bit"
        if not cpu_float(device, dtype):
            return f"{device.type}/{dtype}"
        if layer.group_size % 8 or layer.in_features % 8:
            return f"group size {layer.group_size} / input size {layer.in_features} not multiples of 8"

        return unavailable_reason()

    def __init__(self, layer, dtype):
        self.module = load()
        self.differentiable = DequantizeKernel(layer, dtype)
        self.bits, self.group = layer.bits, layer.group_size
        self.avx512 = gemv_isa(self.module, layer.bits, layer.group_size) == "avx512"
        self.name = "avx512-wq" if self.avx512 else "avx2-wq"
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes = layer.codes()
        self.perm = None
        if layer.weight_g_idx is not None:  # groups contiguous: visit columns group by group
            self.perm = torch.argsort(layer.weight_g_idx, stable=True)
            codes = codes[:, self.perm]
        if self.perm is None and layer.CODES_IN_WEIGHT:
            self.packed = layer.weight  # the stored layout is the kernel's: no copy
        else:
            self.packed = pack_codes(codes, layer.bits).contiguous()
        self.scale = layer.weight_scale.float().contiguous()
        self.zero = layer.zero_points().float().contiguous()
        self.int8 = decode_activations(self.module, layer) == "int8"
        if self.int8:
            self.vnni = self.avx512 and self.module.has_avx512_vnni()  # HFCOMPRESS_CPU_ISA=avx2: the AVX2 loop
            self.name += "+int8" if self.vnni else "+int8-avx2"
            # a symmetric grid's zero points are all one value: the int8 loop then reads one number, not a tensor
            shared = self.zero.flatten()[:1]
            self.int8_zero = shared if bool((self.zero == shared).all()) else self.zero
            # float16 scales are read as they are stored (half the bytes: decoding is bound by reading the layer)
            half = layer.weight_scale.dtype == torch.float16
            self.int8_scale = layer.weight_scale.detach().contiguous() if half else self.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training through the layer (adapters): differentiable
            return self.differentiable(x)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        flat = x.reshape(-1, self.in_features)
        compute = prefill_dtype(x.dtype)
        if flat.shape[0] <= GEMV_MAX_ROWS[compute]:  # decoding: read the codes directly
            if self.int8 and not matmuls_must_be_exact():
                y = self.module.wq_matmul_int8(
                    flat.float().contiguous(), self.packed, self.int8_scale, self.int8_zero, self.group, self.vnni
                )
            else:
                y = self.module.wq_matmul(
                    flat.float().contiguous(), self.packed, self.scale, self.zero, self.bits, self.group, self.avx512
                )
        else:  # a prompt: dequantized tiles and torch's matmul
            y = self.module.wq_matmul_tiled(
                flat.to(compute).contiguous(),
                self.packed,
                self.scale,
                self.zero,
                self.bits,
                self.group,
                max(1, PREFILL_TILE // self.in_features),
            )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class LutCpuKernel:
    """hfcompress's own matmul for codebook layers (`csrc/wq_gemv_cpu.cpp`): scalar k-means (`lut_matmul`: each
    group of 8 codes becomes 8 weights by looking them up in the row's table held in registers; 4-bit calls of one
    or two rows on CPUs with AVX-512F, 16 codes in one permute: `gemv_isa`) and vector codebooks of 2 or 4
    weights per 4- or 8-bit index (`vq_matmul`: each index loads its entry; 2 weights per 4-bit index from the book
    held in registers, in AVX-512F 16 weights by one permute); no dense weight is built. Calls of more than
    `max_rows` rows (prompts; `LUT_MAX_ROWS`, or `VQ_AVX2_MAX_ROWS` for vector books without an AVX-512 loop)
    decode `PREFILL_TILE` weights at a time into a buffer of `prefill_dtype` and multiply it with torch's matmul
    (`codebook_matmul_tiled`)."""

    name = "avx2-lut"

    @staticmethod
    def supports(layer, device, dtype) -> str | None:
        scalar = layer.dim == 1 and layer.books == layer.out_features
        if scalar and layer.bits not in (2, 4, 8):
            return f"{layer.bits}-bit"
        if not scalar and (layer.dim not in (2, 4) or layer.index_bits not in (4, 8)):
            return f"vector codebooks of dim {layer.dim} with {layer.index_bits}-bit indices"
        if not cpu_float(device, dtype):
            return f"{device.type}/{dtype}"
        if layer.in_features % (16 if scalar and layer.bits == 2 else 8):
            return f"input size {layer.in_features}"
        return unavailable_reason()

    def __init__(self, layer, dtype):
        self.module = load()
        self.scalar = layer.dim == 1 and layer.books == layer.out_features
        self.bits, self.dim, self.index_bits = layer.bits, layer.dim, layer.index_bits
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = layer.weight.contiguous()
        books = layer.weight_codebook.float()
        self.tables = books.reshape(layer.out_features, -1).contiguous() if self.scalar else books.contiguous()
        self.books = self.tables.view(layer.out_features, -1, 1) if self.scalar else self.tables  # [books, 2^bits, dim]
        # AVX-512 loops: 4-bit k-means rows, and books of 2 weights per 4-bit index
        bits = self.bits if self.scalar else self.index_bits if self.dim == 2 else 0
        self.avx512 = gemv_isa(self.module, bits, self.in_features) == "avx512"
        self.name = "avx512-lut" if self.avx512 else "avx2-lut"
        self.max_rows = LUT_MAX_ROWS if self.scalar or self.avx512 else VQ_AVX2_MAX_ROWS  # then decoded tiles

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > self.max_rows:  # a prompt: decoded tiles of PREFILL_TILE weights, torch's matmul
            tile = max(1, PREFILL_TILE // self.in_features)
            flat = flat.to(prefill_dtype(x.dtype)).contiguous()
            y = self.module.codebook_matmul_tiled(flat, self.packed, self.books, self.dim, self.index_bits, tile)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        flat = flat.float().contiguous()
        if self.scalar:
            y = self.module.lut_matmul(flat, self.packed, self.tables, self.bits, self.avx512)
        else:
            y = self.module.vq_matmul(flat, self.packed, self.tables, self.dim, self.index_bits, self.avx512)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def select_codebook_kernel(layer, device: torch.device, dtype: torch.dtype):
    """`LutCpuKernel` where it computes the codebook `layer` for inputs on `device` in `dtype`, else None (the
    layer rebuilds its dense weight)."""
    reason = LutCpuKernel.supports(layer, device, dtype)
    if reason is None:
        _log_once(
            LutCpuKernel.name,
            f"k-means layers on {device.type}/{dtype} use {LutCpuKernel.name} (rows <= {LUT_MAX_ROWS})",
        )
        return LutCpuKernel(layer, dtype)
    _log_once("dense-codebook", f"codebook layers on {device.type}/{dtype} rebuild their dense weight ({reason})")
    return None


def select_kernel(layer, device: torch.device, dtype: torch.dtype):
    """The fastest kernel that computes `layer` exactly for inputs on `device` in `dtype`."""
    reasons = []
    for kernel in (AvxCpuKernel, Int4CpuKernel, Int8CpuKernel, TritonW4Kernel):
        reason = kernel.supports(layer, device, dtype)
        if reason is None:
            chosen = kernel(layer, dtype)
            if device.type == "cpu" and kernel is not AvxCpuKernel:  # it has its own path for many rows
                chosen = SmallBatchKernel(chosen, DequantizeKernel(layer, dtype), max_rows=4)
            _log_once(kernel.name, f"{layer.bits}-bit layers on {device.type}/{dtype} use {chosen.name}")
            return chosen
        reasons.append(f"{kernel.name}: {reason}")
    _log_once(
        "dequantize",
        f"{layer.bits}-bit group {layer.group_size} on {device.type}/{dtype}: dequantize-then-matmul ({'; '.join(reasons)})",
    )
    return DequantizeKernel(layer, dtype)


def _log_once(kind: str, message: str) -> None:
    if (kind, message) not in _logged:
        _logged.add((kind, message))
        logger.info(message)
