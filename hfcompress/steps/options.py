"""What every step that writes a model folder shares: how it loads and writes, what it measures, where it pushes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OutputOptions"]


@dataclass
class OutputOptions:
    """Options of every model-writing step (a command or a recipe step)."""

    overwrite: bool = field(default=False, metadata={"help": "Replace OUTPUT if it exists and is not empty."})
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = field(
        default="float32", metadata={"help": "dtype to load MODEL in before compressing it."}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Text to measure perplexity and latency on, before and after, for the compression record and "
            "card (default: only size, parameters and bits per weight are recorded)."
        },
    )
    eval_seq_len: int = field(default=512, metadata={"help": "Tokens per evaluation window."})
    eval_max_windows: int = field(default=50, metadata={"help": "Evaluation windows scored."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Push OUTPUT to this Hub repo when done.", "metavar": "REPO_ID"}
    )
    private: bool = field(default=False, metadata={"help": "With --push-to-hub: create the repo private."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars or info logs."})
    # the tokenized evaluation windows, read once and shared by the before and after measurements
    eval_windows: list | None = field(default=None, init=False, repr=False, compare=False)
