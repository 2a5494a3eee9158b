"""The head a checkpoint is loaded with, from the class its config names."""

import pytest
import torch
import transformers

from hfcompress.core.tasks import AUTO_CLASSES, task_of


@pytest.mark.parametrize(
    "model_type, architectures, task",
    [
        ("llama", ["LlamaForCausalLM"], "causal-lm"),
        ("llama", None, "causal-lm"),  # a config built in Python, saved without a class
        ("llama", ["MyOwnLlama"], "causal-lm"),  # custom code or an old name: as commands always loaded it
        ("bert", ["BertForSequenceClassification"], "sequence-classification"),
        ("bert", ["BertForTokenClassification"], "token-classification"),
        ("bert", ["BertForQuestionAnswering"], "question-answering"),
        ("bert", ["BertForMaskedLM"], "masked-lm"),
        ("bert", ["BertModel"], "base"),
        ("t5", ["T5ForConditionalGeneration"], "seq2seq-lm"),
        ("bart", ["BartForConditionalGeneration"], "seq2seq-lm"),  # its masked-LM class too
        ("t5", ["T5EncoderModel"], "text-encoding"),
        ("whisper", ["WhisperForConditionalGeneration"], "speech-seq2seq"),
        ("vit", ["ViTForImageClassification"], "image-classification"),
        ("llava", ["LlavaForConditionalGeneration"], "image-text-to-text"),
        ("gemma3", ["Gemma3ForConditionalGeneration"], "causal-lm"),  # both mappings build the same class
    ],
)
def test_the_task_is_the_one_whose_auto_class_builds_the_saved_class(model_type, architectures, task):
    assert task_of(model_type, architectures) == task
    if architectures and hasattr(transformers, architectures[0]):  # the task's auto class builds that very class
        with torch.device("meta"):
            built = getattr(transformers, AUTO_CLASSES[task]).from_config(transformers.AutoConfig.for_model(model_type))
        assert type(built).__name__ == architectures[0]


def test_a_head_no_task_builds_is_refused_with_the_tasks_there_are():
    with pytest.raises(ValueError, match="a BertForNextSentencePrediction, a head hfcompress does not load") as error:
        task_of("bert", ["BertForNextSentencePrediction"])
    assert "token-classification" in str(error.value)
