"""The cubic sparsity schedule of Zhu & Gupta 2017, with the warm-up and cool-down of Sanh et al. 2020."""

from __future__ import annotations

__all__ = ["cubic_sparsity"]


def cubic_sparsity(
    step: int,
    total_steps: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
) -> float:
    """Sparsity at optimizer step `step`: `initial_sparsity` during the first `warmup_steps`,
    `final_sparsity` during the last `cooldown_steps`, and in between

        s_t = s_f + (s_i - s_f) * (1 - (t - t_w) / (T - t_w - t_c)) ** 3

    which prunes fast while many redundant weights remain and slowly near the end.
    """
    ramp = total_steps - warmup_steps - cooldown_steps
    if ramp <= 0:
        raise ValueError(
            f"the schedule needs more steps than warm-up ({warmup_steps}) plus cool-down ({cooldown_steps}), "
            f"got {total_steps} training steps"
        )
    if step < warmup_steps:
        return initial_sparsity
    progress = min(1.0, (step - warmup_steps) / ramp)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3
