"""Per-layer speed of hfcompress's quantized linear kernels against the dense baseline measured in the same run.

For each shape (out x in) and batch M: median time of >= --runs calls, and its ratio to the dense layer
(fp32 `nn.Linear` on CPU, or bf16 with `--dtype bfloat16`; bf16 cuBLAS on CUDA). CPU rows: w4 g128 and w8 per-channel through the kernel
`select_kernel` picks (hfcompress's AVX2 kernel where it builds; where the CPU has AVX-512F, 4-bit calls of one
or two rows take its AVX-512 loop, and at M = 1 the AVX2 loop is timed beside it), torch's own int4pack op on
the same codes (the peer, up to 4 rows) and the dequantize-then-matmul fallback; codebook layers (random codes)
through `LutCpuKernel`, 4-bit k-means ("kmeans4") and 2 weights per 4-bit index ("vq2x2"): its loops up to 32 rows,
with the AVX2 loop beside the AVX-512 one where the CPU has it, and its decoded tiles beyond (beside the dense
weight rebuilt for the call, what such calls did before). CUDA rows: w4 g128 through the Triton kernel, torch's own int4
kernel (tinygemm, the peer) and the fallback. Every kernel is first checked against dequantize-then-matmul.

    python scripts/bench_kernels.py                 # CPU, the issue's shapes
    python scripts/bench_kernels.py --device cuda   # adds 8192x8192 at M = 1 and 16
    python scripts/bench_kernels.py --dtype bfloat16 --batches 64 512   # a bfloat16 model's prompts
    python scripts/bench_kernels.py --int8 --batches 1 2   # w4 g128 with int8 decoding activations, every loop

With `--int8`, calls of up to 4 rows of the w4 g128 layer also run with int8 decoding activations
(HFCOMPRESS_DECODE_ACTIVATIONS=int8) through each int8 loop this CPU has: AVX-512 VNNI (`vpdpbusd`) and AVX2
(`vpmaddubsw`), each checked against the same rounding of the inputs then a float64 product.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from hfcompress.hub.record import hardware_description
from hfcompress.quantization.codebook_linear import CodebookLinear
from hfcompress.quantization.cpu_extension import load as load_kernels
from hfcompress.quantization.grid import rtn_quantize
from hfcompress.quantization.kernels import (
    LUT_MAX_ROWS,
    AvxCpuKernel,
    DequantizeKernel,
    Int4CpuKernel,
    LutCpuKernel,
    select_codebook_kernel,
    select_kernel,
)
from hfcompress.quantization.modules import QuantLinear


def timer(fn, runs, device):
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def int8_rows(layer, x, weight, runs):
    """(name, seconds) of `layer` with int8 decoding activations through every int8 loop this CPU has."""
    if load_kernels() is None:  # no compiler: no int8 loop
        return []
    blocks = x.float().reshape(x.shape[0], -1, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    scale = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    rounded = (torch.round(blocks * scale) * (largest / 127.0)).reshape(x.shape)
    expected = rounded.double() @ weight.double().T
    found, seen = [], set()
    for isa in ("auto", "avx2"):
        os.environ["HFCOMPRESS_DECODE_ACTIVATIONS"], os.environ["HFCOMPRESS_CPU_ISA"] = "int8", isa
        try:
            kernel = AvxCpuKernel(layer, torch.float32)
        finally:
            del os.environ["HFCOMPRESS_DECODE_ACTIVATIONS"], os.environ["HFCOMPRESS_CPU_ISA"]
        if kernel.name in seen:  # auto took the AVX2 loop too (no AVX-512 VNNI)
            continue
        seen.add(kernel.name)
        err = (kernel(x).double() - expected).abs().max().item() / expected.abs().max().item()
        if err > 1e-5:
            raise SystemExit(f"w4 g128 {kernel.name} disagrees with int8 rounding then matmul: {err:.3g}")
        found.append((f"w4 g128 {kernel.name}", timer(partial(kernel, x), runs, x.device)))
    return found


def quant_layer(weight, bits, group_size, sym=False):
    q = rtn_quantize(weight, bits, group_size, sym)
    return QuantLinear.from_quantized(q, group_size, sym, False)


def codebook_layer(out_features, in_features, dim):
    """Random codes and books: 4-bit k-means levels per row (dim 1), or one book of 2 weights per 4-bit index."""
    bits = 4 if dim == 1 else 2
    codes = torch.randint(0, 2 ** (bits * dim), (out_features, in_features // dim))
    books = torch.randn(out_features, 2**bits) if dim == 1 else torch.randn(1, 2 ** (bits * dim), dim)
    return CodebookLinear.from_codes(codes, books * 0.02, bits, None)


def kernel_and_weight(layer, device, dtype):
    """The kernel the layer would pick, and the dense weight it must agree with."""
    if isinstance(layer, CodebookLinear):
        return select_codebook_kernel(layer, device, dtype), layer.dense_weight(torch.float32)
    return select_kernel(layer, device, dtype), layer.dequantize_weight(torch.float32)


def tinygemm(layer, x):
    """torch's CUDA int4 kernel on the same codes; None if this torch lacks it."""
    try:
        codes = layer.codes().to(torch.int32)
        packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.to(x.device), 8)
        scale = layer.weight_scale.float()
        zero = layer.zero_points().float()
        sz = torch.stack([scale, scale * (8 - zero)], -1).transpose(0, 1).contiguous().to(x.device, x.dtype)
        fn = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, layer.group_size, sz)  # noqa: E731
        expected = F.linear(x.float(), layer.dequantize_weight(torch.float32).to(x.device))
        err = (fn().float() - expected).abs().max().item() / expected.abs().max().item()
        return fn if err < 0.05 else None
    except Exception:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", help="rows per call (default: 1 16 on CUDA, 1 8 32 on CPU)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="CPU inputs' dtype (the dense baseline's too): bfloat16 for a bfloat16 model's calls",
    )  # fmt: skip
    parser.add_argument("--int8", action="store_true", help="also w4 g128 with int8 decoding activations, every loop")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        shapes, batches, dtype = [(8192, 8192), (4096, 4096), (11008, 4096), (4096, 11008)], [1, 16], torch.bfloat16
        name = torch.cuda.get_device_name(device)
    else:
        shapes, batches, dtype = [(4096, 4096), (11008, 4096), (4096, 11008)], [1, 8, 32], getattr(torch, args.dtype)
        name = f"CPU, {torch.get_num_threads()} threads"
    batches = args.batches or batches
    print(f"device: {name}; dtype {dtype}; median of {args.runs} runs\n")
    print("| out x in | M | dense ms | kernel | ms | speed-up vs dense |")
    print("|---|---|---|---|---|---|")
    results = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features) * 0.02
        dense = weight.to(device, dtype)
        variants = {"w4 g128": quant_layer(weight, 4, 128)}
        if device.type == "cpu":
            variants["w8 per-channel"] = quant_layer(weight, 8, -1, sym=True)
            variants["kmeans4"] = codebook_layer(out_features, in_features, 1)
            variants["vq2x2"] = codebook_layer(out_features, in_features, 2)
        for m in batches:
            x = torch.randn(m, in_features, device=device, dtype=dtype)
            base = timer(partial(F.linear, x, dense), args.runs, device)
            rows = [("dense", base)]
            for label, layer in variants.items():
                codebook = isinstance(layer, CodebookLinear)
                layer = layer.to(device)
                kernel, weight_used = kernel_and_weight(layer, device, dtype)
                if kernel is None:
                    continue
                expected = F.linear(x.float(), weight_used)
                err = (kernel(x).float() - expected).abs().max().item() / expected.abs().max().item()
                if err > (1e-4 if dtype == torch.float32 else 0.02):
                    raise SystemExit(f"{label} {kernel.name} disagrees with dequantize-then-matmul: {err:.3g}")
                rows.append((f"{label} {kernel.name}", timer(partial(kernel, x), args.runs, device)))
                # the AVX2 loop on the same codes, where the AVX-512 one serves these rows
                if kernel.name.startswith("avx512") and (m == 1 or (codebook and m <= LUT_MAX_ROWS)):
                    os.environ["HFCOMPRESS_CPU_ISA"] = "avx2"
                    avx2 = LutCpuKernel(layer, dtype) if codebook else AvxCpuKernel(layer, dtype)
                    del os.environ["HFCOMPRESS_CPU_ISA"]
                    rows.append((f"{label} {avx2.name}", timer(partial(avx2, x), args.runs, device)))
                if codebook and m > LUT_MAX_ROWS:  # what such calls did before the tiles: rebuild, then matmul
                    rebuild = lambda x=x, layer=layer: F.linear(x, layer.dense_weight(dtype))  # noqa: E731
                    rows.append((f"{label} dense rebuild", timer(rebuild, max(10, args.runs // 5), device)))
                if args.int8 and device.type == "cpu" and label == "w4 g128" and m <= 4 and dtype == torch.float32:
                    rows += int8_rows(layer, x, weight_used, args.runs)
                if device.type == "cpu" and label == "w4 g128" and m <= 4:
                    peer = Int4CpuKernel(layer, dtype)  # torch's own fused int4 op, the peer
                    rows.append((f"{label} torch int4pack (peer)", timer(partial(peer, x), args.runs, device)))
                if kernel.name != "dequantize" and label == "w4 g128":
                    fallback = DequantizeKernel(layer, dtype)
                    rows.append((f"{label} dequantize", timer(partial(fallback, x), max(10, args.runs // 5), device)))
                if device.type == "cuda" and label == "w4 g128":
                    fn = tinygemm(layer, x)
                    if fn is not None:
                        rows.append((f"{label} tinygemm (torch)", timer(fn, args.runs, device)))
            for label, seconds in rows[1:]:
                print(
                    f"| {out_features}x{in_features} | {m} | {base * 1e3:.3f} | {label} | {seconds * 1e3:.3f} | {base / seconds:.2f}x |"
                )
                results.append({"shape": [out_features, in_features], "m": m, "kernel": label, "dense_s": base,
                                "seconds": seconds, "speedup": base / seconds, "device": name})  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
