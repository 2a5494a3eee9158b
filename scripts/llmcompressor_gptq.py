"""Run llm-compressor's GPTQModifier (or, with --awq, its AWQModifier followed by round-to-nearest, the
QuantizationModifier) on the job scripts/bench_gptq.py or scripts/bench_awq.py gives it (run it in its own venv).

The calibration windows come as token ids (a safetensors file with `input_ids` [n, seq_len]), so the peer sees
exactly the data hfcompress sees. Prints one JSON line: {"seconds": ...} for the `oneshot` call alone (model load
and save not counted). With --save-weights, the quantized linears' weights (on the grid, dequantized) are written
as safetensors for bench_gptq.py to score with the same perplexity code as its own rows.
Needs only llmcompressor, transformers, datasets, safetensors.
"""

import argparse
import json
import time

import torch


def quantized_state(model) -> dict:
    """Every float tensor of the model (AWQ also changed the norms and linears its scales fold into), each quantized
    linear's weight on its grid: a RTN (QuantizationModifier) weight is still float, quantized at run time, so it
    is fake-quantized here with its own scale and zero point (a GPTQ weight already lies on the grid)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and hasattr(module, "weight_scale"):
            zero = getattr(module, "weight_zero_point", None)
            with torch.no_grad():
                weight = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights)
            state[f"{name}.weight"] = weight.detach().float().clone()
    for name, tensor in model.state_dict().items():
        if name not in state and tensor.is_floating_point() and not name.rpartition(".")[2].startswith("weight_"):
            state[name] = tensor.detach().float().clone()  # a copy: safetensors refuses tied tensors
    return state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--ids", required=True, help="safetensors file holding the calibration `input_ids`")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    parser.add_argument("--act-order", action="store_true", help="static act-order (llm-compressor's default)")
    parser.add_argument("--damp", type=float, default=0.01, help="dampening_frac")
    parser.add_argument("--save-weights", help="write the quantized linears' weights here (safetensors)")
    parser.add_argument(
        "--awq", action="store_true", help="AWQModifier (duo scaling, n_grid 20), then round to nearest"
    )
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = load_file(args.ids)["input_ids"]
    rows = ids.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * ids.shape[1] for _ in rows]})
    config_groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": args.bits,
                "type": "int",
                "symmetric": False,
                "strategy": "group" if args.group_size > 0 else "channel",
                "group_size": args.group_size if args.group_size > 0 else None,
            },
        }
    }
    if args.awq:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        # it pins its cached activations for host-to-device copies unconditionally, which fails without an
        # accelerator: on a CPU-only machine there is nothing to copy to
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        recipe = [
            AWQModifier(duo_scaling=True, n_grid=20),
            QuantizationModifier(config_groups=config_groups, ignore=["lm_head"]),
        ]
    else:
        recipe = GPTQModifier(
            config_groups=config_groups,
            ignore=["lm_head"],
            dampening_frac=args.damp,
            block_size=128,
            actorder="static" if args.act_order else None,
        )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=len(rows),
    )
    seconds = time.perf_counter() - start
    if args.save_weights:
        save_file(quantized_state(model), args.save_weights)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
