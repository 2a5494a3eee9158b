"""`hfcompress` command line. Also mounted as `optimum-cli hfcompress` (see optimum/commands/register/).

This module only builds parsers; the heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_commands", "build_parser", "main"]

HANDLER = "_hfcompress_handler"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars or info logs.")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("hfcompress", "compressed-tensors"),
        default="hfcompress",
        help="Checkpoint format. hfcompress: loads with from_pretrained after `import hfcompress`. "
        "compressed-tensors: loads in plain transformers with the compressed-tensors package (symmetric grids; "
        "act-order only with --static-groups). Default: hfcompress.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        default="float32",
        help="dtype to load MODEL in before quantizing (default: float32).",
    )


def _add_quantize(subparsers) -> None:
    from ..quantization.config import GPTQConfig, RTNConfig
    from .arguments import add_config_arguments
    from .recording import add_record_options

    quantize = subparsers.add_parser("quantize", help="Quantize a model's linear layers and save it.")
    methods = quantize.add_subparsers(dest="method", metavar="{gptq,rtn,bnb,kmeans,vq}")
    methods.required = True
    grid = ["bits", "group_size", "sym", "clip_search", "scale_dtype", "modules_to_not_convert"]

    gptq = methods.add_parser("gptq", help="GPTQ with calibration data.", description=GPTQConfig.__doc__)
    gptq.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    gptq.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    add_config_arguments(gptq, GPTQConfig, grid + ["act_order", "static_groups", "damp_percent", "block_size", "true_sequential"])
    gptq.add_argument(
        "--dataset", required=True, help="Calibration data: a text file, a `datasets` folder, or a Hub dataset name."
    )
    add_config_arguments(gptq, GPTQConfig, ["num_samples", "seq_len", "batch_size"])
    _add_output_options(gptq)
    add_record_options(gptq)
    _add_common(gptq)
    gptq.set_defaults(**{HANDLER: "hfcompress.commands.quantize:run_gptq"})

    rtn = methods.add_parser("rtn", help="Round-to-nearest, no data.", description=RTNConfig.__doc__)
    rtn.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    rtn.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    add_config_arguments(rtn, RTNConfig, grid)
    _add_output_options(rtn)
    add_record_options(rtn)
    _add_common(rtn)
    rtn.set_defaults(**{HANDLER: "hfcompress.commands.quantize:run_rtn"})

    from ..quantization.bnb import BnbConfig

    bnb = methods.add_parser(
        "bnb",
        help="bitsandbytes 4-bit (NF4/FP4) or 8-bit; loads with plain transformers.",
        description=BnbConfig.__doc__ + " The output loads with plain `from_pretrained` (bitsandbytes installed).",
    )
    bnb.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    bnb.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    bnb.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4 (NF4/FP4) or 8 (LLM.int8) (default: 4).")
    bnb.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default: nf4).")
    bnb.add_argument("--double-quant", action="store_true", help="4-bit: quantize the block scales too.")
    bnb.add_argument(
        "--compute-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="4-bit: dtype of the matmuls (default: float32).",
    )  # fmt: skip
    bnb.add_argument("--skip-modules", default=None, help="Comma-separated modules left unquantized (default: lm_head).")
    _add_writer_options(bnb, "before quantizing", "hfcompress.commands.quantize:run_bnb")

    from ..quantization.codebook_config import KMeansConfig, VQConfig

    for name, config_cls, fields, summary in (
        ("kmeans", KMeansConfig, ["bits"], "Non-uniform levels per channel by weighted k-means."),
        ("vq", VQConfig, ["bits", "dim", "groups"], "Vector quantization of runs of weights."),
    ):
        parser = methods.add_parser(name, help=summary, description=config_cls.__doc__)
        parser.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
        parser.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
        add_config_arguments(parser, config_cls, fields)
        parser.add_argument(
            "--dataset", default=None,
            help="Calibration data (optional): a text file, a `datasets` folder or a Hub dataset name.",
        )  # fmt: skip
        add_config_arguments(parser, config_cls, ["num_samples", "seq_len", "batch_size", "iters", "modules_to_not_convert"])
        _add_writer_options(parser, "before quantizing", "hfcompress.commands.quantize:run_codebook")


def _add_evaluate(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="Perplexity, weight size on disk, bits per weight and latency of a model.",
        description="Perplexity over non-overlapping windows of a text, size of the weight files, stored bits per "
        "weight of the quantized layers, and median forward latency of one window.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    evaluate.add_argument("--dataset", required=True, help="A text file, a `datasets` folder, or a Hub dataset name.")
    evaluate.add_argument("--seq-len", type=int, default=512, help="Tokens per window (default: 512).")
    evaluate.add_argument("--max-windows", type=int, default=None, help="Score only the first N windows.")
    evaluate.add_argument("--batch-size", type=int, default=4, help="Windows per forward pass (default: 4).")
    evaluate.add_argument("--latency-runs", type=int, default=5, help="Timed runs for latency; 0 skips it (default: 5).")
    evaluate.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16", "auto"), default="float32", help="dtype to load MODEL in."
    )
    evaluate.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    _add_common(evaluate)
    evaluate.set_defaults(**{HANDLER: "hfcompress.commands.evaluate:run_evaluate"})


def _add_load_save_options(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        default="float32",
        help=f"dtype to load MODEL in {when} (default: float32).",
    )


def _add_writer_options(parser: argparse.ArgumentParser, when: str, handler: str) -> None:
    """The options every model-writing command ends with, and its handler."""
    from .recording import add_record_options

    _add_load_save_options(parser, when)
    add_record_options(parser)
    _add_common(parser)
    parser.set_defaults(**{HANDLER: handler})


def _add_factorize(subparsers) -> None:
    from ..lowrank.config import LowRankConfig
    from .arguments import add_config_arguments

    fields = LowRankConfig.__dataclass_fields__
    factorize = subparsers.add_parser(
        "factorize", help="Replace linear layers by low-rank factor pairs and save.", description=LowRankConfig.__doc__
    )
    factorize.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    factorize.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    target = factorize.add_mutually_exclusive_group(required=True)
    target.add_argument("--param-ratio", type=float, help=fields["param_ratio"].metadata["help"])
    target.add_argument("--rank", type=int, help=fields["rank"].metadata["help"])
    target.add_argument("--energy", type=float, help=fields["energy"].metadata["help"])
    add_config_arguments(
        factorize, LowRankConfig, ["method", "allocation", "sequential", "alpha", "damp_percent", "modules_to_not_convert"]
    )
    factorize.add_argument(
        "--dataset",
        default=None,
        help="Calibration data (needed by asvd, whiten and sensitivity allocation): a text file, a `datasets` "
        "folder, or a Hub dataset name.",
    )
    add_config_arguments(
        factorize, LowRankConfig, ["num_samples", "seq_len", "batch_size", "sensitivity_samples", "sensitivity_cache"]
    )
    _add_writer_options(factorize, "before factorizing", "hfcompress.commands.lowrank:run_factorize")

    merge = subparsers.add_parser(
        "merge-lora",
        help="Fold a peft LoRA adapter into a (factorized) model and save it.",
        description="Fold a peft LoRA adapter into MODEL without forming dense matrices for factorized layers: "
        "an update on a whole factorized layer is refactorized exactly (QR + small SVD) and truncated to --rank; "
        "an update on a factor (`.up`/`.down`) or on a dense layer is added to that weight.",
    )
    merge.add_argument("model", metavar="MODEL", help="Local model folder or Hub id (factorized or not).")
    merge.add_argument("adapter", metavar="ADAPTER", help="peft adapter folder or Hub id.")
    merge.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    merge.add_argument(
        "--rank",
        default="original",
        help="Rank of factorized layers after the merge: 'original' (default: keep each layer's rank), 'exact' "
        "(rank + adapter rank: the merged model computes what the adapted one did), or a number.",
    )
    _add_writer_options(merge, "before merging", "hfcompress.commands.lowrank:run_merge_lora")


def _add_prune(subparsers) -> None:
    from ..pruning.oneshot import OneShotPruningConfig
    from .arguments import add_config_arguments

    prune = subparsers.add_parser("prune", help="Prune a trained model (one-shot or structured) and save it.")
    kinds = prune.add_subparsers(dest="kind", metavar="{oneshot,structured}")
    kinds.required = True

    oneshot = kinds.add_parser(
        "oneshot", help="Zero weights by magnitude, Wanda or SparseGPT, no training.", description=OneShotPruningConfig.__doc__
    )
    oneshot.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    oneshot.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    add_config_arguments(oneshot, OneShotPruningConfig, ["method", "sparsity", "pattern"])
    oneshot.add_argument(
        "--dataset", default=None, help="Calibration data (wanda, sparsegpt): a text file, a `datasets` folder or a Hub dataset."
    )
    add_config_arguments(
        oneshot, OneShotPruningConfig, ["num_samples", "seq_len", "batch_size", "damp_percent", "blocksize", "modules_to_not_convert"]
    )
    oneshot.add_argument(
        "--storage",
        choices=("bitmask", "dense"),
        default="bitmask",
        help="bitmask: sparse layers saved as a bitmask plus their non-zeros (a smaller checkpoint; loads after "
        "`import hfcompress`). dense: ordinary weights with zeros (loads anywhere). Default: bitmask.",
    )
    _add_writer_options(oneshot, "before pruning", "hfcompress.commands.prune:run_oneshot")

    structured = kinds.add_parser(
        "structured",
        help="Remove attention heads and FFN neurons for real (smaller layers, config updated).",
        description="Remove the same fraction of attention heads (key/value groups under grouped-query attention) "
        "and of FFN neurons from every block, the least important first: first-order Taylor importance on --dataset "
        "(language-modelling loss), or weight norms without data. Llama-style models then load with plain "
        "transformers; BERT-style models with removed heads after `import hfcompress`.",
    )
    structured.add_argument("model", metavar="MODEL", help="Local model folder or Hub id.")
    structured.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    structured.add_argument("--heads", type=float, default=0.0, help="Fraction of attention heads to remove (default: 0).")
    structured.add_argument("--ffn", type=float, default=0.0, help="Fraction of FFN neurons to remove (default: 0).")
    structured.add_argument(
        "--task",
        choices=("causal-lm", "sequence-classification", "base"),
        default="causal-lm",
        help="Which head to load MODEL with (default: causal-lm).",
    )
    structured.add_argument("--dataset", default=None, help="Texts for Taylor importance (causal-lm only).")
    structured.add_argument("--num-samples", type=int, default=32, help="Windows for importance (default: 32).")
    structured.add_argument("--seq-len", type=int, default=512, help="Tokens per window (default: 512).")
    structured.add_argument("--batch-size", type=int, default=4, help="Windows per backward pass (default: 4).")
    _add_writer_options(structured, "before pruning", "hfcompress.commands.prune:run_structured")


def _add_distill(subparsers) -> None:
    from ..distillation.config import DistillationConfig
    from .arguments import add_config_arguments

    distill = subparsers.add_parser(
        "distill",
        help="Train a smaller student on a teacher's outputs and save it.",
        description="Distil --teacher into a student (a copy of some of its blocks with --student-layers, or "
        "--student MODEL) with DistillationTrainer, on --dataset: a text file for causal-lm, JSON lines or a "
        "datasets folder with 'text' and 'label' for sequence-classification. OUTPUT is a plain transformers model. "
        + (DistillationConfig.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill.add_argument("output", metavar="OUTPUT", help="Folder to write (must not exist or be empty).")
    distill.add_argument("--teacher", required=True, help="Teacher model folder or Hub id.")
    students = distill.add_mutually_exclusive_group(required=True)
    students.add_argument("--student-layers", type=int, help="Build the student from this many teacher blocks.")
    students.add_argument("--student", help="A student model folder or Hub id (same tokenizer as the teacher).")
    distill.add_argument(
        "--teacher-bits", type=int, choices=(4, 8), default=None,
        help="Load the teacher with bitsandbytes at 4 or 8 bits to save memory (with --student).",
    )  # fmt: skip
    distill.add_argument(
        "--layer-strategy", choices=("alternate", "first"), default="alternate",
        help="With --student-layers: blocks spread evenly from first to last, or the first ones (default: alternate).",
    )  # fmt: skip
    distill.add_argument("--dataset", required=True, help="Training data (see above).")
    distill.add_argument("--task", choices=("causal-lm", "sequence-classification"), default="causal-lm")
    distill.add_argument("--seq-len", type=int, default=512, help="Tokens per window / max length (default: 512).")
    distill.add_argument("--max-windows", type=int, default=None, help="causal-lm: use only the first N windows.")
    add_config_arguments(distill, DistillationConfig, ["temperature", "alpha_kd"])
    distill.add_argument("--alpha-task", type=float, default=None, help="Weight of the task loss (default: 1 - alpha-kd).")
    distill.add_argument("--hidden-states", default=None, help="Hidden states to match, 'TEACHER:STUDENT,...' e.g. '2:1,5:2'.")
    add_config_arguments(distill, DistillationConfig, ["hidden_loss"])
    distill.add_argument("--max-steps", type=int, default=500, help="Optimizer steps (default: 500).")
    distill.add_argument("--learning-rate", type=float, default=1e-4, help="Peak learning rate (default: 1e-4).")
    distill.add_argument("--batch-size", type=int, default=8, help="Per-device batch size (default: 8).")
    distill.add_argument("--gradient-accumulation-steps", type=int, default=1)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present.")
    distill.add_argument("--checkpoint-dir", default=None, help="Keep Trainer checkpoints here (default: none kept).")
    distill.add_argument("--resume", default=None, help="A checkpoint folder to resume from.")
    _add_writer_options(distill, "(teacher and student)", "hfcompress.commands.distill:run_distill")


def _add_hub(subparsers) -> None:
    card = subparsers.add_parser(
        "card",
        help="(Re)generate OUTPUT/README.md from its compression record.",
        description="Write OUTPUT/README.md (and its plot) from OUTPUT/hfcompress_record.json with the Jinja "
        "template in model_cards/. Text outside the generated markers and your own front-matter keys are kept; "
        "regenerating gives the same file.",
    )
    card.add_argument("output", metavar="OUTPUT", help="A model folder written by hfcompress.")
    card.add_argument("--repo-id", default=None, help="Hub id to show in the loading code (default: a placeholder).")
    card.add_argument("--template", default=None, help="Another Jinja template (default: hfcompress's).")
    _add_common(card)
    card.set_defaults(**{HANDLER: "hfcompress.commands.hub:run_card"})

    push = subparsers.add_parser(
        "push",
        help="Upload a compressed model folder to the Hub in one commit.",
        description="Create REPO_ID if needed and upload OUTPUT as one commit. The token comes from HF_TOKEN or "
        "`hf auth login`, the endpoint from HF_ENDPOINT. A card is generated first if OUTPUT has none.",
    )
    push.add_argument("output", metavar="OUTPUT", help="A model folder written by hfcompress.")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id, e.g. user/model-gptq-4bit.")
    push.add_argument("--private", action="store_true", help="Create the repo private (if it does not exist).")
    push.add_argument("--revision", default=None, help="Branch to commit to (created if missing; default: main).")
    push.add_argument("--commit-message", default=None, help="Commit message.")
    _add_common(push)
    push.set_defaults(**{HANDLER: "hfcompress.commands.hub:run_push"})


COMMANDS = "{quantize,factorize,merge-lora,prune,distill,recipe,search,evaluate,card,push}"


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add hfcompress's subcommands to `parser` (used by `hfcompress` and by `optimum-cli hfcompress`)."""
    from .recipe_parsers import add_recipe, add_search

    subparsers = parser.add_subparsers(dest="command", metavar=COMMANDS)
    subparsers.required = True
    _add_quantize(subparsers)
    _add_factorize(subparsers)
    _add_prune(subparsers)
    _add_distill(subparsers)
    add_recipe(subparsers)
    add_search(subparsers)
    _add_evaluate(subparsers)
    _add_hub(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress Hugging Face models.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    add_commands(parser)
    return parser


def run(args: argparse.Namespace, prog: str = "hfcompress") -> int:
    """Run the handler chosen by the parsed `args`; user errors become one line on stderr and exit code 2."""
    import importlib

    from ..hub.push import HubError

    _configure_logging(getattr(args, "quiet", False))
    module_name, _, function = getattr(args, HANDLER).partition(":")
    handler = getattr(importlib.import_module(module_name), function)
    try:
        return handler(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError, ImportError, TypeError, HubError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _configure_logging(quiet: bool) -> None:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    from ..hub.record import set_invocation

    args = build_parser().parse_args(argv)
    set_invocation(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    finally:
        set_invocation(None)


if __name__ == "__main__":
    sys.exit(main())
