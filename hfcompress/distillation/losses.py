"""Distillation losses as pure tensor functions; `mask` marks the positions that count (1) and padding (0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_loss", "hidden_state_loss", "soft_target_loss"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the unmasked positions (the last
    dimension is the class/vocabulary axis). The T^2 keeps gradient sizes independent of T (Hinton et al.)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher predict over different label sets or vocabularies "
            f"({student_logits.shape[-1]} vs {teacher_logits.shape[-1]} outputs)"
        )
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return _masked_mean(kl, mask) * t * t


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token MSE (mean over features) or 1 - cosine similarity between [batch, seq, width] states."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"hidden-state loss must be 'mse' or 'cosine', got {kind!r}")
    return _masked_mean(per_token, mask)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL between the teacher's and the student's attention distributions [batch, heads, query, key], per
    query position, averaged over unmasked queries and heads (keys that are padding have zero probability)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    eps = 1e-8
    kl = (teacher.float() * ((teacher.float() + eps).log() - (student.float() + eps).log())).sum(dim=-1)
    if mask is not None:
        mask = mask[:, None, :].expand_as(kl)
    return _masked_mean(kl, mask)
