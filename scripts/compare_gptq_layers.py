"""Compare hfcompress's GPTQ with llm-compressor's layer by layer, on the very same calibration token ids.

Perplexity alone cannot tell a difference of method from the spread GPTQ has at 3 bits (the order of the samples
alone moves docs-cls perplexity by 2% there). This looks inside: for every quantized linear it prints the output
error each library left, ``tr(dW H dWᵀ) / tr(W H Wᵀ)`` with ``H`` the Gram matrix of that linear's inputs in the
float model on the calibration ids (summed in float64), and the share of weights on which the two agree exactly.
Equal errors everywhere and identical first blocks mean the same algorithm; a module type where one side is
consistently worse points at the difference.

    python scripts/compare_gptq_layers.py --llmcompressor-python /path/to/venv/bin/python --bits 3 --group-size 128
    python scripts/compare_gptq_layers.py ... --variant peerlike:true_sequential=false,clip_search=false

Both sides run with static act-order, asymmetric grids, dampening 0.01, blocks of 128 columns (llm-compressor's
defaults, as in scripts/bench_gptq.py); --variant changes GPTQConfig fields on our side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from bench_gptq import SHARED, add_data_arguments, gptq_config, load, parse_variant, prepare_data, run_peer, score
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.modules import QuantLinear


def input_grams(model, ids: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Each linear's (lm_head aside) input Gram matrix in the float model, summed in float64."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return accumulate

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            model(ids[start : start + batch])
    for handle in handles:
        handle.remove()
    return grams


def output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(dW H dWᵀ) / tr(W H Wᵀ): the share of the linear's output energy the quantization error carries."""
    weight, delta = weight.double(), quantized.double() - weight.double()
    return (torch.trace(delta @ gram @ delta.T) / torch.trace(weight @ gram @ weight.T)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    add_data_arguments(parser)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    parser.add_argument("--variant", default="default:", help="NAME:FIELD=VALUE,... GPTQConfig fields for our side")
    parser.add_argument("--llmcompressor-python", required=True, help="python of a venv with llmcompressor")
    parser.add_argument("--no-score", action="store_true", help="skip the held-out perplexities")
    args = parser.parse_args()
    args.act_order = True
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    heldout, calibration = prepare_data(args, AutoTokenizer.from_pretrained(args.model))
    name, overrides = parse_variant(args.variant)
    reference = load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, peer_file = Path(tmp) / "ids.safetensors", Path(tmp) / "peer.safetensors"
        save_file({"input_ids": calibration.contiguous()}, ids_file)
        run_peer(args, ids_file, args.bits, args.group_size, peer_file)
        peer = load_file(peer_file)
    model = load(args.model)
    hfcompress.quantize(model, gptq_config(args, calibration, args.bits, args.group_size, overrides))
    ours = {
        f"{module_name}.weight": module.dequantize_weight(torch.float32)
        for module_name, module in model.named_modules()
        if isinstance(module, QuantLinear)
    }
    grams = input_grams(reference, calibration)
    weights = reference.state_dict()

    print(f"# GPTQ w{args.bits} g{args.group_size}, hfcompress ({name}) vs llm-compressor, layer by layer\n")
    print(f"{hardware_description()}; {len(calibration)} x {args.seq_len} calibration tokens, the same ids for both\n")
    print("| linear | hfcompress error | llm-compressor error | weights equal |\n| --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for module_name, gram in grams.items():
        key = f"{module_name}.weight"
        errors = [output_error(weights[key], side[key], gram) for side in (ours, peer)]
        totals = [t + e for t, e in zip(totals, errors, strict=True)]
        equal = torch.isclose(ours[key], peer[key], rtol=0, atol=1e-6 * peer[key].abs().max().item())
        print(f"| {module_name} | {errors[0]:.5f} | {errors[1]:.5f} | {equal.float().mean().item():.2%} |")
    print(f"| sum | {totals[0]:.4f} | {totals[1]:.4f} | |")
    if not args.no_score:
        for label, state in ((f"hfcompress ({name})", ours), ("llm-compressor", peer)):
            scored = load(args.model)
            scored.load_state_dict(state, strict=False)
            perplexities = ", ".join(f"{text} {value:.3f}" for text, value in score(scored, heldout).items())
            print(f"\nperplexity, {label}: {perplexities}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
