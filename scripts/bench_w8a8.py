"""W8A8 (SmoothQuant, int8 weights and per-token int8 activations) on ../shared/refmodel: perplexity on held-out
text against float32, and the forward pass at 512 tokens against float32 in the same run.

Every variant sees the same calibration windows and is scored on the held-out texts of scripts/bench_gptq.py.
Latency: one window of `--tokens` tokens (batch 1, no cache), float32 and W8A8 models timed in alternation,
`--repeats` calls each after warm-up; the table gives each one's median and the ratio of the medians.

    python scripts/bench_w8a8.py
    python scripts/bench_w8a8.py --alphas 0 0.5 0.8 --weights gptq rtn
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_gptq import SHARED, add_data_arguments, load, quality_setup, score

import hfcompress


@torch.inference_mode()
def median_forward_ms(models: dict, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on `ids`, the models timed in alternation."""
    times = {name: [] for name in models}
    for model in models.values():
        for _ in range(3):
            model(ids)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(ids)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    add_data_arguments(parser, num_samples=128, max_windows=100)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5], help="SmoothQuant strengths")
    parser.add_argument("--weights", nargs="+", default=["gptq", "rtn"], choices=["gptq", "rtn"])
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the timed forward pass")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    heldout, calibration, reference_model, reference, header = quality_setup(args, "W8A8")
    texts = list(heldout)
    ids = next(iter(heldout.values()))[:1, : args.tokens]
    print(f"{header}; torch {torch.__version__}; forward: 1 x {ids.shape[1]} tokens, median of {args.repeats}\n")
    print("| weights | SmoothQuant α | " + " | ".join(f"ppl {t}" for t in texts)
          + " | vs float32 | seconds | forward ms (float32 / W8A8) | speed-up |")  # fmt: skip
    print("| --- | --- |" + " --- |" * (len(texts) + 4))
    print("| float32 | - | " + " | ".join(f"{reference[t]:.3f}" for t in texts) + " | | | | |", flush=True)
    for weights in args.weights:
        for alpha in args.alphas:
            model = load(args.model)
            config = hfcompress.W8A8Config(
                smoothquant=alpha, weights=weights, dataset=calibration, num_samples=len(calibration)
            )
            start = time.perf_counter()
            hfcompress.quantize(model, config)
            seconds = time.perf_counter() - start
            ppl = score(model, heldout)
            change = statistics.mean(ppl[t] / reference[t] - 1 for t in texts)
            ms = median_forward_ms({"float32": reference_model, "w8a8": model}, ids, args.repeats)
            print(f"| {weights} | {alpha:g} | " + " | ".join(f"{ppl[t]:.3f}" for t in texts)
                  + f" | {100 * change:+.2f}% | {seconds:.1f} | {ms['float32']:.1f} / {ms['w8a8']:.1f} | "
                  f"{ms['float32'] / ms['w8a8']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
