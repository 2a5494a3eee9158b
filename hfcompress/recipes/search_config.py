"""What a search is asked for: its budget, data, techniques and the settings of its candidates, checked when
made. `SearchConfig`; the search itself is `recipes/search.py`."""

from __future__ import annotations

import hashlib
import json
import os
import types
from dataclasses import dataclass, field

from ..core.config import check_hessian_dtype
from ..data import resolve_seq_len
from .budget import Budget

__all__ = ["FORMATS", "METRICS", "TECHNIQUES", "SearchConfig"]

TECHNIQUES = ("gptq", "lowrank", "prune")
METRICS = ("perplexity",)
# what the chosen candidate is written as; for compressed-tensors the search's GPTQ grids are symmetric (its 3-bit
# candidates could not be read back asymmetric, and symmetric ones load in every transformers)
FORMATS = ("hfcompress", "compressed-tensors")


@dataclass
class SearchConfig:
    budget: Budget | str
    dataset: str
    eval_dataset: str
    metric: str = "perplexity"
    techniques: list[str] | None = None  # all three; GPTQ alone for format compressed-tensors
    bits_options: list[int] = field(default_factory=lambda: [2, 3, 4])
    group_size: int = 128
    num_samples: int = 32
    seq_len: int | None = None  # 512, or the model's positions if fewer (`resolve_windows`), as everywhere
    sensitivity_samples: int = 8
    eval_seq_len: int | None = None
    eval_max_windows: int = 16
    neighbour_bits: float = 0.0
    lowrank_ratios: list[float] = field(default_factory=lambda: [0.7, 0.85])
    prune_sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5])
    format: str = "hfcompress"
    hessian_dtype: str = "float32"  # what GPTQ, whitening and SparseGPT sum their Hessians in (`hessian_dtype_field`)

    def __post_init__(self):
        if isinstance(self.budget, str):
            self.budget = Budget.parse(self.budget)
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.techniques is None:
            self.techniques = ["gptq"] if self.format == "compressed-tensors" else list(TECHNIQUES)
        if isinstance(self.techniques, str):
            self.techniques = [t.strip() for t in self.techniques.split(",") if t.strip()]
        unknown = [t for t in self.techniques if t not in TECHNIQUES]
        if unknown or not self.techniques:
            raise ValueError(
                f"unknown technique(s) {unknown or self.techniques}; expected some of {', '.join(TECHNIQUES)}"
            )
        if self.format == "compressed-tensors" and self.techniques != ["gptq"]:
            raise ValueError(
                f"format compressed-tensors holds quantized grids only; --techniques {','.join(self.techniques)} "
                "would write factorized or pruned layers it cannot express: use --techniques gptq"
            )
        check_hessian_dtype(self.hessian_dtype)
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        bad = [b for b in self.bits_options if b not in (2, 3, 4, 8)]
        if bad or not self.bits_options:
            raise ValueError(f"bits options must be among 2, 3, 4, 8, got {self.bits_options}")
        self.bits_options = sorted(set(self.bits_options))
        for name in ("num_samples", "seq_len", "sensitivity_samples", "eval_seq_len", "eval_max_windows"):
            value = getattr(self, name)
            if value is None and name.endswith("seq_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if (
            isinstance(self.neighbour_bits, bool)
            or not isinstance(self.neighbour_bits, (int, float))
            or not (0 <= self.neighbour_bits < 8)
        ):
            raise ValueError(f"`neighbour_bits` must be a number of bits in [0, 8), got {self.neighbour_bits!r}")
        for path_name in ("dataset", "eval_dataset"):
            path = getattr(self, path_name)
            if not isinstance(path, str) or not path:
                raise ValueError(
                    f"`{path_name}` must be a text file, a datasets folder or a dataset name, got {path!r}"
                )

    @property
    def sym(self) -> bool:
        """Symmetric grids for compressed-tensors: what every reader loads at every width the search tries."""
        return self.format == "compressed-tensors"

    @property
    def tie_siblings(self) -> bool:
        """Linears that serving engines fuse (q/k/v, gate/up) get one width: compressed-tensors checkpoints are
        for serving engines."""
        return self.format == "compressed-tensors"

    def resolve_windows(self, model_config) -> None:
        """Window lengths as every other command takes them: unset means 512 or the model's positions if it has
        fewer; more than its positions is refused."""
        model = types.SimpleNamespace(config=model_config)
        self.seq_len = resolve_seq_len(model, self.seq_len)
        self.eval_seq_len = resolve_seq_len(model, self.eval_seq_len)

    def fingerprint(self, model: str) -> str:
        """What cached sensitivities and candidates depend on (not the budget: a new budget reuses them)."""
        keys = ("dataset", "eval_dataset", "metric", "group_size", "num_samples", "seq_len", "sensitivity_samples",
                "eval_seq_len", "eval_max_windows", "format", "hessian_dtype")  # fmt: skip
        data = {
            "model": os.path.abspath(model) if os.path.isdir(model) else model,
            **{k: getattr(self, k) for k in keys},
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
