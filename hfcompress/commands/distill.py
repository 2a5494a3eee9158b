"""Handler of `hfcompress distill`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from ..hub.record import Step
from ..io import atomic_output_dir, check_output_dir, copy_model_extras
from .loading import load_model, load_tokenizer, resolve_model_path
from .recording import base_record, finish_output, push_if_asked, quality_metrics

__all__ = ["run_distill", "parse_pairs"]

logger = logging.getLogger(__name__)


def parse_pairs(text: str | None) -> list[tuple[int, int]]:
    """'2:1,5:2' -> [(2, 1), (5, 2)]."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        teacher, sep, student = item.strip().partition(":")
        if not sep or not teacher.isdigit() or not student.isdigit():
            raise ValueError(f"layer pairs must look like 'TEACHER:STUDENT,...' (e.g. '2:1,5:2'), got {text!r}")
        pairs.append((int(teacher), int(student)))
    return pairs


def _classification_rows(path: str) -> list[dict]:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        rows = list(datasets.load_from_disk(path))
    if not rows or not {"text", "label"} <= rows[0].keys():
        raise ValueError(f"classification data {path!r} must hold rows with 'text' and 'label' (JSON lines or a datasets folder)")
    return rows


def _train_set(args: argparse.Namespace, tokenizer):
    if args.task == "causal-lm":
        from ..data import load_texts, tokenize_windows

        windows = tokenize_windows(tokenizer, load_texts(args.dataset), args.seq_len)
        if args.max_windows:
            windows = windows[: args.max_windows]
        return [{"input_ids": w, "labels": w} for w in windows], None
    from transformers import DataCollatorWithPadding

    rows = _classification_rows(args.dataset)
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.seq_len)
    data = [{"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)]  # fmt: skip
    return data, DataCollatorWithPadding(tokenizer)


def run_distill(args: argparse.Namespace) -> int:
    from transformers import TrainingArguments

    from ..distillation import DistillationConfig, DistillationTrainer, make_student

    if (args.student is None) == (args.student_layers is None):
        raise ValueError("give exactly one of --student MODEL or --student-layers N")
    config = DistillationConfig(
        temperature=args.temperature, alpha_kd=args.alpha_kd, alpha_task=args.alpha_task,
        hidden_states=parse_pairs(args.hidden_states), hidden_loss=args.hidden_loss,
    )  # fmt: skip
    check_output_dir(args.output, args.overwrite)
    if args.teacher_bits:  # a bitsandbytes teacher: a fraction of the memory, same outputs within rounding
        import transformers

        from ..quantization.bnb import BnbConfig, load_bnb

        model_class = transformers.AutoModelForCausalLM if args.task == "causal-lm" else transformers.AutoModelForSequenceClassification
        teacher = load_bnb(resolve_model_path(args.teacher), BnbConfig(bits=args.teacher_bits), model_class=model_class).eval()
    else:
        teacher = load_model(args.teacher, args.dtype, task=args.task)
    tokenizer = load_tokenizer(args.teacher)
    if args.student is not None:
        student = load_model(args.student, args.dtype, task=args.task)
        try:
            student_tokenizer = load_tokenizer(args.student)
        except (OSError, ValueError):  # a student folder without a tokenizer of its own uses the teacher's
            student_tokenizer = tokenizer
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {args.teacher!r} and student {args.student!r} use different tokenizers")
    elif args.teacher_bits:
        raise ValueError("--teacher-bits needs --student MODEL: a student copied from a quantized teacher would be quantized too")
    else:
        student = make_student(teacher, num_layers=args.student_layers, strategy=args.layer_strategy)
    train_set, collator = _train_set(args, tokenizer)
    record = base_record(teacher, args.teacher, args, tokenizer)
    checkpoints = args.checkpoint_dir or tempfile.mkdtemp(prefix="hfcompress-distill-")
    training_args = TrainingArguments(
        output_dir=checkpoints, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        warmup_steps=int(0.05 * args.max_steps), logging_steps=max(1, args.max_steps // 20), seed=args.seed,
        save_strategy="steps" if args.checkpoint_dir else "no", save_steps=max(1, args.max_steps // 4),
        report_to=[], disable_tqdm=args.quiet, use_cpu=args.cpu,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=config, args=training_args, train_dataset=train_set,
        data_collator=collator,
    )  # fmt: skip
    if args.quiet:  # Trainer prints its logs through these; -q means nothing on stdout
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume or None)
    seconds = time.perf_counter() - start
    student = trainer.model.eval()
    settings = {
        **config.to_dict(),
        "student_layers": getattr(student.config, "hfcompress_student_layers", None),
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size * args.gradient_accumulation_steps,
    }
    data = {"dataset": args.dataset, "seq_len": args.seq_len, "task": args.task}
    step = Step("distillation", "kd" if not config.hidden_states else "kd+hidden", settings, data, seconds)
    quality = quality_metrics(student, args, tokenizer) if args.task == "causal-lm" else {}
    with atomic_output_dir(args.output, args.overwrite) as staging:
        student.save_pretrained(staging)
        source = resolve_model_path(args.teacher)
        if os.path.isdir(source):
            copy_model_extras(source, staging)
        else:
            tokenizer.save_pretrained(staging)
        finish_output(record, step, student, args, staging, quality, requires_hfcompress=False)
    logger.info("wrote %s", args.output)
    push_if_asked(args)
    return 0
