"""The head a checkpoint is loaded with: each task hfcompress loads, the transformers auto class that builds it,
and which task a saved model's `architectures` names.

    task_of("bert", ["BertForTokenClassification"])   # "token-classification"
    getattr(transformers, AUTO_CLASSES[task])          # AutoModelForTokenClassification

A model loaded with another head than its own loses the trained one (a classifier's, a seq2seq model's encoder)
and is saved with a random one, so a head transformers has but no task here builds is refused, not guessed.
"""

from __future__ import annotations

import importlib
from typing import Literal

__all__ = ["AUTO_CLASSES", "Task", "main_input", "task_of"]

# task -> (auto class, the mapping of model type -> class that auto class builds); the first task whose mapping
# builds the saved class wins (a class two mappings share, Gemma 3's, is the same model built either way; the
# order only names the task: the pipeline tag, the card's auto class)
_TASKS = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "sequence-classification": (
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    ),
    "token-classification": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    "multiple-choice": ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "speech-seq2seq": ("AutoModelForSpeechSeq2Seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    # after seq2seq: BART's mask-filling class is its seq2seq one
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "image-text-to-text": ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    "base": ("AutoModel", "MODEL_MAPPING_NAMES"),
    # after base, which builds the same class for most types (BertModel); T5's encoder alone is only here
    "text-encoding": ("AutoModelForTextEncoding", "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES"),
}
AUTO_CLASSES = {task: auto for task, (auto, _) in _TASKS.items()}
Task = Literal[tuple(_TASKS)]  # the names a config field or a command line takes


def _mappings():
    return importlib.import_module("transformers.models.auto.modeling_auto")  # not at import: the parser loads this


def _built(task: str, model_type: str) -> set[str]:
    names = getattr(_mappings(), _TASKS[task][1]).get(model_type, ())
    return {names} if isinstance(names, str) else set(names)


def _transformers_heads() -> set[str]:
    """Every class some transformers auto class builds."""
    heads, mappings = set(), _mappings()
    for name in dir(mappings):
        if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES"):
            for built in getattr(mappings, name).values():
                heads.update([built] if isinstance(built, str) else built)
    return heads


def task_of(model_type: str | None, architectures: list[str] | None) -> str:
    """The task whose auto class builds the class a `model_type` model was saved as (its config's
    `architectures`): a model saved without one, or as a class transformers does not know (custom code, an old
    name), is a causal LM, as commands have always loaded it. A transformers class no task here builds
    (`BertForNextSentencePrediction`) is refused with the tasks there are."""
    architectures = set(architectures or [])
    for task in _TASKS:
        if architectures & _built(task, model_type):
            return task
    unsupported = sorted(architectures & _transformers_heads())
    if unsupported:
        raise ValueError(
            f"the checkpoint is a {unsupported[0]}, a head hfcompress does not load (it would be saved with another "
            f"head, its own lost); the heads it loads are those of the tasks {', '.join(_TASKS)}"
        )
    return "causal-lm"


def main_input(model_type: str, task: str) -> str:
    """What the class `task`'s auto class builds for `model_type` reads: "input_ids" (text, a vision-language
    model too), "pixel_values" (a vision model), "input_features" (speech)."""
    import transformers

    names = sorted(_built(task, model_type))
    return getattr(getattr(transformers, names[0], None), "main_input_name", "input_ids") if names else "input_ids"
