"""Run llm-compressor's GPTQModifier on the job scripts/bench_gptq.py gives it (run it in its own venv).

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--ids", required=True, help="safetensors file holding the calibration `input_ids`")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    parser.add_argument("--act-order", action="store_true", help="static act-order (llm-compressor's default)")
    parser.add_argument("--damp", type=float, default=0.01, help="dampening_frac")
    parser.add_argument("--save-weights", help="write the quantized linears' weights here (safetensors)")
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
        weights = {
            f"{name}.weight": module.weight.detach().float().contiguous()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale")
        }
        save_file(weights, args.save_weights)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
