"""GPTQ against llm-compressor's GPTQ, round-to-nearest and full precision, on a real trained model and on text
no default was tuned on.

Both GPTQs see the very same calibration windows: they are tokenized and chosen here once and handed to each as
token ids (llm-compressor in a subprocess of its own virtual environment, never at the same time as ours). Its
quantized weights come back as safetensors and are scored by the same perplexity code as every other row, on
each held-out text (non-overlapping windows). Prints a markdown table (perplexity per text, quantization
seconds, weight bytes, bits per weight), then the checks of the GPTQ issues.

    python scripts/bench_gptq.py                                   # ../shared/refmodel, no peer
    python scripts/bench_gptq.py --llmcompressor-python /path/to/venv/bin/python
    python scripts/bench_gptq.py --variant 2pass:true_sequential=false --settings 4:128

Held-out texts (default): ../shared/corpus/val.txt and the paragraphs of ../shared/docs-cls/val.jsonl (text no
hfcompress default was chosen on). GPTQ runs with the library's defaults; each --variant adds a row per setting
with some fields changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hfcompress
from hfcompress.data import calibration_batches, load_texts, tokenize_windows
from hfcompress.evaluation import bits_per_weight, perplexity, weights_size_bytes
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.modules import cast_unquantized

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SETTINGS = [(4, 128), (4, -1), (3, 128), (3, -1), (2, 64)]
PEER = "llm-compressor"
TIE = 0.001  # a relative difference the targets count as a tie


def load(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def heldout_texts(path: str) -> list[str]:
    """The texts of a held-out file: a .jsonl's `text` fields, or whatever `load_texts` reads."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return load_texts(path)


def add_data_arguments(parser, num_samples: int = 128, max_windows: int = 100) -> None:
    """The calibration and held-out data options the quality benchmarks share."""
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument(
        "--heldout", nargs="+", default=[str(SHARED / "corpus" / "val.txt"), str(SHARED / "docs-cls" / "val.jsonl")],
        help="held-out texts to score on (.txt, or .jsonl with a `text` field)",
    )  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=max_windows, help="windows per held-out text")
    parser.add_argument(
        "--skip-windows", type=int, default=0,
        help="held-out windows to pass over first (score on windows no earlier run has seen)",
    )  # fmt: skip


