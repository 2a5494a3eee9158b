"""Budgets and what they are measured against: the original model's linear weights, size and parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.registry import compressed_layer_types
from ..core.structure import candidate_linears, linear_weight
from ..evaluation import weights_size_bytes
from ..evaluation.footprint import layer_bits
from ..steps.loading import checkpoint_dtype
from ..steps.recording import stored_parameters
from .allocation import grid_bits_per_weight

__all__ = ["Baseline", "Budget", "check_reachable", "measure_baseline", "nonzero_parameters"]


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    KINDS = ("bits", "size", "params")

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, sep, value = str(text).partition("=")
        if not sep or kind not in cls.KINDS:
            raise ValueError(f"--budget must look like bits=3.5, size=0.3 or params=0.7, got {text!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--budget {kind}= needs a number, got {value!r}") from None
        if kind == "bits" and not 0 < number < 32:
            raise ValueError(f"--budget bits= must be between 0 and 32 bits per weight, got {number}")
        if kind != "bits" and not 0 < number <= 1:
            raise ValueError(f"--budget {kind}= is a fraction of the original model in (0, 1], got {number}")
        return cls(kind, number)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass
class Baseline:
    """What budgets are measured against: the original model's linear weights, size and parameters."""

    linear_weights: int
    linear_shapes: dict[str, tuple[int, int]]
    dtype_bits: int
    size_bytes: int
    parameters: int

    @property
    def other_bits(self) -> float:
        return self.size_bytes * 8 - self.linear_weights * self.dtype_bits

    def effective_bits(self, model) -> float:
        """Bits per weight (`evaluation.footprint.layer_bits`, the one definition) over the linear layers the
        search started from: what now stands under each original layer's name (codes and scales, factors, a
        smaller or untouched weight), floating tensors at the checkpoint's dtype, over the original weights."""
        total = sum(layer_bits(model.get_submodule(name), self.dtype_bits) for name in self.linear_shapes)
        return total / self.linear_weights

    def linear_bits_target(self, budget: Budget) -> float | None:
        if budget.kind == "bits":
            return budget.value
        if budget.kind == "size":
            return (budget.value * self.size_bytes * 8 - self.other_bits) / self.linear_weights
        return None

    def kept_fraction_target(self, budget: Budget) -> float:
        """Fraction of the linear weights' parameters (factors, non-zeros) the budget allows at full precision."""
        if budget.kind == "params":
            other = self.parameters - self.linear_weights
            return (budget.value * self.parameters - other) / self.linear_weights
        return self.linear_bits_target(budget) / self.dtype_bits

    def meets(self, budget: Budget, metrics: dict) -> bool:
        if budget.kind == "bits":
            return metrics["effective_bits"] <= budget.value + 1e-3
        if budget.kind == "size":
            return metrics["size_bytes"] <= budget.value * self.size_bytes
        return metrics["parameters"] <= budget.value * self.parameters


def nonzero_parameters(model) -> int:
    total = stored_parameters(model)
    for module in model.modules():
        if isinstance(module, compressed_layer_types()) and hasattr(module, "nnz"):  # stores only its non-zeros
            total -= module.in_features * module.out_features - module.nnz
    return total


def measure_baseline(model, model_path: str) -> Baseline:
    shapes = {n: tuple(linear_weight(m).shape) for n, m in candidate_linears(model, None).items()}
    if not os.path.isdir(model_path):
        raise ValueError(f"search needs MODEL as a local folder (to measure its size on disk), got {model_path!r}")
    return Baseline(
        linear_weights=sum(o * i for o, i in shapes.values()),
        linear_shapes=shapes,
        dtype_bits=torch.finfo(checkpoint_dtype(model_path)).bits,
        size_bytes=weights_size_bytes(model_path),
        parameters=nonzero_parameters(model),
    )


def _smallest_reachable(base: Baseline, config) -> tuple[str, float]:
    """The most compressed point any requested technique can reach, in the budget's units."""
    points = []
    budget = config.budget
    if "gptq" in config.techniques and budget.kind != "params":
        b = config.bits_options[0]
        bits = sum(
            o * i * grid_bits_per_weight(b, config.group_size, i, sym=config.sym)
            for o, i in base.linear_shapes.values()
        )
        points.append((f"gptq at {b} bits", bits / base.linear_weights))
    if "lowrank" in config.techniques:
        points.append(("lowrank at 10% of the parameters", 0.1 * base.dtype_bits))
    if "prune" in config.techniques:
        points.append(("prune at 90% sparsity", 1 + 0.1 * base.dtype_bits))
    if not points:
        raise ValueError(
            f"none of {config.techniques} reduces the parameter count: a params= budget needs lowrank or prune"
        )
    name, bits = min(points, key=lambda p: p[1])
    if budget.kind == "bits":
        return name, bits
    if budget.kind == "size":
        return name, (bits * base.linear_weights + base.other_bits) / 8 / base.size_bytes
    kept = 0.1 if name.startswith(("lowrank", "prune")) else 1.0
    return name, (base.parameters - base.linear_weights + kept * base.linear_weights) / base.parameters


def check_reachable(base: Baseline, config) -> None:
    name, value = _smallest_reachable(base, config)
    if value > config.budget.value:
        unit = {"bits": "bits per weight", "size": "of the original size", "params": "of the original parameters"}
        raise ValueError(
            f"budget {config.budget} cannot be met with {', '.join(config.techniques)}: the smallest reachable point is "
            f"{name}, at about {value:.3g} {unit[config.budget.kind]}"
        )
