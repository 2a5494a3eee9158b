"""GPTQ with low-rank compensation of its quantization error against plain GPTQ at the neighbouring widths, on
../shared/refmodel, scored on held-out text.

Every row sees the same calibration windows (the held-out texts of scripts/bench_gptq.py are never used for
calibration). Bits per weight are the stored bits of the quantized layers (codes, scales, and the correction's
float16 factors) over their weights, as `hfcompress evaluate` reports them. The last column says where each
compensated point lies against the straight line from w3 to w4 at the same bits: negative is better than
spending those bits on a mix of 3- and 4-bit layers would be, if mixing were linear.

    python scripts/bench_compensation.py
    python scripts/bench_compensation.py --budgets 0.25 0.5 --group-size 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench_gptq import SHARED, add_data_arguments, load, quality_setup, score

import hfcompress
from hfcompress.evaluation.footprint import bits_per_weight


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    add_data_arguments(parser, num_samples=128, max_windows=100)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="compensation bits per weight")
    args = parser.parse_args()
    heldout, calibration, _, reference, header = quality_setup(args, "Low-rank compensation")
    texts = list(heldout)
    print(header + "\n")
    print("| method | bits per weight | " + " | ".join(f"ppl {t}" for t in texts)
          + " | vs float32 | seconds | vs the w3-w4 line |")  # fmt: skip
    print("| --- | --- |" + " --- |" * (len(texts) + 3))
    print("| float32 | 32 | " + " | ".join(f"{reference[t]:.3f}" for t in texts) + " | | | |", flush=True)
    rows = [("GPTQ w3", 3, {}), ("GPTQ w4", 4, {})]
    rows += [(f"GPTQ w3 + compensation {b:g} bits", 3, {"compensation_bits": b}) for b in args.budgets]
    points = {}
    for name, bits, extra in rows:
        model = load(args.model)
        config = hfcompress.GPTQConfig(
            bits=bits, group_size=args.group_size, dataset=calibration, num_samples=len(calibration), **extra
        )
        start = time.perf_counter()
        hfcompress.quantize(model, config)
        seconds = time.perf_counter() - start
        ppl = score(model, heldout)
        change = statistics.mean(ppl[t] / reference[t] - 1 for t in texts)
        bpw = bits_per_weight(model)
        points[bits if not extra else name] = (bpw, change)
        line = ""
        if extra:
            (b3, c3), (b4, c4) = points[3], points[4]
            expected = c3 + (c4 - c3) * (bpw - b3) / (b4 - b3)
            line = f"{100 * (change - expected):+.2f} points"
        print(f"| {name} | {bpw:.3f} | " + " | ".join(f"{ppl[t]:.3f}" for t in texts)
              + f" | {100 * change:+.2f}% | {seconds:.1f} | {line} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
