"""GPTQ w4 g32 sym exported to GGUF Q4_0 and run by llama.cpp, against transformers on the same token windows.

1. `hfcompress quantize gptq MODEL --bits 4 --group-size 32 --sym` (calibration calib.txt), then
   `hfcompress export gguf`.
2. Perplexity on the first `--windows` windows of 512 tokens of val.txt: transformers on the hfcompress
   checkpoint, and llama.cpp (llama-cpp-python, run by `scripts/llamacpp_ppl.py` in `--llama-python`) on the GGUF
   file, fed the same token ids. Target: within 1%.
3. Decode tokens/s at batch 1 (greedy, 64 tokens after an 8-token prompt, median of 3): llama.cpp on the GGUF
   file, hfcompress's own kernel on the checkpoint (float32 activations, the default, and with
   HFCOMPRESS_DECODE_ACTIVATIONS=int8: inputs rounded to int8 per block of 32, as llama.cpp rounds them for its
   Q4_0 dot products), and the float32 model. The quantized checkpoint's float32 output layer runs hfcompress's
   dense loop (`DecodeLinear`), as in every loaded quantized checkpoint. Goal: our kernel at least half of
   llama.cpp's speed.

With `--shape 0.47b` the model is instead the random-weight 0.47B Llama of `bench_inference.py` (with
refmodel's tokenizer), quantized round-to-nearest w4 g32 sym: decode speed only (perplexity means nothing there).

    python scripts/bench_gguf.py --llama-python /path/to/venv/bin/python [--shape 0.47b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import perplexity
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.cpu_extension import load
from hfcompress.steps.loading import load_tokenizer

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def decode_speed(model, prompt: torch.Tensor, tokens: int = 64, runs: int = 3) -> float:
    speeds = []
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (kernel builds)
        for _ in range(runs):
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            speeds.append(tokens / (time.perf_counter() - start))
    return statistics.median(speeds)


def random_model(tokenizer_source: str, folder: Path) -> Path:
    """bench_inference.py's 0.47B Llama shape with random weights, saved with the tokenizer of `tokenizer_source`."""
    from bench_inference import SHAPE  # scripts/ is on the path when a script runs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_source).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--windows", type=int, default=None, help="default: 40 (refmodel), 2 (0.47b)")
    parser.add_argument("--out", default=str(HERE.parent / "bench_out" / "gguf"))
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--shape", choices=("refmodel", "0.47b"), default="refmodel")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quantized, gguf_file = out / f"{args.shape}-w4g32-sym", out / f"{args.shape}-q4_0.gguf"
    cli = [sys.executable, "-m", "hfcompress"]
    if args.shape == "0.47b":
        dense_folder = random_model(args.model, out / "0.47b-fp32")
        subprocess.run([*cli, "quantize", "rtn", str(dense_folder), str(quantized), "--bits", "4", "--group-size", "32",
                        "--sym", "--overwrite", "-q"], check=True)  # fmt: skip
    else:
        dense_folder = Path(args.model)
        subprocess.run([*cli, "quantize", "gptq", args.model, str(quantized), "--bits", "4", "--group-size", "32",
                        "--sym", "--dataset", args.calib, "--overwrite", "-q"], check=True)  # fmt: skip
    subprocess.run([*cli, "export", "gguf", str(quantized), str(gguf_file), "--overwrite", "-q"], check=True)

    count = args.windows or (40 if args.shape == "refmodel" else 2)
    windows = tokenize_windows(load_tokenizer(args.model), load_texts(args.val), 512)[:count]
    (out / "windows.json").write_text(json.dumps(windows.tolist()))
    peer = subprocess.run([args.llama_python, str(HERE / "llamacpp_ppl.py"), str(gguf_file), str(out / "windows.json")],
                          check=True, capture_output=True, text=True)  # fmt: skip
    llama = json.loads(peer.stdout.strip().splitlines()[-1])

    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = perplexity(model, windows)
    prompt = windows[:1, :8]
    speeds = {"llama.cpp Q4_0": llama["decode_tokens_per_s"], "hfcompress w4 g32 kernel": decode_speed(model, prompt),
              "float32 (transformers)": decode_speed(dense, prompt)}  # fmt: skip
    if load() is not None:  # kernels are chosen when a layer first runs: a fresh copy takes the int8 loop
        os.environ["HFCOMPRESS_DECODE_ACTIVATIONS"] = "int8"
        int8 = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).eval()
        speeds["hfcompress w4 g32 kernel, int8 activations"] = decode_speed(int8, prompt)
        del os.environ["HFCOMPRESS_DECODE_ACTIVATIONS"]
    if args.shape != "refmodel":
        print("\n(random weights: the perplexities below only show both runtimes compute the same function)")
    print(f"\nperplexity on {len(windows)} windows of 512 tokens of {args.val} (the same token ids):")
    print(f"- transformers, hfcompress checkpoint: {ours:.4f}")
    print(f"- llama.cpp, {gguf_file.name}: {llama['perplexity']:.4f} ({100 * (llama['perplexity'] / ours - 1):+.3f}%; "
          f"target within 1%: {'met' if abs(llama['perplexity'] / ours - 1) <= 0.01 else 'NOT met'})")  # fmt: skip
    print("\ndecode tokens/s, batch 1, 64 tokens, median of 3:")
    for name, speed in speeds.items():
        print(f"- {name}: {speed:.1f}")
    for name in [key for key in speeds if key.startswith("hfcompress")]:
        print(f"- {name} / llama.cpp: {speeds[name] / speeds['llama.cpp Q4_0']:.2f}x (goal at least 0.5x)")


if __name__ == "__main__":
    main()
