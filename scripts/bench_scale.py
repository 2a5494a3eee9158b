"""Peak memory and wall time of a compression streamed from disk (`--offload disk`: GPTQ by default, or another
technique with `--methods`) against the same run in memory, on models of growing depth, and
whether both write the same tensors.

Builds (once, cached in --cache) random-weight Llama-shaped models, hidden 4096, intermediate 11008, vocabulary
32000, untied embeddings, bfloat16 safetensors in 1 GB shards: 6 layers (about 1.47B parameters, 2.9 GB) and
12 layers (2.6B). The tokenizer is ../shared/refmodel's (its ids lie inside the vocabulary); calibration text is
../shared/corpus/calib.txt. Each run is a fresh process; its peak resident memory (imports included) is what
the compression record says (`getrusage`), its wall time is measured around the process.

    python scripts/bench_scale.py                       # 6 and 12 layers streamed, 6 layers in memory
    python scripts/bench_scale.py --layers 6 12 --methods rtn   # round-to-nearest instead
    python scripts/bench_scale.py --layers 6 12 --methods rtn magnitude wanda sparsegpt kmeans whiten awq w8a8
    python scripts/bench_scale.py --refmodel            # ../shared/refmodel, 128 x 512 tokens, both paths
    python scripts/bench_scale.py --layers --refmodel --methods sparsegpt whiten
    python scripts/bench_scale.py --layers --processes 2 --repeats 3   # refmodel in memory: 1 process against 2
    python scripts/bench_scale.py --layers --moe 4      # a random 4-block Mixtral, streamed and in memory
    python scripts/bench_scale.py --layers 1 --in-memory --methods gptq-f64 --stream-processes 2
        # streamed by 2 processes (torchrun, gloo) against one process of all cores and one of as many threads
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHAPE = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


# a mixture-of-experts model of the same kind (Mixtral's layout: 8 experts, 2 per token), narrower so that a block
# of 8 experts stays near the Llama's block in float32 (0.87 GB against 0.81)
MOE_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


def random_model(folder: Path, layers: int, moe: bool = False) -> Path:
    """A random-weight Llama of `layers` blocks saved in bfloat16, built once in a process of its own: a child
    started afterwards would otherwise report this process's peak as its own (Linux carries `ru_maxrss` over
    fork and exec)."""
    if not any((folder / name).is_file() for name in ("model.safetensors.index.json", "model.safetensors")):
        builder = multiprocessing.get_context("spawn").Process(target=_build, args=(folder, layers, moe))
        builder.start()
        builder.join()
        if builder.exitcode != 0:
            raise RuntimeError(f"building the random model in {folder} failed (exit code {builder.exitcode})")
    return folder


def _build(folder: Path, layers: int, moe: bool = False) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    if moe:  # saved as transformers saves Mixtral: each expert's w1/w2/w3 a tensor of its own
        config = MixtralConfig(**MOE_SHAPE, num_hidden_layers=layers, dtype="bfloat16")
        model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    else:
        config = LlamaConfig(**SHAPE, num_hidden_layers=layers, dtype="bfloat16")
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(SHARED / "refmodel").save_pretrained(folder)


# each method's command words, its options and whether it reads calibration text
METHODS = {
    "gptq": (["quantize", "gptq"], ["--bits", "4", "--group-size", "128"], True),
    "rtn": (["quantize", "rtn"], ["--bits", "4", "--group-size", "128"], False),
    "sparsegpt": (["prune", "oneshot"], ["--method", "sparsegpt", "--sparsity", "0.5"], True),
    "whiten": (["factorize"], ["--method", "whiten", "--param-ratio", "0.8", "--allocation", "uniform"], True),
    "kmeans": (["quantize", "kmeans"], ["--bits", "4"], True),
    "wanda": (["prune", "oneshot"], ["--method", "wanda", "--sparsity", "0.5"], True),
    "magnitude": (["prune", "oneshot"], ["--method", "magnitude", "--sparsity", "0.5"], False),
    "awq": (["quantize", "awq"], ["--bits", "4", "--group-size", "128"], True),
    # AWQ's scales searched through each linear's input Hessian instead of the holding module's output
    "awq-hessian": (["quantize", "awq"], ["--bits", "4", "--group-size", "128", "--search-objective", "hessian"], True),
    "w8a8": (["quantize", "w8a8"], ["--smoothquant", "0.5"], True),
    # GPTQ w4 g128 with a low-rank correction of 0.25 bits per weight; AWQ and W8A8 with GPTQ weights (two passes)
    "gptq-f64": (["quantize", "gptq"], ["--bits", "4", "--group-size", "128", "--hessian-dtype", "float64"], True),
    "gptq-comp": (["quantize", "gptq"], ["--bits", "4", "--group-size", "128", "--compensation-bits", "0.25"], True),
    "awq-gptq": (["quantize", "awq"], ["--bits", "4", "--group-size", "128", "--weights", "gptq"], True),
    "w8a8-gptq": (["quantize", "w8a8"], ["--smoothquant", "0.5", "--weights", "gptq"], True),
}


def run(
    model: Path,
    output: Path,
    stream: bool,
    num_samples: int,
    seq_len: int,
    processes: int = 1,
    method: str = "gptq",
    threads: int | None = None,
) -> dict:
    """One run of `method` (with `processes` > 1: under torchrun, gloo, the cores shared; `threads`: the threads of
    each process, by default the cores shared by the processes); its wall time and the peak memory its record
    gives (rank 0's)."""
    shutil.rmtree(output, ignore_errors=True)
    words, options, calibrated = METHODS[method]
    command = [
        "-m", "hfcompress", *words, str(model), str(output), *options, "-q", "--offload", "disk" if stream else "none",
    ]  # fmt: skip
    if calibrated:
        calibration = SHARED / "corpus" / "calib.txt"
        command += ["--dataset", str(calibration), "--num-samples", str(num_samples), "--seq-len", str(seq_len)]
    env = dict(os.environ)
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), *command]
        threads = threads or max(1, (os.cpu_count() or 1) // processes)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, env=env)
    seconds = time.perf_counter() - start
    record = json.loads((output / "hfcompress_record.json").read_text())
    peak = record["steps"][-1]["memory"]["peak_rss_bytes"] / 2**20
    # each run as it ends (the table comes at the end, and the next run deletes this one's output)
    how = ("stream" if stream else "memory") + (f", {processes} processes" if processes > 1 else "")
    print(f"{model.name}, {method}, {how}: {peak:,.0f} MiB, {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "peak_rss_mb": peak}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two output folders store the same tensors, bit for bit (whatever their sharding). Read one tensor
    at a time: Linux counts the resident memory a process has when it starts the next run into that run's peak
    (`ru_maxrss` survives fork and exec), so this process must stay small."""
    from safetensors import safe_open

    def where(folder):
        files = {}
        for file in sorted(glob.glob(str(folder / "*.safetensors"))):
            with safe_open(file, "pt") as f:
                files.update(dict.fromkeys(f.keys(), file))
        return files

    def read(file, key):
        with safe_open(file, "pt") as f:
            return f.get_tensor(key)

    x, y = where(a), where(b)
    if x.keys() != y.keys():
        return False
    for key in x:
        s, t = read(x[key], key), read(y[key], key)
        if s.dtype != t.dtype or not torch.equal(s, t):
            return False
    return True


def measure(model: Path, name: str, args, in_memory: bool, method: str = "gptq") -> list[dict]:
    rows = []
    out = Path(args.cache) / "out"
    paths = [("stream", True)] + ([("memory", False)] if in_memory else [])
    runs = {label: [] for label, _ in paths}
    for _ in range(args.repeats):  # alternating, so both see the same machine
        for label, stream in paths:
            runs[label].append(run(model, out / label, stream, args.num_samples, args.seq_len, method=method))
    equal = same_tensors(out / "stream", out / "memory") if in_memory else None
    for label, _ in paths:
        rows.append(
            {
                "model": name,
                "path": f"{method}, {label}",
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[label]),
                "seconds": statistics.median(r["seconds"] for r in runs[label]),
                "same_tensors": equal,
            }
        )
    if args.stream_processes > 1 and METHODS[method][2]:
        rows += stream_processes(model, name, args, method, out)
    return rows


def stream_processes(model: Path, name: str, args, method: str, out: Path) -> list[dict]:
    """`method` streamed by `args.stream_processes` processes (rank 0's peak), and by one process of as many
    threads as each of them has: the codes are compared with that one (float32 products change with the thread
    count; with float64 Hessians, `gptq-f64`, the split of the batches changes nothing)."""
    n = args.stream_processes
    threads = max(1, (os.cpu_count() or 1) // n)
    runs = {"split": [], "one": []}
    for _ in range(args.repeats):
        runs["split"].append(run(model, out / "split", True, args.num_samples, args.seq_len, n, method))
        runs["one"].append(run(model, out / "one", True, args.num_samples, args.seq_len, 1, method, threads))
    equal = same_tensors(out / "split", out / "one")
    labels = {"split": f"stream, {n} processes", "one": f"stream, 1 process of {threads} thread(s)"}
    return [
        {
            "model": name,
            "path": f"{method}, {labels[key]}",
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[key]),
            "seconds": statistics.median(r["seconds"] for r in runs[key]),
            "same_tensors": equal,
        }
        for key in runs
    ]


def processes(args) -> list[dict]:
    """refmodel in memory, 128 x 512 tokens: one process (all cores) against `args.processes` (cores shared)."""
    out = Path(args.cache) / "out"
    runs = {1: [], args.processes: []}
    for _ in range(args.repeats):
        for n in runs:
            runs[n].append(run(SHARED / "refmodel", out / f"p{n}", False, 128, args.seq_len, processes=n))
    equal = same_tensors(out / "p1", out / f"p{args.processes}")
    return [
        {
            "model": "refmodel (128 x 512)",
            "path": f"gptq, memory, {n} process{'es' if n > 1 else ''}",
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[n]),
            "seconds": statistics.median(r["seconds"] for r in runs[n]),
            "same_tensors": equal,
        }
        for n in runs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[6, 12], help="Depths of the random model.")
    parser.add_argument("--in-memory", type=int, nargs="*", default=[6], help="Depths also run in memory.")
    parser.add_argument(
        "--moe", type=int, nargs="*", default=[],
        help="Depths of a random Mixtral (hidden 2048, 8 experts of 4096, 2 per token: 4 blocks are 1.0B parameters), "
        "streamed and in memory.",
    )  # fmt: skip
    parser.add_argument("--refmodel", action="store_true", help="Also ../shared/refmodel with 128 x 512 tokens.")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each path (median time, largest peak).")
    parser.add_argument("--processes", type=int, default=1, help="Also refmodel in memory with this many processes.")
    parser.add_argument(
        "--stream-processes", type=int, default=1,
        help="Also stream each calibrated method with this many processes (torchrun, gloo), against one process.",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=["gptq"], choices=list(METHODS),
        help="Techniques to run: GPTQ or RTN w4 g128, SparseGPT, Wanda or magnitude pruning to 50%%, whitened SVD at "
        "0.8 of the parameters (uniform), scalar k-means at 4 bits, AWQ w4 g128 (scales searched by the holding module's "
        "output, or by each linear's input Hessian: awq-hessian), W8A8 (SmoothQuant 0.5), and GPTQ w4 g128 with 0.25 bits of low-rank compensation (gptq-comp) or float64 Hessians (gptq-f64), AWQ and W8A8 with GPTQ weights (*-gptq).",
    )  # fmt: skip
    parser.add_argument("--cache", default="/tmp/hfcompress_bench_scale", help="Where models and outputs go.")
    args = parser.parse_args()

    from hfcompress.hub.record import hardware_description

    rows = []
    for layers in args.layers:
        folder = random_model(Path(args.cache) / f"llama-4096x{layers}", layers)
        for method in args.methods:
            rows += measure(folder, f"random Llama 4096x{layers}", args, layers in args.in_memory, method)
    for layers in args.moe:
        folder = random_model(Path(args.cache) / f"mixtral-2048x{layers}", layers, moe=True)
        for method in args.methods:
            rows += measure(folder, f"random Mixtral 2048x{layers} (8 experts)", args, True, method)
    if args.refmodel:
        samples, args.num_samples = args.num_samples, 128
        for method in args.methods:
            rows += measure(SHARED / "refmodel", "refmodel (128 x 512)", args, True, method)
        args.num_samples = samples
    if args.processes > 1:
        rows += processes(args)
    methods = ", ".join(args.methods)
    calibration = f"the random models calibrated on {args.num_samples} x {args.seq_len} tokens"
    print(f"\n{hardware_description()}; {methods}, {calibration}\n")
    print("| model | path | peak RSS (MiB) | wall (s) | same tensors |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['peak_rss_mb']:,.0f} | {r['seconds']:.1f} | {r['same_tensors']} |")
    memory = {(r["model"], r["path"].split(",")[0]): r for r in rows if r["path"].endswith(", memory")}
    for r in rows:
        key = (r["model"], r["path"].split(",")[0])
        if r["path"].endswith(", stream") and key in memory:
            ratio = r["seconds"] / memory[key]["seconds"]
            print(f"{r['model']}, {key[1]}: streaming / in memory wall time {ratio:.2f}x")


if __name__ == "__main__":
    main()
