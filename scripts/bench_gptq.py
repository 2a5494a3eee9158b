"""GPTQ vs round-to-nearest vs full precision on a real trained model, and GPTQ's speed against llm-compressor.

Runs in one process (llm-compressor, if asked for, in a subprocess of its own virtual environment, one after
the other, never at the same time) and prints a markdown table: perplexity on the validation text
(non-overlapping windows), quantization seconds, weight bytes on disk and bits per weight of the quantized
layers, for each setting. Then the checks of the GPTQ issue.

    python scripts/bench_gptq.py                                   # ../shared/refmodel, no llm-compressor
    python scripts/bench_gptq.py --llmcompressor-python /path/to/venv/bin/python

GPTQ runs with the library's defaults (static act-order on, true-sequential calibration); --no-act-order
turns act-order off on both sides, --two-pass-rows adds rows for the two-pass calibration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import bits_per_weight, perplexity, weights_size_bytes
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.modules import cast_unquantized

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SETTINGS = [(4, 128), (4, -1), (3, 128), (3, -1), (2, 64)]
# gptq: the library defaults (static act-order, true-sequential staged calibration);
# gptq-2pass: the same with true_sequential=False (full-precision Hessians, then the quantized outputs)


def load(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def quantize_and_measure(args, config, val_windows, out_dir):
    model = load(args.model)
    start = time.perf_counter()
    hfcompress.quantize(model, config)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, val_windows)
    bpw = bits_per_weight(model)
    cast_unquantized(model, torch.float16)  # what the CLI saves: full-precision parts in the checkpoint dtype
    model.save_pretrained(out_dir)
    return {"perplexity": ppl, "seconds": seconds, "size_bytes": weights_size_bytes(out_dir), "bits_per_weight": bpw}


def gptq_config(args, bits, group_size, true_sequential=True):
    return hfcompress.GPTQConfig(
        bits=bits, group_size=group_size, dataset=args.calib, num_samples=args.num_samples, seq_len=args.seq_len,
        act_order=args.act_order, static_groups=args.act_order, true_sequential=true_sequential,
        clip_search=args.clip_search, damp_percent=args.damp_percent,
    )  # fmt: skip


def time_llmcompressor(args, group_size):
    command = [
        args.llmcompressor_python, str(HERE / "llmcompressor_gptq.py"), args.model, "--dataset", args.calib,
        "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--group-size", str(group_size),
    ]  # fmt: skip
    if args.act_order:
        command.append("--act-order")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"llm-compressor failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--max-windows", type=int, default=100, help="validation windows (the reference figures use 100)"
    )
    parser.add_argument(
        "--act-order", action=argparse.BooleanOptionalAction, default=True,
        help="GPTQ with static act-order, both sides (default: on, the library's default)",
    )  # fmt: skip
    parser.add_argument("--timing-runs", type=int, default=2, help="runs of the 4-bit g128 speed comparison")
    parser.add_argument(
        "--two-pass-rows", action="store_true", help="also a row per setting for GPTQ with true_sequential=False"
    )
    parser.add_argument("--clip-search", action="store_true", help="RTN and GPTQ with the MSE grid search")
    parser.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ dampening (default: 0.01)")
    parser.add_argument("--llmcompressor-python", help="python of a virtual environment with llmcompressor")
    parser.add_argument("--json-out", help="also write the results here")
    parser.add_argument(
        "--settings",
        default=None,
        help="only these bits:group settings, e.g. '4:128,3:-1' (default: the five of the issue)",
    )
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    settings = SETTINGS
    if args.settings:
        settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    val_windows = tokenize_windows(tokenizer, load_texts(args.val), args.seq_len)[: args.max_windows]
    rows = []
    fp32 = load(args.model)
    rows.append(
        {"method": "fp32", "bits": 32, "group_size": None, "perplexity": perplexity(fp32, val_windows), "seconds": 0.0,
         "size_bytes": weights_size_bytes(args.model), "bits_per_weight": bits_per_weight(fp32)}
    )  # fmt: skip
    del fp32
    gptq_methods = ("gptq", "gptq-2pass") if args.two_pass_rows else ("gptq",)
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group_size in settings:
            for method in ("rtn", *gptq_methods):
                if method == "rtn":
                    config = hfcompress.RTNConfig(bits=bits, group_size=group_size, clip_search=args.clip_search)
                else:
                    config = gptq_config(args, bits, group_size, true_sequential=method == "gptq")
                out = Path(tmp) / f"{method}-{bits}-{group_size}"
                row = {"method": method, "bits": bits, "group_size": group_size}
                row.update(quantize_and_measure(args, config, val_windows, out))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

        timing = {"gptq": [], "gptq-2pass": [], "llmcompressor": []}
        for _ in range(args.timing_runs if args.llmcompressor_python else 0):
            for method in ("gptq", "gptq-2pass"):
                model = load(args.model)
                start = time.perf_counter()
                hfcompress.quantize(model, gptq_config(args, 4, 128, true_sequential=method == "gptq"))
                timing[method].append(time.perf_counter() - start)
                del model
            timing["llmcompressor"].append(time_llmcompressor(args, 128))
            print(json.dumps(timing), file=sys.stderr, flush=True)

    print(f"model {args.model}; calibration {args.num_samples} x {args.seq_len} tokens of {args.calib}; "
          f"perplexity on the first {len(val_windows)} {args.seq_len}-token windows of {args.val}; "
          f"act-order {'static' if args.act_order else 'off'}; clip search {args.clip_search}; damp {args.damp_percent}; torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| method | bits | group | perplexity | vs fp32 | quantize s | weights on disk (MB) | bits/weight |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        group = "-" if r["group_size"] is None else ("channel" if r["group_size"] == -1 else r["group_size"])
        print(f"| {r['method']} | {r['bits']} | {group} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% "
              f"| {r['seconds']:.1f} | {r['size_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} |")  # fmt: skip

    print("\nchecks:")
    by = {(r["method"], r["bits"], r["group_size"]): r for r in rows}
    for method in gptq_methods:
        for bits, group_size in settings:
            g, r = by[(method, bits, group_size)], by[("rtn", bits, group_size)]
            print(f"- {method} beats RTN at {bits}-bit group {group_size}: {g['perplexity'] < r['perplexity']} "
                  f"({g['perplexity']:.3f} vs {r['perplexity']:.3f})")  # fmt: skip
        if (method, 4, 128) not in by:
            continue
        g4 = by[(method, 4, 128)]
        print(f"- {method} 4-bit g128 within 1.5% of fp32: {g4['perplexity'] <= 1.015 * base} "
              f"({100 * (g4['perplexity'] / base - 1):+.2f}%)")  # fmt: skip
        print(
            f"- {method} 4-bit g128 bits per weight <= 4.3: {g4['bits_per_weight'] <= 4.3} ({g4['bits_per_weight']:.3f})"
        )
    if timing["llmcompressor"]:
        theirs = statistics.median(timing["llmcompressor"])
        for method in ("gptq", "gptq-2pass"):
            ours = statistics.median(timing[method])
            print(f"- {method} 4-bit g128 quantization time vs llm-compressor GPTQModifier (median of "
                  f"{args.timing_runs}): {ours:.1f} s vs {theirs:.1f} s = {ours / theirs:.2f}x, at most 0.5x: "
                  f"{ours <= 0.5 * theirs}")  # fmt: skip
        print(f"  runs (s): {json.dumps({k: [round(x, 1) for x in v] for k, v in timing.items()})}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()
