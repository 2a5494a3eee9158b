"""Parsers of `hfcompress recipe` and `hfcompress search` (the handlers are in recipe.py and search.py)."""

from __future__ import annotations

import argparse

from .common import HANDLER, add_common, add_load_save_options

__all__ = ["add_recipe", "add_search"]


def add_recipe(subparsers) -> None:
    recipe = subparsers.add_parser(
        "recipe",
        help="Run compression steps from a YAML recipe (prune, factorize, quantize, distill, merge_lora).",
        description="Run the steps of RECIPE in order on MODEL. Each step is `technique: {fields}` with the fields "
        "of its Python config class (and its step options: format, storage); `dataset:` at the top is "
        "the default data of every step. The whole recipe is checked before any step starts. Each step writes "
        "OUTPUT/steps/NN-name/ with its record; OUTPUT gets the last model, with the whole chain in its record "
        "and card, and recipe.yaml. Example:\n\n"
        "  steps:\n"
        "    - prune: {method: sparsegpt, sparsity: 0.3}\n"
        "    - factorize: {param_ratio: 0.85, method: whiten}\n"
        "    - quantize: {method: gptq, bits: 4, group_size: 128}\n"
        "  dataset: calib.txt\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipe.add_argument("recipe", metavar="RECIPE", help="The recipe YAML file.")
    recipe.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    recipe.add_argument(
        "output", metavar="OUTPUT", help="Folder to write (must not exist or be empty, unless --resume)."
    )
    recipe.add_argument(
        "--resume",
        action="store_true",
        help="Continue a recipe in OUTPUT: completed steps whose settings (and those of every step before) are "
        "unchanged are reused; the first changed step and all after it run again.",
    )
    add_load_save_options(recipe, "before the first step")
    recipe.add_argument(
        "--offload", default="auto", choices=["auto", "none", "disk"],
        help="disk: every step streams its model from the previous step's safetensors shards one block at a time "
        "(never whole; a step that cannot, like distill, merge_lora or bnb, is refused before any step starts), and a "
        "killed run keeps its finished steps and blocks beside OUTPUT for --resume. auto (default): a step streams "
        "when its model would not fit in --max-memory, saying so; none: every step loads its model whole.",
    )  # fmt: skip
    recipe.add_argument(
        "--max-memory", default=None, metavar="SIZE",
        help="Memory a step may hold its model in, like 16GB, for --offload auto (default: the memory available "
        "when the step starts).",
    )  # fmt: skip
    add_common(recipe)
    recipe.set_defaults(**{HANDLER: "hfcompress.commands.recipe:run_recipe_command"})


def add_search(subparsers) -> None:
    search = subparsers.add_parser(
        "search",
        help="Find the best compression of MODEL within a size/bits/parameter budget.",
        description="Estimate how much each layer's compression moves the model's predictions (GPTQ: its output "
        "error at each width, weighted by the Fisher information of its outputs, from one walk over the blocks and one "
        "backward pass), allocate settings per layer under --budget with a knapsack (mixed GPTQ bits per layer; "
        "factorization ranks per layer), build and "
        "evaluate those candidates next to uniform ones, and write the best one that meets the budget to OUTPUT "
        "with its recipe.yaml; OUTPUT/search/ holds pareto.md, pareto.png, sensitivity.md/.png, results.json and "
        "the cache that --resume continues from. With --offload disk (GPTQ only) the model streams from its shards "
        "one block at a time, the knapsack's widths are written without candidates to compare, and the written model "
        "and the original are evaluated streamed. Budgets: bits=B (stored bits per weight of the compressed linear "
        "layers, from the size on disk), size=F (fraction of the weights' bytes on disk), params=F (fraction of "
        "the parameters, pruned zeros not counted).",
    )
    search.add_argument("model", metavar="MODEL", help="Local model folder.")
    search.add_argument(
        "output", metavar="OUTPUT", help="Folder to write (must not exist or be empty, unless --resume)."
    )
    search.add_argument("--budget", required=True, help="bits=3.5, size=0.3 or params=0.7.")
    search.add_argument(
        "--metric", choices=("perplexity",), default="perplexity", help="What to minimize (default: perplexity)."
    )
    search.add_argument(
        "--dataset", required=True, help="Calibration text (GPTQ, sensitivities, whitening, SparseGPT)."
    )
    search.add_argument("--eval-dataset", required=True, help="Text the candidates are evaluated on.")
    search.add_argument(
        "--techniques", default=None,
        help="Comma-separated: gptq, lowrank, prune (default: all three; gptq with --format compressed-tensors).",
    )  # fmt: skip
    search.add_argument("--bits-options", default="2,3,4", help="GPTQ bit widths per layer (default: 2,3,4).")
    search.add_argument("--group-size", type=int, default=128, help="GPTQ group size (default: 128).")
    search.add_argument(
        "--lowrank-ratios", default="0.7,0.85", help="Extra factorization points, parameter ratios (default: 0.7,0.85)."
    )
    search.add_argument("--prune-sparsities", default="0.3,0.5", help="Extra SparseGPT points (default: 0.3,0.5).")
    search.add_argument("--num-samples", type=int, default=32, help="Calibration windows per build (default: 32).")
    search.add_argument(
        "--seq-len", type=int, default=None,
        help="Tokens per calibration window (default: 512, or the model's positions if it has fewer).",
    )  # fmt: skip
    search.add_argument(
        "--sensitivity-samples", type=int, default=8, help="Windows per sensitivity measurement (default: 8)."
    )
    search.add_argument(
        "--eval-seq-len", type=int, default=None,
        help="Tokens per evaluation window (default: 512, or the model's positions if it has fewer).",
    )  # fmt: skip
    search.add_argument(
        "--eval-max-windows", type=int, default=16, help="Evaluation windows per candidate (default: 16)."
    )
    search.add_argument(
        "--neighbour-bits", type=float, default=0.0,
        help="Also build mixed GPTQ points this many bits per weight either side of the budget (default: 0, none).",
    )  # fmt: skip
    search.add_argument(
        "--format", default="hfcompress", choices=["hfcompress", "compressed-tensors"],
        help="Format of the chosen model in OUTPUT. compressed-tensors (plain transformers, vLLM): symmetric GPTQ "
        "grids only, and the linears serving engines fuse (q/k/v, gate/up) get one width (default: hfcompress).",
    )  # fmt: skip
    search.add_argument(
        "--hessian-dtype", default="float32", choices=["float32", "float64"],
        help="What GPTQ, whitening and SparseGPT sum each layer's input Hessian in. float64: the same candidates "
        "for any order or batching of the calibration windows, twice each Hessian's memory (default: float32).",
    )  # fmt: skip
    search.add_argument(
        "--offload", default="auto", choices=["auto", "none", "disk"],
        help="disk: never hold MODEL whole; stream its safetensors shards one block at a time to measure the "
        "sensitivities, to run GPTQ at the widths the knapsack picks (--techniques gptq) and to "
        "measure the perplexity of that model (in hfcompress's format, rewritten afterwards for --format "
        "compressed-tensors) and of the original. auto (default): disk when MODEL in "
        "float32 would not fit in --max-memory, saying so; none: load it whole.",
    )  # fmt: skip
    search.add_argument(
        "--max-memory", default=None, metavar="SIZE",
        help="Memory the search may use, like 16GB, for --offload auto (default: the memory available now).",
    )  # fmt: skip
    search.add_argument(
        "--resume", action="store_true",
        help="Continue from OUTPUT/search/cache.json (and, with --offload disk, the streamed GPTQ run from its last "
        "finished block).",
    )  # fmt: skip
    search.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty.")
    add_common(search)
    search.set_defaults(**{HANDLER: "hfcompress.commands.search:run_search"})
