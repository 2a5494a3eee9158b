"""The trade-off search and a recipe on a real trained model, with the checks of the recipes/search issue.

1. `hfcompress search MODEL OUT --budget bits=3.5 --techniques gptq,lowrank,prune` (calibration calib.txt,
   evaluation val.txt): prints the Pareto table and checks that the mixed-precision GPTQ point it found beats the
   straight line between uniform 3-bit and 4-bit GPTQ at the same bits per weight, and that the plot has at least
   8 points from at least two techniques.
2. The recipe factorize(param_ratio 0.85, whiten) + GPTQ 4-bit g128 against GPTQ 4-bit g128 alone (the search's
   own uniform point, same calibration): size on disk and perplexity.

What the GPTQ search costs against one GPTQ run, and how its scores compare with measured probes:
`scripts/bench_search_cost.py`.

    python scripts/bench_search.py                     # ../shared/refmodel, ../shared/corpus, into bench_out/search
    python scripts/bench_search.py --resume            # continue an interrupted run from its caches
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import perplexity, weights_size_bytes
from hfcompress.hub.record import hardware_description
from hfcompress.recipes import Recipe, run_recipe
from hfcompress.recipes.search import SearchConfig, search
from hfcompress.steps.loading import load_tokenizer

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "refmodel"))
    parser.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    parser.add_argument("--val", default=str(SHARED / "corpus" / "val.txt"))
    parser.add_argument("--out", default=str(HERE.parent / "bench_out" / "search"))
    parser.add_argument("--budget", default="bits=3.5")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--eval-max-windows", type=int, default=40)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    print(f"hardware: {hardware_description()}", flush=True)  # which CPU (and instruction sets) ran this
    torch.set_num_threads(torch.get_num_threads())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    out = Path(args.out)

    config = SearchConfig(
        budget=args.budget, dataset=args.calib, eval_dataset=args.val, techniques=["gptq", "lowrank", "prune"],
        num_samples=args.num_samples, eval_max_windows=args.eval_max_windows,
    )  # fmt: skip
    start = time.perf_counter()
    results = search(args.model, out / "searched", config, resume=args.resume, overwrite=not args.resume, quiet=True)
    search_seconds = time.perf_counter() - start
    print((out / "searched" / "search" / "pareto.md").read_text())
    points = {p["name"]: p for p in results["points"]}

    # check 1: mixed precision against the line between uniform 3 and 4 bits
    p3, p4 = points["gptq-3bit"], points["gptq-4bit"]
    mixed = [
        p
        for p in results["points"]
        if p["name"].startswith("gptq-mixed") and p3["effective_bits"] < p["effective_bits"] < p4["effective_bits"]
    ]
    print("checks:")
    for p in mixed:
        t = (p["effective_bits"] - p3["effective_bits"]) / (p4["effective_bits"] - p3["effective_bits"])
        line = p3["perplexity"] + t * (p4["perplexity"] - p3["perplexity"])
        print(f"- {p['name']} at {p['effective_bits']:.3f} bits: perplexity {p['perplexity']:.3f} vs {line:.3f} on the "
              f"3-bit/4-bit line: {'below' if p['perplexity'] < line else 'NOT below'}")  # fmt: skip
    techniques = {p["technique"] for p in results["points"] if p["technique"] != "none"}
    print(f"- evaluated points: {len(results['points'])} across {len(techniques)} techniques ({', '.join(sorted(techniques))}); "
          f"plot {results['plot']}")  # fmt: skip
    print(f"- chosen within {results['budget']}: {results['chosen']}; search took {search_seconds:.0f} s")

    # check 2: factorize(0.85) + GPTQ 4-bit against GPTQ 4-bit alone
    recipe = Recipe.from_dict({
        "steps": [
            {"factorize": {"param_ratio": 0.85, "method": "whiten", "num_samples": args.num_samples, "seq_len": 512,
                           "sensitivity_cache": str(out / "searched" / "search" / "lowrank-sensitivity.json")}},
            {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "num_samples": args.num_samples, "seq_len": 512}},
        ],
        "dataset": args.calib,
    })  # fmt: skip
    chained = run_recipe(
        recipe, args.model, out / "factorize-gptq", resume=args.resume, overwrite=not args.resume, quiet=True
    )
    windows = tokenize_windows(load_tokenizer(args.model), load_texts(args.val), 512)[: args.eval_max_windows]
    model = AutoModelForCausalLM.from_pretrained(chained, dtype=torch.float32)
    chain_ppl = perplexity(model.eval(), windows)
    chain_size = weights_size_bytes(chained)
    alone = points["gptq-4bit"]
    dense = points["dense"]
    rows = [
        ("dense (fp16)", dense["size_bytes"], dense["perplexity"]),
        ("GPTQ 4-bit g128", alone["size_bytes"], alone["perplexity"]),
        ("factorize(0.85, whiten) + GPTQ 4-bit g128", chain_size, chain_ppl),
    ]
    print("\n| model | weights on disk (MB) | perplexity |\n|---|---|---|")
    for name, size, ppl in rows:
        print(f"| {name} | {size / 1e6:.2f} | {ppl:.3f} |")
    print(f"- recipe smaller than GPTQ 4-bit alone: {chain_size < alone['size_bytes']} ({chain_size / alone['size_bytes']:.3f}x), "
          f"perplexity cost {100 * (chain_ppl / alone['perplexity'] - 1):+.2f}%")  # fmt: skip
    (out / "summary.json").write_text(json.dumps({"search": results, "recipe": {"size_bytes": chain_size, "perplexity": chain_ppl}},
                                                 indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
