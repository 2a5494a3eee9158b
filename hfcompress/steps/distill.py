"""`distill_folder`: train a student on a teacher's outputs with `DistillationTrainer` and write it as a complete
folder with its record and card (`hfcompress distill`, and a recipe's `distill` step)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorWithPadding, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..checkpoint import HfcompressQuantizationConfig, manifest_of
from ..core.tasks import AUTO_CLASSES
from ..data import load_texts, tokenize_windows
from ..distillation import DistillationTrainer, make_student
from ..hub.record import Step
from ..io import claim_output
from ..quantization.bnb import BnbConfig, load_bnb
from .loading import checkpoint_task, load_model, load_tokenizer, resolve_model_path
from .options import DistillArguments, OutputOptions
from .recording import base_record, quality_metrics, write_output

__all__ = ["DistillArguments", "distill_folder"]

logger = logging.getLogger(__name__)


def _classification_rows(path: str) -> list[dict]:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        rows = list(datasets.load_from_disk(path))
    if not rows or not {"text", "label"} <= rows[0].keys():
        raise ValueError(
            f"classification data {path!r} must hold rows with 'text' and 'label' (JSON lines or a datasets folder)"
        )
    return rows


def _train_set(arguments: DistillArguments, tokenizer):
    if arguments.task == "causal-lm":
        windows = tokenize_windows(tokenizer, load_texts(arguments.dataset), arguments.seq_len)
        if arguments.max_windows:
            windows = windows[: arguments.max_windows]
        return [{"input_ids": w, "labels": w} for w in windows], None
    rows = _classification_rows(arguments.dataset)
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=arguments.seq_len)
    data = [{"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)]  # fmt: skip
    return data, DataCollatorWithPadding(tokenizer)


def _load_teacher(teacher: str, arguments: DistillArguments, options: OutputOptions):
    if not arguments.teacher_bits:
        return load_model(teacher, options.dtype, task=arguments.task)
    # a bitsandbytes teacher: a fraction of the memory, same outputs within rounding
    model_class = getattr(transformers, AUTO_CLASSES[arguments.task])
    return load_bnb(resolve_model_path(teacher), BnbConfig(bits=arguments.teacher_bits), model_class=model_class).eval()


def _load_student(teacher_model, teacher: str, tokenizer, arguments: DistillArguments, options: OutputOptions):
    if arguments.student is None:
        if arguments.teacher_bits:
            raise ValueError(
                "`teacher_bits` needs `student` (a model): a student copied from a quantized teacher would be quantized too"
            )
        return make_student(teacher_model, num_layers=arguments.student_layers, strategy=arguments.layer_strategy)
    student = load_model(arguments.student, options.dtype, task=arguments.task)
    try:
        student_tokenizer = load_tokenizer(arguments.student)
    except (OSError, ValueError):  # a student folder without a tokenizer of its own uses the teacher's
        student_tokenizer = tokenizer
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"teacher {teacher!r} and student {arguments.student!r} use different tokenizers")
    return student


def distill_folder(
    teacher: str, output: str | os.PathLike, arguments: DistillArguments, options: OutputOptions | None = None
) -> Path:
    """Distil the model at `teacher` into a student (a copy of some of its blocks, or `arguments.student`) and
    write the student to `output`, a plain transformers model, with the record and card."""
    options = options or OutputOptions()
    arguments = _with_task(teacher, arguments)
    inputs = [teacher, arguments.student, arguments.dataset, arguments.resume, options.eval_dataset]
    with claim_output(output, options.overwrite, inputs):
        if arguments.checkpoint_dir:
            return _distill(teacher, output, arguments, options, arguments.checkpoint_dir)
        # Trainer needs an output_dir even when it saves nothing there; this one goes when training is done
        with tempfile.TemporaryDirectory(prefix="hfcompress-distill-") as scratch:
            return _distill(teacher, output, arguments, options, scratch)


DISTILLED_TASKS = ("causal-lm", "sequence-classification")


def _with_task(teacher: str, arguments: DistillArguments) -> DistillArguments:
    """`arguments` with the task the teacher's checkpoint was saved for when they name none; refused, before any
    work, for a head distillation does not train (loaded as a causal LM, a classifier would teach from a random
    language-modelling head)."""
    if arguments.task is not None:
        return arguments
    task = checkpoint_task(teacher)
    if task not in DISTILLED_TASKS:
        raise ValueError(
            f"teacher {teacher!r} is a {task} model; distill trains a causal LM or a sequence classifier "
            f"(--task {' or '.join(DISTILLED_TASKS)})"
        )
    return dataclasses.replace(arguments, task=task)


def _distill(teacher: str, output, arguments: DistillArguments, options: OutputOptions, checkpoints: str) -> Path:
    loss = arguments.loss()
    teacher_model = _load_teacher(teacher, arguments, options)
    tokenizer = load_tokenizer(teacher)
    student = _load_student(teacher_model, teacher, tokenizer, arguments, options)
    train_set, collator = _train_set(arguments, tokenizer)
    record = base_record(teacher_model, teacher, options, tokenizer)
    max_steps = arguments.max_steps
    training_args = TrainingArguments(
        output_dir=checkpoints, max_steps=max_steps, per_device_train_batch_size=arguments.batch_size,
        gradient_accumulation_steps=arguments.gradient_accumulation_steps, learning_rate=arguments.learning_rate,
        warmup_steps=int(0.05 * max_steps), logging_steps=max(1, max_steps // 20), seed=arguments.seed,
        save_strategy="steps" if arguments.checkpoint_dir else "no", save_steps=max(1, max_steps // 4),
        report_to=[], disable_tqdm=options.quiet, use_cpu=arguments.cpu,
        dataloader_pin_memory=torch.cuda.is_available() and not arguments.cpu,  # else torch warns on every run
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher_model, distillation=loss, args=training_args, train_dataset=train_set,
        data_collator=collator,
    )  # fmt: skip
    if options.quiet:  # Trainer prints its logs through these; quiet means nothing on stdout
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=arguments.resume or None)
    seconds = time.perf_counter() - start
    student = trainer.model.eval()
    settings = {
        **loss.to_dict(),
        "student_layers": (manifest_of(student) or HfcompressQuantizationConfig()).student_layers,
        "max_steps": max_steps,
        "learning_rate": arguments.learning_rate,
        "batch_size": arguments.batch_size * arguments.gradient_accumulation_steps,
    }
    data = {"dataset": arguments.dataset, "seq_len": arguments.seq_len, "task": arguments.task}
    step = Step("distillation", "kd" if not loss.hidden_states else "kd+hidden", settings, data, seconds)
    quality = quality_metrics(student, options, tokenizer) if arguments.task == "causal-lm" else {}
    return write_output(student, resolve_model_path(teacher), output, tokenizer, record, step, options, quality)
