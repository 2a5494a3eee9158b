"""Configuration of teacher -> student distillation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..core.config import CompressionConfig

__all__ = ["DistillationConfig", "parse_pairs"]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _pairs(value, name: str) -> list[tuple[int, int]]:
    pairs = []
    for pair in value or []:
        if not (
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) and i >= 0 for i in pair)
        ):
            raise ValueError(f"`{name}` must be a list of (teacher_layer, student_layer) index pairs, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def parse_pairs(text: str | None) -> list[tuple[int, int]]:
    """'2:1,5:2' -> [(2, 1), (5, 2)] (layer pairs as the command line and recipes write them)."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        teacher, sep, student = item.strip().partition(":")
        if not sep or not teacher.isdigit() or not student.isdigit():
            raise ValueError(f"layer pairs must look like 'TEACHER:STUDENT,...' (e.g. '2:1,5:2'), got {text!r}")
        pairs.append((int(teacher), int(student)))
    return pairs


@dataclass
class DistillationConfig(CompressionConfig):
    """The loss of a `DistillationTrainer`:

        alpha_task * task loss + alpha_kd * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + alpha_hidden * hidden-state loss + alpha_attention * attention-map loss

    Padding (and, for causal LMs, positions whose label is -100) is masked out of every term. Hidden states are
    indexed as transformers returns them (`output_hidden_states`: 0 is the embedding output, i the output of
    block i); a linear projection, trained with the student, maps student widths that differ from the
    teacher's. Attention maps are indexed by block (0-based) and need heads of the same count.
    """

    technique: ClassVar[str] = "distillation"

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the soft targets (> 0)."})
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the soft-target KL loss (scaled by T^2)."})
    alpha_task: float | None = field(
        default=None, metadata={"help": "Weight of the student's own task loss; default 1 - alpha_kd."}
    )
    hidden_states: list[tuple[int, int]] = field(
        default_factory=list, metadata={"help": "(teacher, student) hidden-state index pairs to match."}
    )
    alpha_hidden: float = field(
        default=1.0, metadata={"help": "Weight of the hidden-state loss (when pairs are given)."}
    )
    hidden_loss: Literal["mse", "cosine"] = field(
        default="mse", metadata={"help": "mse, or cosine (1 - cosine similarity per token)."}
    )
    attentions: list[tuple[int, int]] = field(
        default_factory=list, metadata={"help": "(teacher, student) block index pairs whose attention maps to match."}
    )
    alpha_attention: float = field(
        default=1.0, metadata={"help": "Weight of the attention-map loss (when pairs are given)."}
    )

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if self.alpha_task is None:
            self.alpha_task = max(0.0, 1.0 - self.alpha_kd)
        for name in ("alpha_kd", "alpha_task", "alpha_hidden", "alpha_attention"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
        self.hidden_states = _pairs(self.hidden_states, "hidden_states")
        self.attentions = _pairs(self.attentions, "attentions")
        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"`hidden_loss` must be 'mse' or 'cosine', got {self.hidden_loss!r}")
        if sum(self.weights().values()) == 0:
            raise ValueError(
                "the loss weights sum to zero: set alpha_kd, alpha_task, or alpha_hidden/alpha_attention with pairs"
            )

    def weights(self) -> dict[str, float]:
        """The weight of every loss term in use."""
        weights = {"task": self.alpha_task, "kd": self.alpha_kd}
        if self.hidden_states:
            weights["hidden"] = self.alpha_hidden
        if self.attentions:
            weights["attention"] = self.alpha_attention
        return weights

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"version": FORMAT_VERSION}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["hidden_states"] = [list(p) for p in self.hidden_states]
        data["attentions"] = [list(p) for p in self.attentions]
        return data
