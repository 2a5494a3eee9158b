"""Writes the legacy checkpoint fixtures: tiny models saved by hfcompress at af9150c (format version 4), before
the core/checkpoint redesign, with the logits they produced. `test_legacy_checkpoints.py` loads each with the
current code and compares. Kept for the record; rerunning it with a later hfcompress writes that version's
format, so the committed fixtures are not to be regenerated.

    python tests/checkpoint/legacy/generate.py tests/checkpoint/legacy
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers import ResNetConfig, ResNetForImageClassification

import hfcompress
from hfcompress.distillation import make_student
from hfcompress.lowrank import ConvDecompositionConfig, LowRankConfig, decompose_convolutions, factorize
from hfcompress.pruning import OneShotPruningConfig, compress_sparse, prune_oneshot, prune_structured
from hfcompress.quantization import GPTQConfig, KMeansConfig, RTNConfig, VQConfig, quantize


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def _resnet():
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def _calibration() -> torch.Tensor:
    return torch.randint(4, 96, (8, 16), generator=torch.Generator().manual_seed(1))


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(4, 96, (2, 12), generator=generator)}


def _gptq(**extra):
    return GPTQConfig(bits=4, group_size=16, dataset=_calibration(), num_samples=8, seq_len=16, batch_size=4, **extra)


def build() -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (input kind, compressed model)."""
    cases = {}
    cases["gptq"] = ("text", quantize(_llama(), _gptq()))
    cases["gptq-act-order"] = ("text", quantize(_llama(), _gptq(act_order=True, static_groups=False)))
    cases["rtn"] = ("text", quantize(_llama(), RTNConfig(bits=3, group_size=-1, sym=True)))
    cases["kmeans"] = ("text", quantize(_llama(), KMeansConfig(bits=3, iters=5)))
    cases["vq"] = ("text", quantize(_llama(), VQConfig(bits=2, dim=2, iters=5)))

    sparse = prune_oneshot(_llama(), OneShotPruningConfig(method="magnitude", sparsity=0.5))
    compress_sparse(sparse)
    cases["sparse-bitmask"] = ("text", sparse)
    pruned = prune_oneshot(_llama(), OneShotPruningConfig(method="magnitude", sparsity=0.5))
    cases["sparse-gptq"] = ("text", quantize(pruned, _gptq()))

    cases["factorized"] = ("text", factorize(_llama(), LowRankConfig(method="svd", rank=8)))
    factorized = factorize(_llama(), LowRankConfig(method="svd", rank=8))
    cases["factorized-rtn"] = ("text", quantize(factorized, RTNConfig(bits=4, group_size=16)))

    resnet = _resnet()
    decompose_convolutions(resnet, ConvDecompositionConfig(method="tucker2", rank_ratio=0.5))
    cases["conv-tucker2"] = ("vision", resnet)

    cases["structured-bert"] = ("text", prune_structured(_bert(), heads=0.5, ffn=0.25))
    cases["student"] = ("text", make_student(_llama(), num_layers=1))
    return cases


def main(folder: str) -> None:
    root = Path(folder)
    for name, (kind, model) in build().items():
        target = root / name
        model.save_pretrained(target)
        for extra in ("generation_config.json",):
            (target / extra).unlink(missing_ok=True)
        inputs = _inputs(kind)
        with torch.no_grad():
            logits = model(**inputs).logits
        save_file({**inputs, "logits": logits.contiguous()}, target / "expected.safetensors")
        print(f"{name}: {sum(f.stat().st_size for f in target.iterdir())} bytes")
    print("hfcompress", hfcompress.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
