"""AWQ against GPTQ, round-to-nearest and full precision on ../shared/refmodel, scored on held-out text.

Every method sees the same calibration windows (chosen once, handed over as token ids) and is scored on the
held-out texts of scripts/bench_gptq.py (non-overlapping windows). Prints a markdown table per setting:
perplexity per text, the mean change over float32, quantization seconds.

    python scripts/bench_awq.py
    python scripts/bench_awq.py --settings 4:128 3:128 --num-samples 128
    python scripts/bench_awq.py --llmcompressor-python /path/to/venv/bin/python   # adds llm-compressor's AWQ
    python scripts/bench_awq.py --settings 4:128 --only-variants --variant noclip:clip=false

With --llmcompressor-python, llm-compressor's `AWQModifier` (duo scaling, 20 grid points, then its
`QuantizationModifier`: round to nearest) runs on the same calibration windows in its own environment
(scripts/llmcompressor_gptq.py --awq) and its weights are scored by the same code as every other row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_gptq import (
    SHARED,
    add_data_arguments,
    load,
    parse_variant,
    quality_setup,
    run_peer,
    score,
    score_peer,
)
from safetensors.torch import save_file

import hfcompress


def configs(bits: int, group_size: int, calibration: torch.Tensor, variants=(), only_variants=False) -> dict:
    data = {"dataset": calibration, "num_samples": len(calibration)}
    runs = {
        "RTN": hfcompress.RTNConfig(bits=bits, group_size=group_size),
        "GPTQ (default)": hfcompress.GPTQConfig(bits=bits, group_size=group_size, **data),
        "AWQ": hfcompress.AWQConfig(bits=bits, group_size=group_size, **data),
        "AWQ + GPTQ": hfcompress.AWQConfig(bits=bits, group_size=group_size, weights="gptq", **data),
    }
    if only_variants:
        runs = {}
    for name, overrides in variants:
        runs[f"AWQ {name}"] = hfcompress.AWQConfig(bits=bits, group_size=group_size, **{**data, **overrides})
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    add_data_arguments(parser, num_samples=128, max_windows=100)
    parser.add_argument("--settings", nargs="+", default=["4:128", "3:128"], help="bits:group_size")
    parser.add_argument("--llmcompressor-python", help="a python with llm-compressor, to add its AWQModifier")
    parser.add_argument(
        "--variant", action="append", default=[], type=parse_variant,
        help="an extra AWQ row with AWQConfig fields changed, e.g. noclip:clip=false (repeatable)",
    )  # fmt: skip
    parser.add_argument("--only-variants", action="store_true", help="skip the RTN, GPTQ and AWQ default rows")
    args = parser.parse_args()
    heldout, calibration, _, reference, header = quality_setup(args, "AWQ")
    texts = list(heldout)
    print(header + "\n")
    print("| setting | method | " + " | ".join(f"ppl {t}" for t in texts) + " | vs float32 | seconds |")
    print("| --- | --- |" + " --- |" * (len(texts) + 2))
    print("| - | float32 | " + " | ".join(f"{reference[t]:.3f}" for t in texts) + " | | |")
    for setting in args.settings:
        bits, group_size = (int(v) for v in setting.split(":"))
        for name, config in configs(bits, group_size, calibration, args.variant, args.only_variants).items():
            model = load(args.model)
            start = time.perf_counter()
            hfcompress.quantize(model, config)
            seconds = time.perf_counter() - start
            ppl = score(model, heldout)
            change = statistics.mean(ppl[t] / reference[t] - 1 for t in texts)
            print(f"| w{bits} g{group_size} | {name} | " + " | ".join(f"{ppl[t]:.3f}" for t in texts)
                  + f" | {100 * change:+.2f}% | {seconds:.1f} |", flush=True)  # fmt: skip
        if args.llmcompressor_python:
            with tempfile.TemporaryDirectory() as tmp:
                ids_file, weights_file = Path(tmp) / "ids.safetensors", Path(tmp) / "weights.safetensors"
                save_file({"input_ids": calibration.contiguous()}, ids_file)
                seconds = run_peer(args, ids_file, bits, group_size, weights_file, extra=["--awq"])
                ppl = score_peer(args, weights_file, heldout)["perplexity"]
            change = statistics.mean(ppl[t] / reference[t] - 1 for t in texts)
            print(f"| w{bits} g{group_size} | llm-compressor AWQ | " + " | ".join(f"{ppl[t]:.3f}" for t in texts)
                  + f" | {100 * change:+.2f}% | {seconds:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
