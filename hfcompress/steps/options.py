"""What every step that writes a model folder shares (how it loads and writes, what it measures, where it pushes),
and the arguments of a distillation step. Plain dataclasses: the command line is built from them without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..distillation.config import DistillationConfig, parse_pairs

__all__ = ["DistillArguments", "OutputOptions"]


@dataclass
class OutputOptions:
    """Options of every model-writing step (a command or a recipe step)."""

    overwrite: bool = field(default=False, metadata={"help": "Replace OUTPUT if it exists and is not empty."})
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = field(
        default="auto",
        metadata={
            "help": "dtype MODEL's weights are held in while it is compressed; auto (default): the checkpoint's (a "
            "bfloat16 checkpoint takes half the memory of float32). Calibration, solves and evaluation compute in "
            "float32 whatever the weights are held in. --offload disk holds each block as stored (warned about "
            "when --dtype asks for another)."
        },
    )
    offload: Literal["auto", "none", "disk"] = field(
        default="auto",
        metadata={
            "help": "disk: never hold MODEL whole; read one block at a time from its safetensors shards, "
            "compress it, write it to OUTPUT and free it. Peak memory is about one block, the calibration activations "
            "and the widest layer's solve, whatever the depth; the weights equal those of a run in memory. For local "
            "folders of safetensors weights; --eval-dataset's perplexity is streamed too (no latency), --eval-tasks "
            "refused; --format compressed-tensors rewrites the finished shards one at a time before OUTPUT is "
            "published. auto "
            "(default): disk when the model at --dtype would not fit in --max-memory, saying so; none: load it whole."
        },
    )
    max_memory: str | None = field(
        default=None,
        metadata={
            "help": "Memory the run may use, like 16GB or 800MB, for --offload auto (default: the memory available "
            "now).",
            "metavar": "SIZE",
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "With --offload disk: continue the unfinished run that wrote OUTPUT (killed or failed) from its last "
            "written block, with the same weights as an uninterrupted run; refused if the settings differ. Without "
            "it an unfinished run is discarded."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Text to measure perplexity and latency on, before and after, for the compression record and "
            "card (default: only size, parameters and bits per weight are recorded)."
        },
    )
    eval_seq_len: int | None = field(
        default=None,
        metadata={"help": "Tokens per evaluation window (default: 512, or the model's positions if it has fewer)."},
    )
    eval_max_windows: int = field(default=50, metadata={"help": "Evaluation windows scored."})
    eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "lm-evaluation-harness tasks (comma-separated) to score before and after, for the record and "
            "card (pip install 'hfcompress[lm-eval]').",
            "metavar": "TASKS",
        },
    )
    eval_tasks_dir: str | None = field(
        default=None, metadata={"help": "A folder of lm-eval task YAMLs of your own (local data).", "metavar": "DIR"}
    )
    eval_limit: int | None = field(default=None, metadata={"help": "lm-eval: the first N documents of each task."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Push OUTPUT to this Hub repo when done.", "metavar": "REPO_ID"}
    )
    private: bool = field(default=False, metadata={"help": "With --push-to-hub: create the repo private."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars or info logs."})
    # the tokenized evaluation windows, read once and shared by the before and after measurements
    eval_windows: list | None = field(default=None, init=False, repr=False, compare=False)


@dataclass
class DistillArguments:
    """The student, the data and the training of a distillation step."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a text file for causal-lm, JSON lines or a datasets folder with 'text' and "
            "'label' for sequence-classification."
        },
    )
    student_layers: int | None = field(
        default=None, metadata={"help": "Build the student from this many teacher blocks."}
    )
    student: str | None = field(
        default=None, metadata={"help": "A student model folder or Hub id (same tokenizer as the teacher)."}
    )
    teacher_bits: Literal[4, 8] | None = field(
        default=None,
        metadata={"help": "Load the teacher with bitsandbytes at 4 or 8 bits to save memory (with --student)."},
    )
    layer_strategy: Literal["alternate", "first"] = field(
        default="alternate",
        metadata={"help": "With --student-layers: blocks spread evenly from first to last, or the first ones."},
    )
    task: Literal["causal-lm", "sequence-classification"] | None = field(
        default=None,
        metadata={"help": "The task: a causal LM's windows of text, or a classifier's labelled rows (default: the "
                  "teacher checkpoint's head)."},
    )  # fmt: skip
    seq_len: int = field(default=512, metadata={"help": "Tokens per window / max length."})
    max_windows: int | None = field(default=None, metadata={"help": "causal-lm: use only the first N windows."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the soft targets (> 0)."})
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the soft-target KL loss (scaled by T^2)."})
    alpha_task: float | None = field(
        default=None, metadata={"help": "Weight of the task loss (default: 1 - alpha-kd)."}
    )
    hidden_states: str | None = field(
        default=None, metadata={"help": "Hidden states to match, 'TEACHER:STUDENT,...' e.g. '2:1,5:2'."}
    )
    hidden_loss: Literal["mse", "cosine"] = field(
        default="mse", metadata={"help": "mse, or cosine (1 - cosine similarity per token)."}
    )
    max_steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Per-device batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Keep Trainer checkpoints here (default: none kept)."}
    )
    resume: str | None = field(default=None, metadata={"help": "A checkpoint folder to resume from."})

    def __post_init__(self):
        if (self.student is None) == (self.student_layers is None):
            raise ValueError("give exactly one of `student` (a model) or `student_layers` (a number of blocks)")
        if self.dataset is None:
            raise ValueError("distillation needs training data: give `dataset`")

    def loss(self) -> DistillationConfig:
        return DistillationConfig(
            temperature=self.temperature, alpha_kd=self.alpha_kd, alpha_task=self.alpha_task,
            hidden_states=parse_pairs(self.hidden_states), hidden_loss=self.hidden_loss,
        )  # fmt: skip
