"""Distillation: a `Trainer` subclass that trains a student on a teacher's outputs, and students built from
their teachers."""

from .config import DistillationConfig
from .losses import attention_loss, hidden_state_loss, soft_target_loss
from .student import choose_layers, make_student
from .trainer import DistillationTrainer

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "attention_loss",
    "choose_layers",
    "hidden_state_loss",
    "make_student",
    "soft_target_loss",
]
