"""`PruningCallback`: pruning inside `transformers.Trainer`, following a sparsity schedule.

The callback only schedules. Masks (and movement scores) are attached to the model when the Trainer is
built, before its optimizer exists, so the scores are trained by the Trainer's own optimizer; they live in
the model, so checkpoints save them and `resume_from_checkpoint` restores them, and under DDP they are
synchronized like any parameter, which keeps every rank's masks identical. The schedule position is the
Trainer's `global_step`; the config rides in `trainer_state.json` (`ExportableState`) so a resume with a
different config is caught.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import MovementPruningConfig, PruningConfig, pruning_config_from_dict
from .pruner import CONFIG_ATTRIBUTE, Pruner
from .schedule import cubic_sparsity

__all__ = ["PruningCallback"]

logger = logging.getLogger(__name__)


class PruningCallback(TrainerCallback, ExportableState):
    """Prune the model a `Trainer` trains, as `config` says (`MovementPruningConfig` or
    `MagnitudePruningConfig`). Pass it in `Trainer(callbacks=[...])`; after training, call
    `hfcompress.finalize_pruning(trainer.model)`. The current and scheduled sparsity are added to the logs."""

    def __init__(self, config: PruningConfig | dict):
        if isinstance(config, dict):
            config = pruning_config_from_dict(config)
        if not isinstance(config, PruningConfig):
            raise TypeError(f"PruningCallback needs a PruningConfig, got {type(config).__name__}")
        self.config = config
        self.pruner: Pruner | None = None
        self._updated_at: int | None = None

    # ExportableState: the config is the callback's whole state; masks and scores are in the model.
    def state(self) -> dict:
        return {"args": {"config": self.config.to_dict()}, "attributes": {}}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("PruningCallback needs the Trainer's model")
        self.pruner = Pruner.attach(model, self.config)

    def _pruner(self, model) -> Pruner:
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = Pruner.from_model(model) if getattr(model, CONFIG_ATTRIBUTE, None) else None
            if self.pruner is None:
                raise ValueError("the model carries no pruning masks: pass PruningCallback to Trainer(callbacks=...)")
        return self.pruner

    def total_steps(self, state) -> int:
        return self.config.total_steps or state.max_steps

    def scheduled_sparsity(self, step: int, state) -> float:
        c = self.config
        return cubic_sparsity(
            step, self.total_steps(state), c.final_sparsity, c.initial_sparsity, c.warmup_steps, c.cooldown_steps
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        pruner = self._pruner(model)
        # A checkpoint's trainer_state.json carries the config it was trained with.
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        stored = stored[0] if isinstance(stored, list) else stored
        if stored is not None:
            stored_config = stored.get("args", {}).get("config")
            if stored_config is not None and stored_config != pruner.config.to_dict():
                raise ValueError(
                    f"resuming with a different pruning config: the checkpoint was trained with {stored_config}, "
                    f"this run has {pruner.config.to_dict()}"
                )
        if pruner.config.to_dict() != self.config.to_dict():
            raise ValueError(
                f"resuming with a different pruning config: the checkpoint was trained with {self.config.to_dict()}, "
                f"this run has {pruner.config.to_dict()}"
            )
        self.scheduled_sparsity(0, state)  # fails early on a schedule longer than training
        self._updated_at = None
        self._update(state, pruner)

    def _update(self, state, pruner: Pruner) -> None:
        step = state.global_step
        if self._updated_at is not None and step - self._updated_at < self.config.update_every:
            return
        pruner.update(self.scheduled_sparsity(step, state))
        self._updated_at = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Once per optimizer step, so every micro-batch of a gradient-accumulation step sees the same masks.
        self._update(state, self._pruner(model))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        c = self.config
        if isinstance(c, MovementPruningConfig) and c.soft and c.final_sparsity > 0:
            ramp = self.scheduled_sparsity(state.global_step, state) / c.final_sparsity
            self._pruner(model).add_score_penalty(c.regularization * ramp)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        pruner = self._pruner(model)
        pruner.update(self.scheduled_sparsity(state.global_step, state))
        logger.info("pruning: %.2f%% of the targeted weights are masked", 100 * pruner.sparsity())

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if logs is None or model is None or self.pruner is None:
            return
        entry = {"sparsity": round(self.pruner.sparsity(), 4)}
        if "loss" in logs or "eval_loss" not in logs:
            entry["sparsity_target"] = round(self.scheduled_sparsity(state.global_step, state), 4)
        logs.update(entry)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)