def prepare_data(args, tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The held-out windows by text name, and the calibration windows (evenly spread, as the library picks)."""
    skip = getattr(args, "skip_windows", 0)  # scripts with options of their own have none
    heldout = {
        Path(path).name: tokenize_windows(tokenizer, heldout_texts(path), args.seq_len)[skip:][: args.max_windows]
        for path in args.heldout
    }
    windows = tokenize_windows(tokenizer, load_texts(args.calib), args.seq_len)
    return heldout, torch.cat(calibration_batches(windows, args.num_samples, args.num_samples))


def score(model, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: perplexity(model, windows) for name, windows in heldout.items()}


def quality_setup(args, title: str):
    """What every quality benchmark starts with: transformers quiet, the held-out and calibration windows,
    the float32 model and its perplexity on each text, and the header line naming the model, the CPU and the data.
    Returns (held-out windows by text, calibration windows, the float32 model, its perplexities, header)."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    heldout, calibration = prepare_data(args, AutoTokenizer.from_pretrained(args.model))
    reference_model = load(args.model)
    reference = score(reference_model, heldout)
    header = (
        f"# {title} on {Path(args.model).name}\n\n{hardware_description()}; calibration {len(calibration)} x "
        f"{args.seq_len} tokens of {Path(args.calib).name}; held-out: "
        + ", ".join(f"{len(w)} windows of {n}" for n, w in heldout.items())
        + (f", each after its first {args.skip_windows}" if getattr(args, "skip_windows", 0) else "")
    )
    return heldout, calibration, reference_model, reference, header


def mean_of(results: list[dict]) -> dict:
    """The mean over calibration draws of each figure (perplexity per text), the single draws kept."""
    texts = results[0]["perplexity"]
    mean = {t: statistics.mean(r["perplexity"][t] for r in results) for t in texts}
    row = {"perplexity": mean, "seconds": statistics.mean(r["seconds"] for r in results)}
    row |= {k: results[0][k] for k in ("size_bytes", "bits_per_weight")}
    return row | {"draws": [r["perplexity"] for r in results]}


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:field=value,field=value' -> (name, GPTQConfig overrides); a value that is not JSON is a string."""
    name, _, assignments = text.partition(":")
    overrides = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            value = value.lower()
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def gptq_config(args, calibration, bits, group_size, overrides=None):
    fields = {
        "bits": bits, "group_size": group_size, "dataset": calibration, "num_samples": len(calibration),
        "act_order": args.act_order, "static_groups": args.act_order,
    }  # fmt: skip
    fields.update(overrides or {})
    return hfcompress.GPTQConfig(**fields)


def run_ours(args, config, heldout, out_dir):
    model = load(args.model)
    start = time.perf_counter()
    hfcompress.quantize(model, config)
    seconds = time.perf_counter() - start
    row = {"perplexity": score(model, heldout), "seconds": seconds, "bits_per_weight": bits_per_weight(model)}
    cast_unquantized(model, torch.float16)  # what the CLI saves: full-precision parts in the checkpoint dtype
    model.save_pretrained(out_dir)
    row["size_bytes"] = weights_size_bytes(out_dir)
    return row


def run_peer(args, ids_file, bits, group_size, weights_file=None, extra=()) -> float:
    command = [
        args.llmcompressor_python, str(HERE / "llmcompressor_gptq.py"), args.model, "--ids", str(ids_file),
        "--bits", str(bits), "--group-size", str(group_size), *extra,
    ]  # fmt: skip
    if getattr(args, "act_order", False):
        command.append("--act-order")
    if weights_file:
        command += ["--save-weights", str(weights_file)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{PEER} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def score_peer(args, weights_file, heldout) -> dict:
    model = load(args.model)
    weights = load_file(weights_file)
    missing = [name for name in weights if name not in model.state_dict()]
    if missing:
        raise RuntimeError(f"{PEER} returned weights the model does not have: {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    return {"perplexity": score(model, heldout), "size_bytes": None, "bits_per_weight": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument(
        "--heldout",
        nargs="+",
        default=[str(SHARED / "corpus" / "val.txt"), str(SHARED / "docs-cls" / "val.jsonl")],
        help="held-out texts to score on (.txt, or .jsonl with a `text` field)",
    )
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=100, help="windows per held-out text")
    parser.add_argument(
        "--act-order", action=argparse.BooleanOptionalAction, default=True,
        help="GPTQ with static act-order, both sides (default: on, both libraries' default)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
        help="another GPTQ row per setting with GPTQConfig fields changed, e.g. 2pass:true_sequential=false",
    )  # fmt: skip
    parser.add_argument(
        "--draws", type=int, default=1,
        help="calibration draws per setting: the evenly spread windows, then random ones; rows give the mean",
    )  # fmt: skip
    parser.add_argument(
        "--reorder", action="store_true",
        help="draws after the first are the first draw's windows in another order: their spread is what the order "
        "of the samples alone does (through float32 sums) to both GPTQs; llm-compressor's `oneshot` shuffles "
        "them itself with an unseeded RandomSampler, so its runs differ on identical windows anyway",
    )  # fmt: skip
    parser.add_argument(
        "--skip-default", action="store_true",
        help="no row for the library's defaults, only the --variant rows (to add variants to an earlier run: the "
        "windows and orders depend only on --calib, --num-samples, --seq-len and --draws)",
    )  # fmt: skip
    parser.add_argument("--timing-runs", type=int, default=3, help="runs of the 4-bit g128 speed comparison")
    parser.add_argument("--llmcompressor-python", help="python of a virtual environment with llmcompressor")
    parser.add_argument("--json-out", help="also write the results here")
    parser.add_argument(
        "--settings", default=None, help="only these bits:group settings, e.g. '4:128,3:-1' (default: the five)"
    )
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    settings = SETTINGS
    if args.settings:
        settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    if args.skip_default and not args.variant:
        parser.error("--skip-default needs at least one --variant: there would be no GPTQ row")
    variants = ([] if args.skip_default else [("gptq", {})]) + [parse_variant(v) for v in args.variant]
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = {
        Path(path).name: tokenize_windows(tokenizer, heldout_texts(path), args.seq_len)[: args.max_windows]
        for path in args.heldout
    }
    # the calibration windows, chosen once for both libraries: the library's own choice (evenly spread), then
    # --draws - 1 random choices, so a difference can be told from the spread GPTQ has between draws
    windows = tokenize_windows(tokenizer, load_texts(args.calib), args.seq_len)
    draws = [torch.cat(calibration_batches(windows, args.num_samples, args.num_samples))]
    for seed in range(1, args.draws):
        generator = torch.Generator().manual_seed(seed)
        if args.reorder:
            draws.append(draws[0][torch.randperm(len(draws[0]), generator=generator)])
            continue
        chosen = torch.randperm(len(windows), generator=generator)[: args.num_samples]
        draws.append(windows[chosen.sort().values])

    rows = []
    fp32 = load(args.model)
    rows.append(
        {"method": "fp32", "bits": 32, "group_size": None, "perplexity": score(fp32, heldout), "seconds": 0.0,
         "size_bytes": weights_size_bytes(args.model), "bits_per_weight": bits_per_weight(fp32)}
    )  # fmt: skip
    del fp32
    timing = {"gptq": [], PEER: []}
    with tempfile.TemporaryDirectory() as tmp:
        ids_files = []
        for draw, calibration in enumerate(draws):
            ids_files.append(Path(tmp) / f"calibration-{draw}.safetensors")
            save_file({"input_ids": calibration.contiguous()}, ids_files[-1])
        for bits, group_size in settings:
            config = hfcompress.RTNConfig(bits=bits, group_size=group_size)
            row = {"method": "rtn", "bits": bits, "group_size": group_size}
            rows.append(row | run_ours(args, config, heldout, Path(tmp) / f"rtn-{bits}-{group_size}"))
            runs: dict[str, list[dict]] = {}
            for draw, calibration in enumerate(draws):
                for name, overrides in variants:
                    config = gptq_config(args, calibration, bits, group_size, overrides)
                    out = Path(tmp) / f"{name}-{bits}-{group_size}-{draw}"
                    runs.setdefault(name, []).append(run_ours(args, config, heldout, out))
                    print(json.dumps({"method": name, "bits": bits, "group_size": group_size, "draw": draw}
                                     | runs[name][-1]), file=sys.stderr, flush=True)  # fmt: skip
                if args.llmcompressor_python:
                    weights_file = Path(tmp) / f"peer-{bits}-{group_size}-{draw}.safetensors"
                    seconds = run_peer(args, ids_files[draw], bits, group_size, weights_file)
                    runs.setdefault(PEER, []).append({"seconds": seconds} | score_peer(args, weights_file, heldout))
                    print(json.dumps({"method": PEER, "bits": bits, "group_size": group_size, "draw": draw}
                                     | runs[PEER][-1]), file=sys.stderr, flush=True)  # fmt: skip
            for name, results in runs.items():
                rows.append({"method": name, "bits": bits, "group_size": group_size} | mean_of(results))
                if (bits, group_size) == (4, 128):
                    timing.setdefault(name, []).extend(r["seconds"] for r in results)

        # more 4-bit g128 runs for the speed comparison, alternating so both see the same machine state
        for _ in range(args.timing_runs - len(timing[PEER]) if args.llmcompressor_python and timing["gptq"] else 0):
            model = load(args.model)
            start = time.perf_counter()
            hfcompress.quantize(model, gptq_config(args, draws[0], 4, 128))
            timing["gptq"].append(time.perf_counter() - start)
            del model
            timing[PEER].append(run_peer(args, ids_files[0], 4, 128))
            print(json.dumps(timing), file=sys.stderr, flush=True)

    report(args, rows, heldout, settings, variants, timing)


def report(args, rows, heldout, settings, variants, timing):
    texts = list(heldout)
    orders = " (one set of windows in different orders)" if args.reorder else ""
    print(f"\nmodel {args.model}; calibration {args.num_samples} x {args.seq_len} tokens of {args.calib}, "
          f"{args.draws} draw(s){orders}, the same token ids for both libraries (GPTQ rows: the mean over draws); "
          f"perplexity on the first "
          f"{', '.join(f'{len(w)} windows of {n}' for n, w in heldout.items())}; act-order "
          f"{'static' if args.act_order else 'off'}; torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print(
        f"| method | bits | group | {' | '.join(f'ppl {t} | vs fp32' for t in texts)} | quantize s | MB | bits/weight |"
    )
    print("|---|---|---|" + "---|---|" * len(texts) + "---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        group = "-" if r["group_size"] is None else ("channel" if r["group_size"] == -1 else r["group_size"])
        cells = " | ".join(
            f"{r['perplexity'][t]:.3f} | {100 * (r['perplexity'][t] / base[t] - 1):+.2f}%" for t in texts
        )
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f}"
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        print(f"| {r['method']} | {r['bits']} | {group} | {cells} | {r['seconds']:.1f} | {size} | {bpw} |")

    print("\nchecks:")
    by = {(r["method"], r["bits"], r["group_size"]): r for r in rows}
    for name, _ in variants:
        for bits, group_size in settings:
            ours, rtn = by[(name, bits, group_size)], by[("rtn", bits, group_size)]
            for t in texts:
                print(f"- {name} beats RTN at w{bits} g{group_size} on {t}: "
                      f"{ours['perplexity'][t] < rtn['perplexity'][t]} ({ours['perplexity'][t]:.3f} vs "
                      f"{rtn['perplexity'][t]:.3f})")  # fmt: skip
                peer = by.get((PEER, bits, group_size))
                if peer:
                    ratio = ours["perplexity"][t] / peer["perplexity"][t]
                    per_draw = ""
                    if len(ours.get("draws", [])) > 1:
                        wins = sum(o[t] <= p[t] * (1 + TIE) for o, p in zip(ours["draws"], peer["draws"], strict=True))
                        per_draw = f"; at most in {wins} of {len(ours['draws'])} draws"
                    print(f"- {name} at most {PEER} (a tie within {100 * TIE:.1f}% counts) at w{bits} "
                          f"g{group_size} on {t}: {ratio <= 1 + TIE} ({ours['perplexity'][t]:.3f} vs "
                          f"{peer['perplexity'][t]:.3f}, {100 * (ratio - 1):+.2f}%{per_draw})")  # fmt: skip
    if timing[PEER]:
        theirs = statistics.median(timing[PEER])
        for name, seconds in timing.items():
            if name == PEER or not seconds:
                continue
            ours = statistics.median(seconds)
            print(f"- {name} w4 g128 quantization time vs {PEER} oneshot (medians of {len(seconds)} and "
                  f"{len(timing[PEER])}): {ours:.1f} s vs {theirs:.1f} s = {ours / theirs:.2f}x, at most 0.5x: "
                  f"{ours <= 0.5 * theirs}")  # fmt: skip
        print(f"  runs (s): {json.dumps({k: [round(x, 1) for x in v] for k, v in timing.items()})}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()
