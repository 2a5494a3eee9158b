"""`DistillationTrainer`: `transformers.Trainer` with a teacher.

Everything Trainer does stays as it is (arguments, gradient accumulation, evaluation, checkpoints, resume,
accelerate). Only the training loss changes: the weighted sum of `DistillationConfig`'s terms, each logged
as `loss_<term>`. Evaluation reports the student's own task loss. Projections (when a student hidden width
differs from the teacher's) are kept beside the student, never inside it: they get their own optimizer
parameter group, their gradients are averaged over processes at each synchronizing step (they run outside the
DDP-wrapped forward), and checkpoints and `save_model` write them to `distillation_projections.safetensors`
next to the student, which stays a plain transformers model.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from ..core.structure import find_layer_stack
from .config import DistillationConfig
from .losses import attention_loss, hidden_state_loss, soft_target_loss

__all__ = ["DistillationTrainer", "check_pair"]

logger = logging.getLogger(__name__)

PROJECTIONS_FILE = "distillation_projections.safetensors"


def _num_layers(model) -> int:
    return len(find_layer_stack(model)[1])


def _width(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model


def check_pair(student: nn.Module, teacher: nn.Module, config: DistillationConfig) -> None:
    """Refuse a teacher and student that cannot be distilled as `config` says, naming what differs."""
    s_out, t_out = student.get_output_embeddings(), teacher.get_output_embeddings()
    if s_out is not None and t_out is not None:
        if s_out.weight.shape[0] != t_out.weight.shape[0]:
            raise ValueError(
                f"teacher and student vocabularies differ ({t_out.weight.shape[0]} vs {s_out.weight.shape[0]} tokens): "
                "distillation needs the same tokenizer"
            )
    s_labels, t_labels = getattr(student.config, "id2label", None), getattr(teacher.config, "id2label", None)
    if hasattr(student, "num_labels") and hasattr(teacher, "num_labels") and s_out is None:
        if student.config.num_labels != teacher.config.num_labels or (
            s_labels
            and t_labels
            and {int(k): v for k, v in s_labels.items()} != {int(k): v for k, v in t_labels.items()}
        ):
            raise ValueError(f"teacher and student label sets differ: teacher {t_labels}, student {s_labels}")
    t_layers, s_layers = _num_layers(teacher), _num_layers(student)
    for t, s in config.hidden_states:
        if t > t_layers or s > s_layers:
            raise ValueError(
                f"hidden-state pair ({t}, {s}) is out of range: the teacher has hidden states 0..{t_layers}, "
                f"the student 0..{s_layers}"
            )
    for t, s in config.attentions:
        if t >= t_layers or s >= s_layers:
            raise ValueError(
                f"attention pair ({t}, {s}) is out of range: the teacher has blocks 0..{t_layers - 1}, "
                f"the student 0..{s_layers - 1}"
            )
    if config.attentions:
        for who, model in (("teacher", teacher), ("student", student)):
            implementation = getattr(model.config, "_attn_implementation", "eager")
            if implementation != "eager":
                raise ValueError(
                    f"attention matching needs attention weights, which the {who}'s {implementation!r} attention does "
                    "not return: load it with attn_implementation='eager'"
                )


class DistillationTrainer(Trainer):
    """`Trainer` that trains `model` (the student) to match `teacher_model` as `distillation` says. The teacher
    is put in eval mode without gradients and moved to the student's device (unless it is quantized, as with
    bitsandbytes, which places it itself)."""

    def __init__(self, model=None, teacher_model=None, distillation: DistillationConfig | None = None, **kwargs):
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs both `model` (the student) and `teacher_model`")
        distillation = distillation if distillation is not None else DistillationConfig()
        if isinstance(distillation, dict):
            distillation = DistillationConfig.from_dict(distillation)
        check_pair(model, teacher_model, distillation)
        if teacher_model.training:
            logger.warning("the teacher was in training mode; switching it to eval mode (no dropout) for distillation")
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        super().__init__(model=model, **kwargs)
        self.projections = self._make_projections(model, teacher_model, distillation)
        self.teacher = teacher_model
        self.distillation = distillation
        self.causal = type(model).__name__.endswith("ForCausalLM")
        # our loss is a mean over the batch: let Trainer divide it over gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0

    def _make_projections(self, student, teacher, config: DistillationConfig) -> nn.ModuleList | None:
        s_width, t_width = _width(student), _width(teacher)
        if not config.hidden_states or s_width == t_width:
            return None
        torch.manual_seed(self.args.seed)  # the same initial projections on every process
        projections = nn.ModuleList(nn.Linear(s_width, t_width, bias=False) for _ in config.hidden_states)
        logger.info("student width %d != teacher width %d: training %d projections", s_width, t_width, len(projections))
        return projections.to(self.args.device)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projections is not None:
            optimizer.add_param_group({"params": list(self.projections.parameters()), "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        world = self.args.world_size
        if self.projections is not None and world > 1 and self.accelerator.sync_gradients:
            for p in self.projections.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        return loss

    def _teacher_on(self, device: torch.device) -> nn.Module:
        teacher = self.teacher
        if teacher.training:
            logger.warning("the teacher was switched to training mode; putting it back in eval mode")
            teacher.eval()
        quantized = getattr(teacher, "is_quantized", False) or getattr(teacher, "is_loaded_in_4bit", False)
        if not quantized and next(teacher.parameters()).device != device:
            teacher.to(device)
        return teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation measures the student on its task
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        config = self.distillation
        extra = {}
        if config.hidden_states:
            extra["output_hidden_states"] = True
        if config.attentions:
            extra["output_attentions"] = True
        outputs = model(**inputs, **extra)
        device = outputs.logits.device
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_outputs = self._teacher_on(device)(**teacher_inputs, **extra)

        terms = {}
        labels = inputs.get("labels")
        attention_mask = inputs.get("attention_mask")
        if config.alpha_task > 0:
            if outputs.loss is None:
                raise ValueError("alpha_task > 0 needs `labels` in the batches (or set alpha_task=0)")
            terms["task"] = outputs.loss
        if config.alpha_kd > 0:
            student_logits, teacher_logits = outputs.logits, teacher_outputs.logits.to(device)
            mask = None
            if self.causal:  # position t predicts token t+1
                student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
                if labels is not None:
                    mask = labels[:, 1:] != -100
                elif attention_mask is not None:
                    mask = attention_mask[:, 1:].bool()
            elif student_logits.dim() == 3:
                mask = attention_mask.bool() if attention_mask is not None else None
            terms["kd"] = soft_target_loss(student_logits, teacher_logits, config.temperature, mask)
        if config.hidden_states:
            projections = self.projections
            losses = []
            for i, (t, s) in enumerate(config.hidden_states):
                student_state = outputs.hidden_states[s]
                if projections is not None:
                    student_state = projections[i](student_state)
                teacher_state = teacher_outputs.hidden_states[t].to(device)
                losses.append(hidden_state_loss(student_state, teacher_state, config.hidden_loss, attention_mask))
            terms["hidden"] = torch.stack(losses).mean()
        if config.attentions:
            losses = [
                attention_loss(outputs.attentions[s], teacher_outputs.attentions[t].to(device), attention_mask)
                for t, s in config.attentions
            ]
            terms["attention"] = torch.stack(losses).mean()

        weights = config.weights()
        loss = sum(weights[name] * value for name, value in terms.items())
        for name, value in terms.items():
            self._sums[f"loss_{name}"] += float(value.detach())
        self._count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._count:
            for name, total in self._sums.items():
                logs[name] = round(total / self._count, 4)
            self._sums.clear()
            self._count = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Save the student; its projections, if any, go to their own file beside it."""
        super()._save(output_dir, state_dict)
        if self.projections is not None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.projections.state_dict().items()}
            save_file(tensors, os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if self.projections is not None and os.path.isfile(path):
            self.projections.load_state_dict(load_file(path))
