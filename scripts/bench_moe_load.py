"""How long `from_pretrained` takes on a quantized mixture of experts with many experts, against the same model
unquantized, in the same run.

A 4-block Qwen3-MoE (hidden 64, expert width 32) with `--experts` experts per block is built at random, saved, and
quantized with round-to-nearest (w4 g32, every expert a linear of its own: 3 x experts x blocks of them). Both
checkpoints are loaded `--runs` times; the table gives the median seconds of each, their ratio, and the part of the
quantized load that hfcompress's check of every compressed layer against the manifest takes
(`checkpoint.verify.check_tensors`, before the weights load). The widths are tiny on purpose: what grows here is
the number of layers and tensors, which is what a check that scanned every key once per layer made quadratic.

    python scripts/bench_moe_load.py
    python scripts/bench_moe_load.py --experts 256 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.checkpoint import hf_quantizer
from hfcompress.hub.record import hardware_description


def build(folder: Path, experts: int) -> tuple[Path, Path]:
    """The float checkpoint and its RTN w4 g32 quantization, in `folder`."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=128,
    )  # fmt: skip
    dense, quantized = folder / "float", folder / "rtn"
    Qwen3MoeForCausalLM(config).save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    hfcompress.compress(model, hfcompress.RTNConfig(bits=4, group_size=32))
    model.save_pretrained(quantized)
    return dense, quantized


def timed_loads(folder: Path, runs: int) -> tuple[list[float], list[float]]:
    """Seconds of each `from_pretrained` of `folder`, and of the `check_tensors` calls in each."""
    checks: list[float] = []
    original = hf_quantizer.check_tensors

    def check_tensors(model, files):
        start = time.perf_counter()
        try:
            return original(model, files)
        finally:
            checks[-1] += time.perf_counter() - start

    hf_quantizer.check_tensors = check_tensors
    try:
        loads = []
        for _ in range(runs):
            checks.append(0.0)
            start = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            loads.append(time.perf_counter() - start)
    finally:
        hf_quantizer.check_tensors = original
    return loads, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=1024, help="Experts per block (default: 1024).")
    parser.add_argument("--runs", type=int, default=3, help="Loads of each checkpoint (default: 3).")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        dense, quantized = build(Path(tmp), args.experts)
        float_loads, _ = timed_loads(dense, args.runs)
        loads, checks = timed_loads(quantized, args.runs)
    linears = 3 * args.experts * 4
    print(f"machine: {hardware_description()}")
    print(f"Qwen3-MoE, 4 blocks x {args.experts} experts ({linears} expert linears), median of {args.runs} loads")
    print("| checkpoint | from_pretrained (s) | of it, check_tensors (s) |")
    print("| --- | --- | --- |")
    print(f"| float32 (transformers alone) | {statistics.median(float_loads):.2f} | |")
    print(f"| RTN w4 g32 (hfcompress) | {statistics.median(loads):.2f} | {statistics.median(checks):.2f} |")
    print(f"ratio quantized / float: {statistics.median(loads) / statistics.median(float_loads):.2f}x")


if __name__ == "__main__":
    main()
