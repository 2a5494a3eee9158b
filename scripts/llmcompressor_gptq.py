"""Time llm-compressor's GPTQModifier on the same job as scripts/bench_gptq.py (run it in its own venv).

Prints one JSON line: {"seconds": ...} for the oneshot call alone (model load and save not counted).
Used by bench_gptq.py through --llmcompressor-python; needs only llmcompressor, transformers, datasets.
"""

import argparse
import json
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--dataset", required=True, help="text file")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-order", action="store_true", help="static act-order (llm-compressor's default)")
    parser.add_argument("--save", help="also save the compressed model here (compressed-tensors)")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with open(args.dataset, encoding="utf-8") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    n = len(ids) // args.seq_len
    index = torch.linspace(0, n - 1, args.num_samples).round().long().tolist()
    rows = [ids[i * args.seq_len : (i + 1) * args.seq_len] for i in index]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * args.seq_len for _ in rows]})
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
        dampening_frac=0.01,
        block_size=128,
        actorder="static" if args.act_order else None,
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=args.seq_len,
        num_calibration_samples=args.num_samples,
    )
    seconds = time.perf_counter() - start
    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
        tokenizer.save_pretrained(args.save)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
