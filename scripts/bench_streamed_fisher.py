"""Peak memory and wall time of the search's Fisher pass streamed from disk (`core.streamed_fisher`), one block
in memory at a time, against the same pass on the model loaded whole in float32 (`core.fisher.output_fisher`),
and how far apart their Fisher vectors are; with `--sensitivity`, of the whole sensitivity pass streamed (GPTQ
w<b> g128 errors at every width of `--bits` on `--num-samples` windows, then the Fisher pass on the first 8:
`recipes.streamed_sensitivity`), streamed only.

The model is `bench_scale.py`'s random-weight Llama (hidden 4096, intermediate 11008, vocabulary 32000, bfloat16
shards; built once into its cache), the windows are the first ones of ../shared/corpus/calib.txt, and every linear
of the blocks and the output layer is watched. Each pass is a fresh process; its peak resident memory (imports
included) is `getrusage`'s.

    python scripts/bench_streamed_fisher.py                      # 6 blocks, 8 x 512 tokens, streamed only
    python scripts/bench_streamed_fisher.py --in-memory          # and the model loaded whole (about 6 GB)
    python scripts/bench_streamed_fisher.py --layers 12 --num-samples 4
    python scripts/bench_streamed_fisher.py --sensitivity --bits 3 4 --num-samples 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, random_model

from hfcompress.hub.record import cpu_description


def windows(folder: Path, num_samples: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = (SHARED / "corpus" / "calib.txt").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(folder)(text[: 40 * num_samples * seq_len]).input_ids
    if len(ids) < num_samples * seq_len:
        raise ValueError(f"calib.txt gives {len(ids)} tokens, {num_samples} x {seq_len} needed")
    return torch.tensor(ids[: num_samples * seq_len]).view(num_samples, seq_len)


def child(mode: str, folder: Path, num_samples: int, seq_len: int, out: Path, bits: list[int]) -> None:
    """One pass in this process: the Fisher vectors to `out`, its figures printed as JSON."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from hfcompress.core.fisher import output_fisher
    from hfcompress.core.streamed_fisher import streamed_output_fisher

    config = AutoConfig.from_pretrained(folder)
    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    names = [f"model.layers.{i}.{leaf}" for i in range(config.num_hidden_layers) for leaf in leaves] + ["lm_head"]
    tokens = windows(folder, num_samples, seq_len)
    start = time.perf_counter()
    if mode == "sensitivity":
        from hfcompress.quantization import GPTQConfig
        from hfcompress.recipes.streamed_sensitivity import streamed_gptq_scores

        config = GPTQConfig(group_size=128, dataset=tokens, num_samples=num_samples, seq_len=seq_len)
        scores = streamed_gptq_scores(folder, config, bits, tokens[:8], folder=out.parent)
        out.with_suffix(".json").write_text(json.dumps(scores, indent=1))
        fisher = {}
    elif mode == "streamed":
        fisher = streamed_output_fisher(folder, tokens, names, batch_size=2, folder=out.parent)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        fisher = output_fisher(model, tokens, names, batch_size=2)
    seconds = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in fisher.items()}, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": peak / 2**20}))


def run(mode: str, folder: Path, args, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--layers", str(args.layers),
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--cache", str(args.cache),
               "--out", str(out), "--bits", *map(str, args.bits)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["wall_seconds"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="Depth of the random model.")
    parser.add_argument("--num-samples", type=int, default=8, help="Windows of calib.txt (the search's default).")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--in-memory", action="store_true", help="Also the model loaded whole in float32.")
    parser.add_argument("--sensitivity", action="store_true", help="The whole sensitivity pass, streamed.")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="Widths of --sensitivity.")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hfcompress_bench_scale"))
    parser.add_argument("--child", choices=["streamed", "whole", "sensitivity"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.cache / f"llama-4096x{args.layers}"
    if args.child:
        child(args.child, folder, args.num_samples, args.seq_len, args.out, args.bits)
        return
    random_model(folder, args.layers)
    work = args.cache / "out" / "fisher"
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; {args.layers} blocks, {args.num_samples} x {args.seq_len} tokens of calib.txt")
    if args.sensitivity:
        print(f"sensitivity pass: GPTQ g128 at {args.bits} bits, Fisher on 8 windows")
        results = {"sensitivity": run("sensitivity", folder, args, work / "sensitivity.safetensors")}
    else:
        results = {"streamed": run("streamed", folder, args, work / "streamed.safetensors")}
    if args.in_memory and not args.sensitivity:
        results["whole"] = run("whole", folder, args, work / "whole.safetensors")
    print("| pass | peak RSS (MiB) | wall (s) |\n| --- | --- | --- |")
    for mode, figures in results.items():
        print(f"| {mode} | {figures['peak_rss_mb']:,.0f} | {figures['wall_seconds']:,.0f} |")
    if args.in_memory and not args.sensitivity:
        from safetensors.torch import load_file

        streamed, whole = load_file(work / "streamed.safetensors"), load_file(work / "whole.safetensors")
        worst = max(float((streamed[k] - v).abs().max() / v.abs().max()) for k, v in whole.items())
        print(f"largest difference of a Fisher vector, relative to its largest entry: {worst:.2e}")


if __name__ == "__main__":
    main()
