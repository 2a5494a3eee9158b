"""Low-rank factorization on a real trained model: perplexity, size and CPU latency at 20% and 40% fewer
linear-layer parameters for plain SVD, ASVD, whitening, and whitening with sensitivity-allocated ranks; then a
rank-8 LoRA adapter trained on the factorized model with the real Trainer, merged into the factors.

Everything runs in one process, one setting after the other; the dense model is measured in the same run.
Prints a markdown table and writes the numbers as JSON (--json-out).

    python scripts/bench_lowrank.py                       # ../shared/refmodel, ../shared/corpus
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import perplexity, weights_size_bytes
from hfcompress.evaluation.latency import forward_latency
from hfcompress.hub.record import CompressionRecord, Step, hardware_description
from hfcompress.lowrank.lora import adapt_factorized_layers
from hfcompress.quantization.modules import cast_unquantized

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
METHODS = [
    ("svd", {"method": "svd", "allocation": "uniform"}),
    ("asvd", {"method": "asvd", "allocation": "uniform"}),
    ("whiten", {"method": "whiten", "allocation": "uniform"}),
    ("whiten + allocation", {"method": "whiten", "allocation": "sensitivity"}),
]


def linear_params(model) -> int:
    stack = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return sum(m.weight.numel() for m in stack)


def write_record(folder, args, step, before, after, num_windows):
    """The compression record `hfcompress card` turns into a model card for this output."""
    record = CompressionRecord(
        base_model=args.model, pipeline_tag="text-generation", steps=[step],
        metrics={"before": before, "after": after},
        evaluation={"dataset": args.val, "seq_len": args.seq_len, "num_windows": num_windows},
        hardware=hardware_description(), command=f"python scripts/bench_lowrank.py --ratios {args.ratios}",
        loading={"requires_hfcompress": True},
    )  # fmt: skip
    record.save(folder)


def card_metrics(result):
    return {
        "size_bytes": result["size_bytes"], "parameters": result["linear_params"],
        "perplexity": result["perplexity"], "latency_s": result["latency_s"],
    }  # fmt: skip


def measure(model, val, latency_ids, runs, folder):
    model.eval()
    result = {
        "perplexity": perplexity(model, val),
        "linear_params": linear_params(model),
        "latency_s": forward_latency(model, latency_ids, runs=runs),
    }
    saved = copy.deepcopy(model)
    cast_unquantized(saved, torch.float16)  # what the CLI writes for this float16 checkpoint
    saved.save_pretrained(folder)
    result["size_bytes"] = weights_size_bytes(folder)
    return result


def train_lora(model, train_windows, args):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = adapt_factorized_layers(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    adapted = get_peft_model(model, config)
    data = Dataset.from_dict({"input_ids": train_windows.tolist(), "labels": train_windows.tolist()})
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=args.lora_steps, per_device_train_batch_size=8, learning_rate=1e-3,
            lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, logging_steps=25,
        )  # fmt: skip
        Trainer(model=adapted, args=training, train_dataset=data).train()
    return adapted.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--train", default=str(SHARED / "corpus" / "train.txt.gz"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=100, help="Validation windows scored (default: 100).")
    parser.add_argument("--num-samples", type=int, default=64, help="Calibration windows (default: 64).")
    parser.add_argument("--ratios", default="0.8,0.6", help="Parameter ratios kept (default: 0.8,0.6).")
    parser.add_argument("--latency-runs", type=int, default=7)
    parser.add_argument("--lora-steps", type=int, default=150, help="Training steps of the LoRA adapter; 0 skips it.")
    parser.add_argument("--json-out", default=None)
    parser.add_argument(
        "--sensitivity-cache",
        default=None,
        help="JSON file to read/write the sensitivity measurements (default: a temporary one).",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    val = tokenize_windows(tokenizer, load_texts(args.val), args.seq_len)[: args.max_windows]
    calib = tokenize_windows(tokenizer, load_texts(args.calib), args.seq_len)
    latency_ids = val[:1]
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="bench_lowrank_"))
    results = {"dense": measure(dense, val, latency_ids, args.latency_runs, work / "dense")}
    cache = args.sensitivity_cache or str(work / "sensitivity.json")
    for ratio in map(float, args.ratios.split(",")):
        for name, settings in METHODS:
            model = copy.deepcopy(dense)
            config = hfcompress.LowRankConfig(
                param_ratio=ratio, dataset=calib, num_samples=args.num_samples, seq_len=args.seq_len,
                sensitivity_cache=cache, **settings,
            )  # fmt: skip
            start = time.perf_counter()
            hfcompress.factorize(model, config)
            seconds = time.perf_counter() - start
            key = f"{name} @ {ratio}"
            results[key] = measure(model, val, latency_ids, args.latency_runs, work / key.replace(" ", "_"))
            results[key]["seconds"] = seconds
            settings = config.to_dict()
            settings.pop("dataset")
            step = Step(
                "factorization",
                config.method,
                settings,
                {"dataset": args.calib, "num_samples": args.num_samples},
                seconds,
            )
            write_record(
                work / key.replace(" ", "_"),
                args,
                step,
                card_metrics(results["dense"]),
                card_metrics(results[key]),
                len(val),
            )
            print(f"{key}: {results[key]}", flush=True)
            if name == "whiten + allocation" and ratio == max(map(float, args.ratios.split(","))):
                lora_base = model

    if args.lora_steps:
        with gzip.open(args.train, "rt", encoding="utf-8") as f:
            text = f.read(2_000_000)
        train = tokenize_windows(tokenizer, [text], 256)
        adapted = train_lora(copy.deepcopy(lora_base), train, args)
        lora = {"adapter_perplexity": perplexity(adapted, val), "factorized_perplexity": perplexity(lora_base, val)}
        adapter_dir = work / "adapter"
        adapted.save_pretrained(adapter_dir)
        for rank in ("exact", "original"):
            merged = hfcompress.merge_lora(copy.deepcopy(lora_base), adapter_dir, rank=rank)
            lora[f"merged_{rank}_perplexity"] = perplexity(merged, val)
            lora[f"merged_{rank}_linear_params"] = linear_params(merged)
        lora["exact_relative_difference"] = abs(lora["merged_exact_perplexity"] / lora["adapter_perplexity"] - 1)
        results["lora"] = lora
        print(f"lora: {lora}", flush=True)

    base = results["dense"]
    print(f"\nDense: perplexity {base['perplexity']:.3f} on {len(val)} windows of {args.seq_len}, "
          f"{base['linear_params']:,} linear parameters, {base['size_bytes'] / 1e6:.2f} MB, "
          f"latency {base['latency_s'] * 1e3:.1f} ms (1x{args.seq_len}, fp32, {torch.get_num_threads()} threads)\n")  # fmt: skip
    print("| setting | params kept | perplexity | vs dense | size | latency | seconds |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key in ("dense", "lora"):
            continue
        print(
            f"| {key} | {r['linear_params'] / base['linear_params']:.3f} | {r['perplexity']:.3f} | "
            f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% | {r['size_bytes'] / base['size_bytes']:.3f}x | "
            f"{r['latency_s'] / base['latency_s']:.3f}x | {r['seconds']:.0f} |"
        )
    print(f"\nmodels, with their compression records (`hfcompress card FOLDER` writes their cards): {work}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
