"""Distillation benchmarks: a 3-layer student of a fine-tuned encoder, and a 5-of-10-layer student of an LM.

    python scripts/bench_distill.py --part cls   # teacher: all-MiniLM-L6-v2 fine-tuned on ../shared/docs-cls
    python scripts/bench_distill.py --part lm    # teacher: ../shared/refmodel, data ../shared/corpus

`cls`: the teacher is the dense fine-tuned model `scripts/bench_pruning.py --part fine` leaves in
bench_out/pruning/dense. Students of 3 of its 6 blocks (make_student, alternate blocks) are trained with the
same step budget three ways: the task loss alone, + soft targets (T=2, alpha_kd=0.5), + hidden states.
`lm`: students of 5 of the refmodel's 10 blocks, trained on the same windows of train.txt.gz with the LM loss
alone and with soft targets; perplexity on val.txt. Both parts report each student's CPU latency and size
relative to its teacher (median of runs, same process). Prints markdown tables; numbers go to --json-out.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hfcompress import DistillationConfig, DistillationTrainer, make_student
from hfcompress.checkpoint import manifest_of
from hfcompress.evaluation.latency import forward_latency

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
logger = logging.getLogger("bench_distill")


def training_args(args, steps: int, batch_size: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_distill-"), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=int(0.05 * steps), weight_decay=0.0,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True,
    )  # fmt: skip


def latency_and_size(teacher, students: dict, ids: torch.Tensor, runs: int) -> dict:
    models = {"teacher": teacher, **students}
    times = {name: [] for name in models}
    for _ in range(2):  # interleaved rounds, so drift of the machine hits every model alike
        for name, model in models.items():
            times[name].append(forward_latency(model.eval(), ids, runs=runs))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {
        name: {"latency_ms": 1000 * min(t), "params": params[name], "latency_ratio": min(times["teacher"]) / min(t),
               "size_ratio": params[name] / params["teacher"]}
        for name, t in times.items()
    }  # fmt: skip


def part_cls(args, results: dict) -> None:
    import sys

    sys.path.insert(0, str(HERE))
    from bench_pruning import accuracy, evaluate, load_task

    teacher_path = Path(args.teacher_dir)
    if not teacher_path.is_dir():
        raise SystemExit(
            f"the fine-tuned teacher is expected at {teacher_path}: run bench_pruning.py --part fine first"
        )
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    train_set, val_set, _ = load_task(tokenizer, args.task, args.max_length)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path).eval()
    args.batch_size = args.cls_batch_size
    teacher_acc = evaluate(teacher, val_set, tokenizer, args)
    rows = {"teacher": {"accuracy": teacher_acc}}
    students = {}
    for name, config in (
        ("task loss only", None),
        ("distilled (KD, T=2)", "kd"),
        ("distilled (KD + hidden states)", "hidden"),
    ):
        torch.manual_seed(args.seed)
        student = make_student(teacher, num_layers=3)
        chosen = manifest_of(student).student_layers
        common = dict(
            model=student, args=training_args(args, args.cls_steps, args.cls_batch_size, args.lr), train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
        )  # fmt: skip
        start = time.perf_counter()
        if config is None:
            trainer = Trainer(**common)
        else:
            pairs = [(block + 1, i + 1) for i, block in enumerate(chosen)] if config == "hidden" else []
            distillation = DistillationConfig(temperature=2.0, alpha_kd=0.5, hidden_states=pairs)
            trainer = DistillationTrainer(teacher_model=teacher, distillation=distillation, **common)
        trainer.train()
        acc = evaluate(trainer.model, val_set, tokenizer, args)
        rows[name] = {"accuracy": acc, "seconds": time.perf_counter() - start, "teacher_blocks": chosen}
        students[name] = trainer.model
        logger.info("%s: %s", name, rows[name])
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    speed = latency_and_size(teacher, {"student": students["task loss only"]}, ids, args.latency_runs)
    results["cls"] = {"rows": rows, "speed": speed, "steps": args.cls_steps, "batch_size": args.cls_batch_size}
    save(results, args)
    print(
        f"\n3-layer students of all-MiniLM-L6-v2 fine-tuned on docs-cls, {args.cls_steps} steps of batch {args.cls_batch_size}"
    )
    print("| model | val accuracy | of teacher |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {100 * row['accuracy']:.2f} | {100 * row['accuracy'] / teacher_acc:.1f}% |")
    s = speed["student"]
    print(f"student: {s['size_ratio']:.2f}x the parameters, {s['latency_ratio']:.2f}x faster (batch 8 x 128 tokens)")


def part_lm(args, results: dict) -> None:
    from hfcompress.data import load_texts, tokenize_windows
    from hfcompress.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = load_texts(str(args.train))[0][: args.train_chars]
    windows = tokenize_windows(tokenizer, [text], args.seq_len)
    needed = args.lm_steps * args.lm_batch_size
    if len(windows) < needed:
        raise SystemExit(f"{len(windows)} training windows, {needed} needed: raise --train-chars")
    train_set = [{"input_ids": w, "labels": w} for w in windows[:needed]]  # one epoch: the same tokens for both
    val = tokenize_windows(tokenizer, load_texts(str(args.val)), args.seq_len)[: args.max_windows]
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = {"teacher": {"perplexity": perplexity(teacher, val)}}
    students = {}
    for name, kd in (("LM loss only", False), ("distilled (KD, T=2)", True)):
        torch.manual_seed(args.seed)
        student = make_student(teacher, num_layers=5)
        rows.setdefault("untrained student", {"perplexity": perplexity(student, val)})
        common = dict(
            model=student,
            args=training_args(args, args.lm_steps, args.lm_batch_size, args.lm_lr),
            train_dataset=train_set,
        )
        start = time.perf_counter()
        if kd:
            trainer = DistillationTrainer(
                teacher_model=teacher, distillation=DistillationConfig(temperature=2.0, alpha_kd=0.5), **common
            )
        else:
            trainer = Trainer(**common)
        trainer.train()
        rows[name] = {"perplexity": perplexity(trainer.model.eval(), val), "seconds": time.perf_counter() - start}
        students[name] = trainer.model
        logger.info("%s: %s", name, rows[name])
    speed = latency_and_size(teacher, {"student": students["LM loss only"]}, val[:1], args.latency_runs)
    tokens = needed * args.seq_len
    results["lm"] = {"rows": rows, "speed": speed, "tokens": tokens, "steps": args.lm_steps}
    save(results, args)
    print(
        f"\n5-of-10-layer students of refmodel, {tokens:,} training tokens each; perplexity on {len(val)} windows of val.txt"
    )
    print("| model | perplexity |\n|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['perplexity']:.3f} |")
    s = speed["student"]
    print(
        f"student: {s['size_ratio']:.2f}x the parameters, {s['latency_ratio']:.2f}x faster (1 x {args.seq_len} tokens)"
    )


def save(results: dict, args) -> None:
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cls", "lm", "all"], default="all")
    parser.add_argument("--task", type=Path, default=SHARED / "docs-cls")
    parser.add_argument("--teacher-dir", default="bench_out/pruning/dense")
    parser.add_argument("--cls-steps", type=int, default=300)
    parser.add_argument("--cls-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--train", type=Path, default=SHARED / "corpus" / "train.txt.gz")
    parser.add_argument("--train-chars", type=int, default=3_000_000, help="characters of train.txt.gz tokenized")
    parser.add_argument("--val", type=Path, default=SHARED / "corpus" / "val.txt")
    parser.add_argument("--lm-steps", type=int, default=150)
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-4, help="classification students")
    parser.add_argument("--lm-lr", type=float, default=3e-4, help="LM students")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default="bench_out/distill/results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hf_logging.set_verbosity_warning()
    results = json.loads(Path(args.json_out).read_text()) if args.json_out and Path(args.json_out).is_file() else {}
    from hfcompress.hub.record import hardware_description

    results["hardware"] = hardware_description()
    if args.part in ("lm", "all"):
        part_lm(args, results)
    if args.part in ("cls", "all"):
        part_cls(args, results)


if __name__ == "__main__":
    main()
