"""What bfloat16 prompts cost in quality and gain in speed on a trained model (`HFCOMPRESS_PREFILL_DTYPE`).

Quantizes ../shared/refmodel (float32) to w4 g128 with round-to-nearest, then scores it on held-out windows twice:
with its prompts multiplied in float32 (the default: the outputs of dequantize-then-matmul) and in bfloat16
(HFCOMPRESS_PREFILL_DTYPE=bfloat16: inputs, weights and outputs of those matmuls rounded to bfloat16), and times
one forward over a --seq-len prompt for float32, w4 float32 prompts and w4 bfloat16 prompts (median of --runs,
ratios in the same run). Perplexity here runs the model's own forward, outside `core.precision.exact_matmuls`
(which `hfcompress evaluate` enters), so the rounding shows.

    python scripts/bench_prefill.py
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from bench_gptq import SHARED, heldout_texts, load
from bench_inference import prefill_seconds
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.data import tokenize_windows
from hfcompress.hub.record import hardware_description


@torch.no_grad()
def plain_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for batch in windows.split(4):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--text", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = tokenize_windows(tokenizer, heldout_texts(args.text), args.seq_len)[: args.max_windows]
    print(f"hardware: {hardware_description()}; {len(windows)} windows of {args.seq_len} tokens\n")

    dense = load(args.model)
    quantized = hfcompress.quantize(load(args.model), hfcompress.RTNConfig(bits=4, group_size=128))
    rows = {"float32": (dense, "float32"), "w4 g128, float32 prompts": (quantized, "float32"),
            "w4 g128, bfloat16 prompts": (quantized, "bfloat16")}  # fmt: skip
    results = {}
    for name, (model, prefill) in rows.items():
        os.environ["HFCOMPRESS_PREFILL_DTYPE"] = prefill
        results[name] = (plain_perplexity(model, windows), prefill_seconds(model, windows[:1], args.runs))
    os.environ.pop("HFCOMPRESS_PREFILL_DTYPE")
    base_seconds = results["float32"][1]
    exact_ppl = results["w4 g128, float32 prompts"][0]
    print("| model | perplexity | vs w4 float32 prompts | forward (ms) | vs float32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, (ppl, seconds) in results.items():
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / exact_ppl - 1):+.3f}% | {1000 * seconds:.1f} "
              f"| {base_seconds / seconds:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
