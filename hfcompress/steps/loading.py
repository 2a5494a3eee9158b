"""Loading a model and its tokenizer from a local folder or a Hub id, with errors that say which."""

from __future__ import annotations

import logging
import os
import re

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from ..core.tasks import AUTO_CLASSES, main_input, task_of
from ..quantization.ct_import import load_compressed_tensors, why_hfcompress_reads

__all__ = [
    "DTYPES",
    "TOKENIZER_FILES",
    "checkpoint_dtype",
    "checkpoint_task",
    "load_model",
    "load_tokenizer",
    "reads_text",
    "require_causal_lm",
    "require_tokenizer",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_model_path(model: str) -> str:
    """`model` unchanged if it is a local folder or looks like a Hub id; a clear error if it is a missing path."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model folder {model!r} has no config.json")
        return model
    if os.path.isfile(model):
        raise FileNotFoundError(f"model {model!r} is a file; expected a model folder (with config.json) or a Hub id")
    if "/" in model and os.path.isdir(model.split("/")[0]):  # 'models/mine': a local path, not the Hub's org/name
        raise FileNotFoundError(f"model folder {model!r} does not exist (its parent {model.split('/')[0]!r} does)")
    if os.path.exists(model) or model.startswith((".", "~")) or not _HUB_ID.fullmatch(model):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (expected a model folder or a Hub id like 'org/name')"
        )
    return model


def checkpoint_task(model: str) -> str:
    """The head `model` is loaded with when the technique does not say (`task`): the task whose auto class builds
    the class its checkpoint was saved as (`core.tasks.task_of`: `BertForTokenClassification` is a token
    classifier, `BertModel` a model without a head, `T5ForConditionalGeneration` a seq2seq LM), else a causal LM.
    A model loaded with another head would lose its trained one and be saved with a random one."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {model!r}: {e}") from e
    try:
        return task_of(config.model_type, getattr(config, "architectures", None))
    except ValueError as e:
        raise ValueError(f"{model!r}: {e}") from e


def reads_text(model: str, task: str) -> bool:
    """Whether `model` loaded for `task` reads token ids (calibration text needs its tokenizer), not images."""
    return main_input(AutoConfig.from_pretrained(resolve_model_path(model)).model_type, task) == "input_ids"


def require_causal_lm(model: str, task: str, what: str) -> None:
    """Refuse `what` (perplexity, lm-eval tasks) for a model loaded for another `task` than causal-lm."""
    if task != "causal-lm":
        raise ValueError(
            f"{what} measure a causal language model, and {model!r} is loaded as a {task} model "
            "(the head its checkpoint names); evaluate it with its own task instead"
        )


def load_model(model: str, dtype: str = "float32", task: str | None = "causal-lm"):
    """`model` loaded for `task` (None: the one its checkpoint names, `checkpoint_task`) in `dtype`; a
    compressed-tensors checkpoint hfcompress reads itself (`why_hfcompress_reads`)."""
    task = checkpoint_task(model) if task is None else task
    if task not in AUTO_CLASSES:
        raise ValueError(f"task must be one of {', '.join(AUTO_CLASSES)}, got {task!r}")
    path = resolve_model_path(model)
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        quantization = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
        reason = why_hfcompress_reads(path, quantization)
        if reason is not None:
            logger.info("reading %s with hfcompress, as %s", model, reason)
            return load_compressed_tensors(path, None if dtype == "auto" else DTYPES[dtype]).eval()
        loaded = auto.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {model!r}: {e}") from e
    return loaded.eval()


def checkpoint_dtype(model: str) -> torch.dtype:
    """The dtype the model's config says its weights are stored in (float32 when it does not say)."""

    dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# the files a saved tokenizer leaves in a model folder (any one of them)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(model: str, required: bool = True):
    """The tokenizer saved with `model`. A local folder without one (a training checkpoint, a model built from
    a config) gives None when not `required` (a step that reads no text needs none), else a clear error."""
    path = resolve_model_path(model)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        if not required:
            return None
        raise FileNotFoundError(
            f"model folder {model!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); text needs one: save "
            "the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(path)


def require_tokenizer(tokenizer, model: str, what: str) -> None:
    """Refuse, before any work, a step that reads text (`what`) for a model without a tokenizer."""
    if tokenizer is None:
        raise FileNotFoundError(
            f"{what} is text, and model folder {model!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the model (tokenizer.save_pretrained), or give token ids in Python"
        )
