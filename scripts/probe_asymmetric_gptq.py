"""Does GPTQ gain from asymmetric calibration (GPTAQ, "GPTQ v2")? A probe on ../shared/refmodel.

GPTQ solves each linear for the inputs the already-quantized model gives it, `X~`, as if the float model's
output on them, `W X~`, were the target. Asymmetric calibration aims at the float model's own output `W X`
instead: `min ‖W X − Q X~‖²`, which is GPTQ's problem on the least-squares target `W' = W C H⁻¹` (`C = X X~ᵀ`
the cross moment, `H = X~ X~ᵀ`), so the earlier blocks' error is corrected as well as the layer's own. `--alpha`
blends: `W + α (W' − W)` (GPTQModel's `v2_alpha`).

This probe walks the blocks itself (two streams of activations: the float model's and the quantized one's;
true-sequential in the block's call order, GPTQ's defaults otherwise, `hfcompress.quantization.gptq.gptq_quantize`)
and scores each run on the held-out texts of scripts/bench_gptq.py. `--alpha 0` is plain GPTQ on the same walk,
the control. It measures; the library does not offer the mode (see README, "Benchmarks").

    python scripts/probe_asymmetric_gptq.py --bits 3 --group-size 128 --alpha 0 1 --orders 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_gptq import SHARED, add_data_arguments, load, quality_setup, score
from torch import nn

import hfcompress
from hfcompress.core.capture import capture_block_inputs, hidden_states_of, with_hidden_states
from hfcompress.core.structure import find_layer_stack
from hfcompress.core.trace import trace_block
from hfcompress.quantization.gptq import gptq_quantize


def leader_inputs(block: nn.Module, leader: str, inputs) -> list[torch.Tensor]:
    """The input rows [tokens, features] of `block`'s linear `leader` for each batch of `inputs`."""
    seen = []
    handle = block.get_submodule(leader).register_forward_pre_hook(
        lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).float())
    )
    try:
        for item in inputs:
            block(*item.args, **item.kwargs)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def quantize(model: nn.Module, calibration: torch.Tensor, config: hfcompress.GPTQConfig, alpha: float) -> float:
    """GPTQ of every linear in `model`'s blocks, aiming at the float model's outputs with weight `alpha`;
    returns the seconds it took."""
    start = time.perf_counter()
    prefix, blocks = find_layer_stack(model)
    quantized = capture_block_inputs(model, blocks[0], list(calibration.split(8)))
    floats = list(quantized)
    scale_dtype = getattr(torch, config.scale_dtype)
    for index, block in enumerate(blocks):
        original = copy.deepcopy(block) if alpha else None
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        trace = trace_block(block, f"{prefix}.{index}", [f"{prefix}.{index}.{n}" for n in names], quantized[0])
        for group in trace.groups:  # in call order: each group sees the groups before it quantized
            x_q = leader_inputs(block, group[0], quantized)
            H = sum(x.t() @ x for x in x_q)
            if alpha:
                x_f = leader_inputs(original, group[0], floats)
                C = sum(f.t() @ q for f, q in zip(x_f, x_q, strict=True))
                damped = H + config.damp_percent * H.diagonal().mean() * torch.eye(H.shape[0])
            for name in group:
                linear = block.get_submodule(name)
                weight = linear.weight.float()
                if alpha:
                    target = torch.linalg.solve(damped, C.t() @ weight.t()).t()  # W C H⁻¹
                    weight = weight + alpha * (target - weight)
                codes, _ = gptq_quantize(
                    weight, H, config.bits, config.group_size, config.sym, config.act_order, config.static_groups,
                    config.damp_percent, config.block_size, config.searches_clip(config.bits), config.clip_objective,
                    scale_dtype=scale_dtype,
                )  # fmt: skip
                linear.weight.copy_(codes.dequantize(torch.float32))
        quantized = [with_hidden_states(x, hidden_states_of(block(*x.args, **x.kwargs))) for x in quantized]
        if alpha:
            floats = [with_hidden_states(x, hidden_states_of(original(*x.args, **x.kwargs))) for x in floats]
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    add_data_arguments(parser)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 1.0], help="0: plain GPTQ (the control)")
    parser.add_argument(
        "--orders",
        type=int,
        default=1,
        help="runs per alpha: the calibration windows in the first order, then shuffled",
    )
    args = parser.parse_args()
    heldout, calibration, _, reference, header = quality_setup(args, "GPTQ with asymmetric calibration")
    print(header + "\n")
    texts = list(heldout)
    print(f"| w{args.bits} g{args.group_size} | order | " + " | ".join(texts) + " | seconds |")
    print("| --- | --- |" + " --- |" * (len(texts) + 1))
    print("| float32 | | " + " | ".join(f"{reference[t]:.3f}" for t in texts) + " | |")
    results = {alpha: [] for alpha in args.alpha}
    for order in range(args.orders):
        generator = torch.Generator().manual_seed(order)
        windows = calibration if order == 0 else calibration[torch.randperm(len(calibration), generator=generator)]
        for alpha in args.alpha:
            config = hfcompress.GPTQConfig(
                bits=args.bits, group_size=args.group_size, dataset=windows, num_samples=len(windows)
            )
            model = load(args.model)
            seconds = quantize(model, windows, config, alpha)
            results[alpha].append(score(model, heldout))
            cells = " | ".join(f"{results[alpha][-1][t]:.3f}" for t in texts)
            print(f"| alpha {alpha:g} | {order} | {cells} | {seconds:.1f} |", flush=True)
    for alpha, runs in results.items():
        means = " | ".join(f"{statistics.mean(r[t] for r in runs):.3f}" for t in texts)
        print(f"| alpha {alpha:g}, mean | | {means} | |")


if __name__ == "__main__":
    main()
