"""What int8 decoding activations (`HFCOMPRESS_DECODE_ACTIVATIONS=int8`) cost in quality and gain in speed.

Quantizes ../shared/refmodel (float32) to w4 g32 sym (llama.cpp's Q4_0 grid) with round-to-nearest, then, for
float32 decoding activations (the default) and int8 ones (each decoding call's inputs rounded to int8 per block of
32, as llama.cpp does; AVX-512 VNNI dot products where the CPU has them, else AVX2's), scores held-out windows token by token through the KV cache, so every
matmul is a one-row decoding call (the path int8 changes; a prompt's forward would take the float32 tiles), and
times greedy decoding at batch 1 (median of --runs). Both settings in one run, on fresh copies of the model
(kernels are chosen when a layer first runs).

    python scripts/bench_int8_decode.py
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_gptq import SHARED, heldout_texts, load
from transformers import AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.data import tokenize_windows
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.cpu_extension import load as load_kernels


@torch.no_grad()
def decoding_perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity of `windows` [n, seq] fed one token at a time through the KV cache."""
    nll, count = 0.0, 0
    for window in windows:
        cache, logits = DynamicCache(config=model.config), []
        for position in range(window.numel() - 1):
            out = model(input_ids=window[None, position : position + 1], cache=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
        nll += float(F.cross_entropy(torch.stack(logits), window[1:], reduction="sum"))
        count += window.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def decode_rate(model, prompt: torch.Tensor, tokens: int, runs: int) -> float:
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument(
        "--heldout", nargs="+", default=[str(SHARED / "corpus" / "val.txt"), str(SHARED / "docs-cls" / "val.jsonl")]
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=8, help="per held-out file")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if load_kernels() is None:
        raise SystemExit("int8 decoding activations need hfcompress's CPU kernels (a C++ compiler and AVX2)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = {path: tokenize_windows(tokenizer, heldout_texts(path), args.seq_len)[: args.max_windows]
             for path in args.heldout}  # fmt: skip
    print(f"hardware: {hardware_description()}; {args.max_windows} windows of {args.seq_len} tokens per file\n")
    prompt = next(iter(texts.values()))[:1, :8]
    config = hfcompress.RTNConfig(bits=4, group_size=32, sym=True)
    results = {}
    for activations in ("float32", "int8"):
        os.environ["HFCOMPRESS_DECODE_ACTIVATIONS"] = activations
        model = hfcompress.quantize(load(args.model), config)
        scores = [decoding_perplexity(model, windows) for windows in texts.values()]
        results[activations] = scores, decode_rate(model, prompt, args.new_tokens, args.runs)
    os.environ.pop("HFCOMPRESS_DECODE_ACTIVATIONS")
    names = [os.path.basename(path) for path in texts]
    print(f"| w4 g32 sym, decoding activations | {' | '.join(names)} | decode tokens/s | vs float32 |")
    print(f"| --- | {' | '.join('---' for _ in names)} | --- | --- |")
    base_scores, base_rate = results["float32"]
    for activations, (scores, rate) in results.items():
        cells = " | ".join(f"{s:.4f} ({100 * (s / b - 1):+.3f}%)" for s, b in zip(scores, base_scores, strict=True))
        print(f"| {activations} | {cells} | {rate:.1f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
