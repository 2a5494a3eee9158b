"""Decode speed and memory of quantized models on CPU, against fp32 measured in the same run.

Builds a Llama-shaped model of about 0.47B parameters from a config (random weights: speed does not depend on
them; hidden 1024, 24 layers, intermediate 4096, vocab 32000, untied embeddings), then for each format
generates new tokens greedily with the KV cache at batch 1 and 8 and reports tokens/s (median of --runs),
the bytes of the model's tensors (weights as stored plus any repacked kernel copies), and the process's
resident memory, and the time of one forward over a --prefill-tokens prompt (the prompt's cost before the first
new token; median of --prefill-runs). Formats: fp32, bf16, w4 g128 and w8 per-channel through the fused kernels, w4 g128 through the
dequantize-then-matmul fallback (fewer tokens: it is slow), scalar k-means at 4 bits ("kmeans4") and vector
codebooks of 2 weights per 4-bit index ("vq2x2", 2 bits per weight): random codes and books in `CodebookLinear`
layers, run by the codebook kernels. "w4 g128 bf16-prefill" is w4 g128 with HFCOMPRESS_PREFILL_DTYPE=bfloat16: its
prompts multiply dequantized tiles in bfloat16 (the float32 model's default: float32); "bf16 w4 g128" is the model
held in bfloat16, then quantized (its prompts take bfloat16 tiles where the CPU has native bfloat16 dot products).
A format followed by " avx2" (e.g. "w4 g128 avx2") runs with HFCOMPRESS_CPU_ISA=avx2: on a CPU with AVX-512 it
measures the AVX2 decoding loop beside the AVX-512 one that the plain format picks.

w4 g128 is quantized here with round-to-nearest: GPTQ produces the same layers (same `QuantLinear`, same
kernel), so its speed is the same; only the codes differ.

    python scripts/bench_inference.py
    python scripts/bench_inference.py --formats fp32 "w4 g128" "w4 g128 bf16-prefill" --new-tokens 0   # prompts only
    python scripts/bench_inference.py --formats fp32 "w4 g128" "w4 g128 avx2" kmeans4 "kmeans4 avx2" --prefill-tokens 0
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.core.structure import set_submodule
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.codebook_linear import CodebookLinear
from hfcompress.quantization.kernels import DequantizeKernel
from hfcompress.quantization.modules import QuantLinear

SHAPE = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(model) -> int:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        kernel = getattr(module, "_kernel", None)
        if kernel is not None:
            total += sum(v.numel() * v.element_size() for v in vars(kernel).values() if isinstance(v, torch.Tensor))
    return total


def build(fmt: str):
    fmt = fmt.removesuffix(" avx2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    if fmt.startswith("bf16"):
        model = model.to(torch.bfloat16)
    if fmt in ("w4 g128", "w4 g128 dequantize", "w4 g128 bf16-prefill", "bf16 w4 g128"):
        hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=128))
    elif fmt == "w8":
        hfcompress.quantize(model, hfcompress.RTNConfig(bits=8, group_size=-1, sym=True))
    if fmt == "kmeans4":
        _random_codebooks(model, bits=4)
    if fmt == "vq2x2":
        _random_codebooks(model, bits=2, dim=2)
    if fmt == "w4 g128 dequantize":
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module._kernel = DequantizeKernel(module, torch.float32)
                module._kernel_key = (torch.device("cpu"), torch.float32)
    return model


def _random_codebooks(model, bits: int, dim: int = 1) -> None:
    """Every linear of the decoder blocks as a `CodebookLinear` with random codes and books: scalar k-means (one
    table per row) for dim 1, else one vector codebook per layer (VQConfig's default). Speed does not depend on
    their values; fitting them to 168 random layers would take minutes and change nothing."""
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            codes = torch.randint(0, 2 ** (bits * dim), (out_features, in_features // dim), generator=generator)
            books = (out_features, 2**bits) if dim == 1 else (1, 2 ** (bits * dim), dim)
            tables = torch.randn(*books, generator=generator) * 0.02
            layer = CodebookLinear.from_codes(codes, tables, bits, module.bias)
            set_submodule(model.model.layers, name, layer)


@torch.no_grad()
def prefill_seconds(model, prompt: torch.Tensor, runs: int) -> float:
    """Median seconds of one forward over `prompt` [1, tokens] (what the first new token waits for)."""
    model(input_ids=prompt[:, :8])  # warm-up, builds kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(input_ids=prompt, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode_rate(model, batch: int, new_tokens: int, runs: int, prompt_len: int = 16) -> float:
    prompt = torch.randint(0, SHAPE["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up, builds kernels
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
        assert out.shape[1] == prompt_len + new_tokens
        rates.append(batch * new_tokens / seconds)
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--slow-new-tokens", type=int, default=8, help="new tokens for bf16 and the fallback")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill timing (0: none)")
    parser.add_argument("--prefill-runs", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=["fp32", "w4 g128", "w8", "bf16", "w4 g128 dequantize"])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SHAPE)).parameters())
    print(f"model: Llama shape {SHAPE}, {params / 1e9:.3f}B parameters, random weights; CPU, "
          f"{torch.get_num_threads()} threads; greedy decode with KV cache after a 16-token prompt; median of {args.runs}\n")  # fmt: skip
    rows = []
    for fmt in args.formats:
        model = build(fmt)
        slow = fmt in ("bf16", "w4 g128 dequantize")
        tokens = args.slow_new_tokens if slow else args.new_tokens
        row = {"format": fmt, "new_tokens": tokens}
        if fmt.endswith("bf16-prefill"):
            os.environ["HFCOMPRESS_PREFILL_DTYPE"] = "bfloat16"
        if fmt.endswith(" avx2"):  # the kernels pick their loop at the first call, below
            os.environ["HFCOMPRESS_CPU_ISA"] = "avx2"
        for batch in (1, 8):
            rate = decode_rate(model, batch, tokens, 1 if slow else args.runs) if tokens else float("nan")
            row[f"tokens_per_s_b{batch}"] = rate
        if args.prefill_tokens:
            prompt = torch.randint(
                0, SHAPE["vocab_size"], (1, args.prefill_tokens), generator=torch.Generator().manual_seed(2)
            )
            row["prefill_s"] = prefill_seconds(model, prompt, args.prefill_runs)
        os.environ.pop("HFCOMPRESS_PREFILL_DTYPE", None)
        os.environ.pop("HFCOMPRESS_CPU_ISA", None)
        row["tensor_bytes"] = tensor_bytes(model)
        row["rss_bytes"] = rss_bytes()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
    base = rows[0]
    prefill = f" {args.prefill_tokens}-token prefill (s) | vs fp32 |" if args.prefill_tokens else ""
    print(
        f"\n| format | new tokens | tok/s b1 | vs fp32 | tok/s b8 | vs fp32 |{prefill} model tensors (MB) | vs fp32 | RSS after (MB) |"
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if prefill else "") + "---|---|---|")
    for r in rows:
        time_column = f" {r['prefill_s']:.3f} | {base['prefill_s'] / r['prefill_s']:.2f}x |" if prefill else ""
        print(f"| {r['format']} | {r['new_tokens']} | {r['tokens_per_s_b1']:.2f} | {r['tokens_per_s_b1'] / base['tokens_per_s_b1']:.2f}x "
              f"| {r['tokens_per_s_b8']:.2f} | {r['tokens_per_s_b8'] / base['tokens_per_s_b8']:.2f}x |{time_column} {r['tensor_bytes'] / 1e6:.0f} "
              f"| {r['tensor_bytes'] / base['tensor_bytes']:.2f}x | {r['rss_bytes'] / 1e6:.0f} |")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
