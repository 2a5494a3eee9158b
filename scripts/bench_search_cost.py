"""What the GPTQ search costs against one GPTQ run, and what it finds (the targets of the search-cost issue).

1. Wall time of `hfcompress search MODEL OUT --budget bits=3.5 --techniques gptq` against one default
   `hfcompress quantize gptq MODEL OUT`, both run as commands here, alternating, median of `--repeats` runs each.
2. The chosen model's perplexity on two held-out texts (the first 40 windows of 512 tokens of
   ../shared/corpus/val.txt, as the search's earlier releases reported, and the paragraphs of
   ../shared/docs-cls/val.jsonl, text no default was chosen on), against the straight line between the search's
   uniform 3-bit and 4-bit points at the same bits per weight; `--compare FOLDER` scores another model beside it
   (e.g. the choice of an earlier release).
3. With `--probes`: the rank correlation (Spearman) between the search's Fisher scores and the measured probes
   they replace (the KL divergence of the model with one layer at a time swapped for its GPTQ weight, run by
   `recipes.sensitivity.layer_sensitivity` on the same windows; about 3.5 s per layer and width here).

    python scripts/bench_search_cost.py                 # ../shared/refmodel, ../shared/corpus, into bench_out/search_cost
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_gptq import heldout_texts  # scripts/ is on the path when a script runs
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import bits_per_weight, perplexity
from hfcompress.hub.record import hardware_description
from hfcompress.quantization.modules import QuantLinear
from hfcompress.recipes.sensitivity import layer_sensitivity
from hfcompress.steps.loading import load_model, load_tokenizer

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.argsort(torch.argsort(torch.tensor(a))).double()
    rb = torch.argsort(torch.argsort(torch.tensor(b))).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--docs", default=str(SHARED / "docs-cls" / "val.jsonl"))
    parser.add_argument("--out", default=str(HERE.parent / "bench_out" / "search_cost"))
    parser.add_argument("--budget", default="bits=3.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="append", default=[], help="another model folder to score beside")
    parser.add_argument("--probes", action="store_true", help="also run the probes and report the rank correlation")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "hfcompress"]
    gptq = [*cli, "quantize", "gptq", args.model, str(out / "gptq"), "--dataset", args.calib, "--overwrite", "-q"]
    search = [*cli, "search", args.model, str(out / "search"), "--budget", args.budget, "--techniques", "gptq",
              "--dataset", args.calib, "--eval-dataset", args.val, "--overwrite", "-q"]  # fmt: skip

    times = {"gptq": [], "search": []}
    for _ in range(args.repeats):
        times["gptq"].append(timed(gptq))
        times["search"].append(timed(search))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n1. wall time, median of {args.repeats} (all runs: {json.dumps({k: [round(x, 1) for x in v] for k, v in times.items()})})"
    )
    print(f"- one default GPTQ run: {median['gptq']:.1f} s; search {args.budget} gptq: {median['search']:.1f} s = "
          f"{median['search'] / median['gptq']:.2f}x (target at most 2x)")  # fmt: skip
    results = json.loads((out / "search" / "search" / "results.json").read_text())
    print(
        f"- the search's own account (last run): {json.dumps({k: round(v, 1) for k, v in results['seconds'].items()})}"
    )

    tokenizer = load_tokenizer(args.model)
    heldout = {
        "val.txt": tokenize_windows(tokenizer, load_texts(args.val), 512)[:40],
        "docs-cls": tokenize_windows(tokenizer, heldout_texts(args.docs), 512),
    }
    folders = {
        "uniform 3-bit": out / "search" / "search" / "candidates" / "gptq-3bit",
        "uniform 4-bit": out / "search" / "search" / "candidates" / "gptq-4bit",
        f"chosen ({results['chosen']})": out / "search",
        **{f"compare {c}": Path(c) for c in args.compare},
    }
    rows = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            rows[name] = {"bits": bits_per_weight(model), **{t: perplexity(model, w) for t, w in heldout.items()}}
    print(f"\n2. perplexity on held-out text ({len(heldout['val.txt'])} and {len(heldout['docs-cls'])} windows of 512)")
    print("| model | bits/weight | " + " | ".join(heldout) + " |\n|---|---|" + "---|" * len(heldout))
    for name, row in rows.items():
        print(f"| {name} | {row['bits']:.3f} | " + " | ".join(f"{row[t]:.3f}" for t in heldout) + " |")
    p3, p4 = rows["uniform 3-bit"], rows["uniform 4-bit"]
    for name, row in rows.items():
        if name.startswith(("chosen", "compare")):
            t = (row["bits"] - p3["bits"]) / (p4["bits"] - p3["bits"])
            for text in heldout:
                line = p3[text] + t * (p4[text] - p3[text])
                print(f"- {name}, {text}: {row[text]:.3f} vs {line:.3f} on the 3/4-bit line: "
                      f"{'below' if row[text] < line else 'NOT below'}")  # fmt: skip

    if args.probes:
        cache = json.loads((out / "search" / "search" / "cache.json").read_text())
        scores = cache["scores"]
        dense = load_model(args.model, "float32")
        windows = tokenize_windows(tokenizer, load_texts(args.calib), 512)[: results["config"]["sensitivity_samples"]]
        variants = {}
        for bits in results["config"]["bits_options"]:
            model = AutoModelForCausalLM.from_pretrained(
                folders["uniform 3-bit"].parent / f"gptq-{bits}bit", dtype=torch.float32
            )
            variants[f"{bits}bit"] = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantLinear)}  # fmt: skip
        start = time.perf_counter()
        probes = layer_sensitivity(dense, windows, variants)
        seconds = time.perf_counter() - start
        print(f"\n3. Fisher scores against {sum(len(v) for v in probes.values())} probes ({seconds:.0f} s of probes)")
        names = sorted(probes)
        for setting in variants:
            a, b = [probes[n][setting] for n in names], [scores[n][setting] for n in names]
            print(f"- {setting}: Spearman {spearman(a, b):.4f}; median score/probe {statistics.median(y / x for x, y in zip(a, b, strict=True)):.3f}")  # fmt: skip
        a = [probes[n][s] for n in names for s in variants]
        b = [scores[n][s] for n in names for s in variants]
        print(f"- every layer and width: Spearman {spearman(a, b):.4f}")
        (out / "probes.json").write_text(json.dumps(probes, indent=1) + "\n")
    shutil.rmtree(out / "gptq", ignore_errors=True)


if __name__ == "__main__":
    main()
