"""Every weight format side by side on a real trained model: bitsandbytes, k-means, VQ, RTN and GPTQ.

For each setting: perplexity on the first windows of val.txt before saving and after a save_pretrained ->
from_pretrained round trip, weight bytes on disk, stored bits per weight, quantization seconds, and forward
latency of one window (median of runs) as a ratio to FP32 measured in the same process. Prints a markdown
table; numbers go to --json-out.

    python scripts/bench_quant.py                      # ../shared/refmodel, ../shared/corpus
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress import BnbConfig, GPTQConfig, KMeansConfig, RTNConfig, VQConfig
from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import bits_per_weight, perplexity, weights_size_bytes
from hfcompress.evaluation.latency import forward_latency
from hfcompress.hub.record import hardware_description

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def settings(calib: str, num_samples: int) -> list[tuple[str, object]]:
    data = dict(dataset=calib, num_samples=num_samples)
    return [
        ("bnb int8", BnbConfig(bits=8)),
        ("bnb NF4", BnbConfig(bits=4, quant_type="nf4")),
        ("bnb NF4 + double quant", BnbConfig(bits=4, quant_type="nf4", double_quant=True)),
        ("bnb FP4", BnbConfig(bits=4, quant_type="fp4")),
        ("k-means 4-bit", KMeansConfig(bits=4, **data)),
        ("RTN 4-bit per-channel", RTNConfig(bits=4, group_size=-1)),
        ("GPTQ 4-bit g128", GPTQConfig(bits=4, group_size=128, **data)),
        ("k-means 3-bit", KMeansConfig(bits=3, **data)),
        ("RTN 3-bit per-channel", RTNConfig(bits=3, group_size=-1)),
        ("GPTQ 3-bit per-channel", GPTQConfig(bits=3, group_size=-1, **data)),
        ("VQ 2 bits/weight (dim 2)", VQConfig(bits=2, dim=2, **data)),
        ("VQ 2 bits/weight (dim 4)", VQConfig(bits=2, dim=4, **data)),
        ("RTN 2-bit g64", RTNConfig(bits=2, group_size=64)),
        ("GPTQ 2-bit g64", GPTQConfig(bits=2, group_size=64, **data)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="run only settings whose name contains one of these")
    parser.add_argument("--json-out", default="bench_out/quant/results.json")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = tokenize_windows(tokenizer, load_texts(args.val), args.seq_len)[: args.max_windows]
    one = windows[:1]
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fp32_latency = forward_latency(fp32, one, runs=args.latency_runs)
    rows = [{
        "setting": "FP32", "perplexity": perplexity(fp32, windows), "reloaded": None, "size_bytes": None,
        "bits_per_weight": 32.0, "seconds": 0.0, "latency_ratio": 1.0,
    }]  # fmt: skip
    for name, config in settings(args.calib, args.num_samples):
        if args.only and not any(key in name for key in args.only):
            continue
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        start = time.perf_counter()
        model = hfcompress.quantize(model, config, tokenizer=tokenizer).eval()
        seconds = time.perf_counter() - start
        before = perplexity(model, windows)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            size = weights_size_bytes(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            after = perplexity(reloaded, windows)
        latency = forward_latency(reloaded, one, runs=args.latency_runs)
        rows.append({
            "setting": name, "perplexity": before, "reloaded": after, "size_bytes": size,
            "bits_per_weight": bits_per_weight(reloaded), "seconds": seconds, "latency_ratio": fp32_latency / latency,
        })  # fmt: skip
        print(rows[-1], flush=True)
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"rows": rows, "windows": len(windows)}, indent=2))
    print(f"\n{args.model}, perplexity on {len(windows)} windows of {args.seq_len} tokens of {args.val}")
    print("| setting | perplexity | after reload | size (MB) | bits/weight | quantize (s) | speed vs FP32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f}" if r["size_bytes"] else "-"
        reloaded = f"{r['reloaded']:.3f}" if r["reloaded"] is not None else "-"
        print(f"| {r['setting']} | {r['perplexity']:.3f} | {reloaded} | {size} | {r['bits_per_weight']:.2f} | "
              f"{r['seconds']:.1f} | {r['latency_ratio']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
