"""Tiny models and tokenizers built on the spot: no network, no ../shared."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 256


def _llama_like(config_cls, model_cls, **extra):
    def build():
        config = config_cls(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **extra,
        )
        return model_cls(config)

    return build


ARCHITECTURES = {
    "llama": _llama_like(LlamaConfig, LlamaForCausalLM),
    "mistral": _llama_like(MistralConfig, MistralForCausalLM),
    "qwen2": _llama_like(Qwen2Config, Qwen2ForCausalLM),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "opt": lambda: OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    ),
    "bert": lambda: BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    ),
}


def _moe(config_cls, model_cls, **extra):
    def build():
        config = config_cls(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, eos_token_id=1, pad_token_id=0, **extra,
        )  # fmt: skip
        config._experts_implementation = "eager"  # the reference the per-expert linears are held to, bit for bit
        return model_cls(config)

    return build


# mixture-of-experts models, their experts fused as 3-D parameters (transformers 5): 8 experts, 2 per token
MOE_ARCHITECTURES = {
    "mixtral": _moe(
        MixtralConfig, MixtralForCausalLM, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2
    ),
    # a shared expert with its own gate
    "qwen2_moe": _moe(
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": _moe(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
    ),
    "olmoe": _moe(OlmoeConfig, OlmoeForCausalLM, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    # transposed experts with biases, interleaved gate/up and a clamped gate
    "gpt_oss": _moe(
        GptOssConfig, GptOssForCausalLM, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16
    ),
    # a dense first block, shared experts, multi-head latent attention
    "deepseek_v3": _moe(
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
}
ARCHITECTURES.update(MOE_ARCHITECTURES)


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES[arch]().eval()


def token_windows(n: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, seq_len), generator=generator)


@functools.lru_cache(maxsize=1)
def python_text() -> str:
    """Real English text that ships with Python: the help topics behind `pydoc`."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer of at most VOCAB tokens trained on Python's help text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], limit_alphabet=100)
    tokenizer.train_from_iterator([python_text()[:200_000]], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    assert len(wrapped) <= VOCAB
    return wrapped


def save_deep_model(folder: Path) -> Path:
    """An 8-block float16 Llama in 500 KB shards, with calibration text beside it (`calib.txt`): deep enough to
    kill a streamed run halfway."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).half().save_pretrained(folder, max_shard_size="500KB")
    tiny_tokenizer().save_pretrained(folder)
    (Path(folder) / "calib.txt").write_text(python_text()[:60_000])
    return Path(folder)


def kill_halfway(command: list[str], output, blocks: int, env: dict, inside: str = "") -> int:
    """Start `command` (its "OUT" standing for `output`), a streamed run, and kill it with SIGKILL, with every
    process it started (a launcher's ranks), once its progress (in the folder `inside` the partial output) says
    `blocks` blocks are written; returns its exit status (-SIGKILL unless it ended first)."""
    import json
    import signal
    import subprocess
    import time

    import psutil

    from hfcompress.io import partial_dir

    progress = partial_dir(output) / inside / "hfcompress_progress.json"
    process = subprocess.Popen([str(output) if c == "OUT" else c for c in command], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["blocks_done"] >= blocks:
            for each in [*psutil.Process(process.pid).children(recursive=True), process]:  # the ranks first
                each.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return process.wait()


def save_tiny_model(folder, arch: str = "llama") -> None:
    """A complete model folder (weights, config, tokenizer) for command-line tests."""
    model = tiny_model(arch)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def save_sharded_model(folder, arch: str = "llama", prune: bool = False):
    """A float16 model folder in several small safetensors shards, as `--offload disk` streams it; with `prune`,
    half of every block linear's weights are exactly zero."""
    model = tiny_model(arch).half()
    if prune:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                module.weight.data[:, ::2] = 0
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def search_files(folder, sharded: bool = False):
    """`folder` with a tiny model (`model/`, float16 shards with `sharded`) and calibration text (`calib.txt`)."""
    (save_sharded_model if sharded else save_tiny_model)(folder / "model")
    (folder / "calib.txt").write_text(python_text()[:60_000], encoding="utf-8")
    return folder


def run_search(files, out, *extra) -> int:
    """`hfcompress search` on `search_files` with small windows; its exit status."""
    from hfcompress.commands.cli import main

    return main([
        "search", str(files / "model"), str(out), "--dataset", str(files / "calib.txt"),
        "--eval-dataset", str(files / "calib.txt"), "--group-size", "32", "--seq-len", "64", "--num-samples", "8",
        "--sensitivity-samples", "4", "--eval-seq-len", "64", "--eval-max-windows", "6", "-q", *map(str, extra),
    ])  # fmt: skip


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder`, by name."""
    from pathlib import Path

    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def failing_at_shard(index: int):
    """A streamed run that dies as it writes shard `index` (the blocks before it written, its progress kept)."""
    return _failing_write(lambda shard, number: shard == index)


def failing_at_write(number: int):
    """A streamed run that dies at its `number`-th shard write (1-based, counting shards rewritten later: a
    technique's `complete`, a second pass of `stream_twice`)."""
    return _failing_write(lambda shard, count: count == number)


@contextlib.contextmanager
def _failing_write(dies):
    from hfcompress.core.shard_writer import ShardWriter

    write, writes = ShardWriter.write, []

    def fail(self, shard, tensors):
        writes.append(shard)
        if dies(shard, len(writes)):
            raise RuntimeError("killed")
        write(self, shard, tensors)

    ShardWriter.write = fail
    try:
        yield
    finally:
        ShardWriter.write = write


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a multi-process launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """End a rank of a test launcher run under `accelerate launch` once its files are written: a barrier, gloo shut
    down, then exit without the interpreter's teardown. Left to the interpreter, gloo's threads were once torn down
    under a live group ("terminate called without an active exception", SIGABRT in rank 0 of a loaded CI machine),
    and after `destroy_process_group()` a rank hung for minutes while its locals (the DDP model, the trainer) were
    destroyed (1 run in 5 of ddp_distill.py on an idle machine). The tests read only the files."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
