"""Distillation: a `Trainer` subclass that trains a student on a teacher's outputs, and students built from
their teachers. Names are imported on first use."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "DistillationConfig": ".config",
    "DistillationTrainer": ".trainer",
    "attention_loss": ".losses",
    "choose_layers": ".student",
    "hidden_state_loss": ".losses",
    "make_student": ".student",
    "soft_target_loss": ".losses",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
