"""`hfcompress` command line. Also mounted as `optimum-cli hfcompress` (see optimum/commands/register/).

The commands of the compression techniques are built from the technique registry: `hfcompress <kind> <name>`
(`quantize gptq`, `prune oneshot`, ...; `factorize`), with flags generated from the technique's config fields
and step options, and one handler that calls `steps.compress_folder`. A technique registered from outside the
package gets its command the same way.

Parsing imports no torch and no transformers (the configs are plain dataclasses, the handlers are named as
"module:function" and imported after the arguments are checked), so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from .. import __version__
from ..core.registry import Technique, always, load_plugins, techniques
from ..distillation.config import DistillationConfig
from ..steps.options import DistillArguments, OutputOptions
from .arguments import add_config_arguments
from .common import HANDLER, add_common
from .export_parsers import add_export
from .recipe_parsers import add_recipe, add_search

__all__ = ["add_commands", "build_parser", "command_names", "main", "run"]

TECHNIQUE = "_hfcompress_technique"

# what each group of techniques does, for `--help`; a group registered from outside gets a plain line
GROUP_HELP = {
    "quantize": "Quantize a model's linear layers and save it.",
    "prune": "Prune a trained model (one-shot or structured) and save it.",
}
MODEL_HELP = "Local model folder or Hub id."
OUTPUT_HELP = "Folder to write (must not exist or be empty)."
# the options every model-writing command ends with
RECORD_OPTIONS = [
    "overwrite", "dtype", "eval_dataset", "eval_seq_len", "eval_max_windows", "eval_tasks", "eval_tasks_dir",
    "eval_limit", "push_to_hub", "private",
]  # fmt: skip


def _add_writer_options(parser: argparse.ArgumentParser, handler: str) -> None:
    """The options every model-writing command ends with, and its handler."""
    add_config_arguments(parser, OutputOptions, RECORD_OPTIONS)
    add_common(parser)
    parser.set_defaults(**{HANDLER: handler})


def _add_technique(parser: argparse.ArgumentParser, technique: Technique) -> None:
    """MODEL OUTPUT, the config's fields, the step options, the writer options."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("output", metavar="OUTPUT", help=OUTPUT_HELP)
    required = ("dataset",) if technique.calibrated is always else ()
    add_config_arguments(parser, technique.config_class, required=required)
    for name, option in technique.step_options.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), choices=option.choices, default=option.default,
            help=f"{option.help} Default: {option.default}.".replace("%", "%%"),
        )  # fmt: skip
    if technique.stream is not None:
        add_config_arguments(parser, OutputOptions, ["offload", "max_memory", "resume"])
    _add_writer_options(parser, "hfcompress.commands.compress:run_compress")
    parser.set_defaults(**{TECHNIQUE: technique.command})


def _add_techniques(subparsers) -> dict[str, argparse._SubParsersAction]:
    """One command per registered technique, grouped by its command words; returns the group subparsers."""
    groups: dict[str, argparse._SubParsersAction] = {}
    for technique in techniques():
        words = technique.command
        parent = subparsers
        if len(words) == 2:
            if words[0] not in groups:
                names = [t.command[1] for t in techniques() if t.command[0] == words[0]]
                group = subparsers.add_parser(
                    words[0], help=GROUP_HELP.get(words[0], f"{words[0]} a model and save it.")
                )
                groups[words[0]] = group.add_subparsers(dest="technique", metavar="{" + ",".join(names) + "}")
                groups[words[0]].required = True
            parent = groups[words[0]]
        parser = parent.add_parser(words[-1], help=technique.summary, description=technique.config_class.__doc__)
        _add_technique(parser, technique)
    return groups


def _add_merge_lora(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge-lora",
        help="Fold a peft LoRA adapter into a (factorized) model and save it.",
        description="Fold a peft LoRA adapter into MODEL without forming dense matrices for factorized layers: "
        "an update on a whole factorized layer is refactorized exactly (QR + small SVD) and truncated to --rank; "
        "an update on a factor (`.up`/`.down`) or on a dense layer is added to that weight.",
    )
    merge.add_argument("model", metavar="MODEL", help="Local model folder or Hub id (factorized or not).")
    merge.add_argument("adapter", metavar="ADAPTER", help="peft adapter folder or Hub id.")
    merge.add_argument("output", metavar="OUTPUT", help=OUTPUT_HELP)
    merge.add_argument(
        "--rank",
        default="original",
        help="Rank of factorized layers after the merge: 'original' (default: keep each layer's rank), 'exact' "
        "(rank + adapter rank: the merged model computes what the adapted one did), or a number.",
    )
    _add_writer_options(merge, "hfcompress.commands.steps:run_merge_lora")


def _add_distill(subparsers) -> None:
    distill = subparsers.add_parser(
        "distill",
        help="Train a smaller student on a teacher's outputs and save it.",
        description="Distil --teacher into a student (a copy of some of its blocks with --student-layers, or "
        "--student MODEL) with DistillationTrainer, on --dataset: a text file for causal-lm, JSON lines or a "
        "datasets folder with 'text' and 'label' for sequence-classification. OUTPUT is a plain transformers model. "
        + (DistillationConfig.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill.add_argument("output", metavar="OUTPUT", help=OUTPUT_HELP)
    distill.add_argument("--teacher", required=True, help="Teacher model folder or Hub id.")
    add_config_arguments(distill, DistillArguments, required=("dataset",))
    _add_writer_options(distill, "hfcompress.commands.steps:run_distill")


def _add_evaluate(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="Perplexity, lm-eval tasks, weight size on disk, bits per weight and latency of a model.",
        description="Perplexity over non-overlapping windows of a text (--dataset) and/or lm-evaluation-harness "
        "tasks (--tasks) on the model as loaded (compressed layers included), size of the weight files, stored bits "
        "per weight of the compressed layers and per parameter of the whole model, and median forward latency of one "
        "window.",
    )
    evaluate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument("--dataset", default=None, help="A text file, a `datasets` folder, or a Hub dataset name.")
    evaluate.add_argument(
        "--tasks", default=None, metavar="TASK[,TASK...]",
        help="lm-evaluation-harness tasks (pip install 'hfcompress[lm-eval]'), e.g. arc_easy,hellaswag.",
    )  # fmt: skip
    evaluate.add_argument(
        "--tasks-dir", default=None, metavar="DIR",
        help="A folder of lm-eval task YAML files of your own (local data: runs offline).",
    )  # fmt: skip
    evaluate.add_argument("--limit", type=int, default=None, help="lm-eval: only the first N documents of each task.")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per document.")
    evaluate.add_argument(
        "--seq-len", type=int, default=None,
        help="Tokens per window (default: 512, or the model's positions if it has fewer; more is refused).",
    )  # fmt: skip
    evaluate.add_argument("--max-windows", type=int, default=None, help="Score only the first N windows.")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="Windows per forward pass (default: 4; fewer where their logits would exceed 1 GiB in float32).",
    )
    evaluate.add_argument(
        "--latency-runs", type=int, default=5, help="Timed runs for latency; 0 skips it (default: 5)."
    )
    evaluate.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        default="auto",
        help="dtype to hold MODEL's weights in (default auto: the checkpoint's); perplexity is computed in float32.",
    )
    evaluate.add_argument(
        "--offload", choices=("auto", "none", "disk"), default="auto",
        help="disk: never hold MODEL whole; its perplexity is computed reading one block at a time from its "
        "safetensors shards (compressed checkpoints included, hfcompress's and compressed-tensors' integer ones), each "
        "block's inputs on disk; no latency and no "
        "--tasks. auto (default): disk when MODEL at --dtype would not fit in --max-memory and no --tasks are "
        "asked for, saying so; none: load it whole.",
    )  # fmt: skip
    add_config_arguments(evaluate, OutputOptions, ["max_memory"])
    evaluate.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    add_common(evaluate)
    evaluate.set_defaults(**{HANDLER: "hfcompress.commands.evaluate:run_evaluate"})


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
    add_common(card)
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
    push.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Seconds each Hub request waits for an answer (default: $HFCOMPRESS_HUB_TIMEOUT or 20).",
    )
    add_common(push)
    push.set_defaults(**{HANDLER: "hfcompress.commands.hub:run_push"})

    verify = subparsers.add_parser(
        "verify",
        help="Check that a model folder loads exactly as its manifest says, with finite weights and outputs.",
        description="Load OUTPUT as from_pretrained would and check it: every compressed layer finds its tensors "
        "with the shapes and dtypes its manifest expects (nothing missing, nothing extra), no tensor is missing or "
        "unexpected, scales and weights are finite, and a forward pass on 8 tokens gives finite outputs. Exit status "
        "0 and one line when it holds, 2 and the first problem otherwise.",
    )
    verify.add_argument("output", metavar="OUTPUT", help="A model folder.")
    add_common(verify)
    verify.set_defaults(**{HANDLER: "hfcompress.commands.hub:run_verify"})


def _add_build_kernels(subparsers) -> None:
    kernels = subparsers.add_parser(
        "build-kernels",
        help="Compile the CPU weight-only kernels now (else the first quantized model loaded does).",
        description="Compile the AVX2 kernels that run quantized layers on CPU, once per environment (cached in "
        "TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, keyed by the source, torch, the compiler and the "
        "Python environment). Exit status 0 when they are ready, 1 when they cannot be built here (quantized "
        "layers then dequantize).",
    )
    add_common(kernels)
    kernels.set_defaults(**{HANDLER: "hfcompress.commands.kernels:run_build_kernels"})


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add hfcompress's subcommands to `parser` (used by `hfcompress` and by `optimum-cli hfcompress`)."""
    load_plugins()  # techniques other packages register get their commands too
    subparsers = parser.add_subparsers(dest="command")
    subparsers.required = True
    _add_techniques(subparsers)
    _add_merge_lora(subparsers)
    _add_distill(subparsers)
    add_recipe(subparsers)
    add_search(subparsers)
    _add_evaluate(subparsers)
    _add_hub(subparsers)
    add_export(subparsers)
    _add_build_kernels(subparsers)
    subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"


def command_names() -> list[str]:
    """The top-level commands, in the order `--help` lists them (for optimum-cli's one-line description)."""
    return list(build_parser()._subparsers._group_actions[0].choices)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    add_commands(parser)
    return parser


# the handlers that run across processes (torchrun, accelerate launch): the technique commands, each technique then
# saying whether it does (`steps.compress.DISTRIBUTED`); every other command would run whole in every process
ACROSS_PROCESSES = ("hfcompress.commands.compress:run_compress",)


def run(args: argparse.Namespace, prog: str = "hfcompress") -> int:
    """Run the handler chosen by the parsed `args`; user errors become one line on stderr and exit code 2."""
    _configure_logging(getattr(args, "quiet", False))
    if _launched() and getattr(args, HANDLER) not in ACROSS_PROCESSES:
        print(
            f"{prog}: error: `{prog} {args.command}` runs in one process, not under a launcher (torchrun or accelerate "
            f"launch started {os.environ['WORLD_SIZE']}): run it without one; the techniques' commands "
            "(quantize, prune oneshot, factorize) run across processes",
            file=sys.stderr,
        )
        return 2
    joined = False  # a process group this command set up, and so ends; one the caller's script set up stays
    if _launched():  # torchrun / accelerate launch: one process of several
        from ..core.distributed import init_from_environment, is_main

        joined = init_from_environment()
        if not is_main():  # rank 0 speaks for all (its warnings are every rank's); the others say only what fails
            _configure_logging(True)
            logging.getLogger().setLevel(logging.ERROR)
    module_name, _, function = getattr(args, HANDLER).partition(":")
    from ..hub.push import HubError

    try:
        handler = getattr(importlib.import_module(module_name), function)
        status = handler(args) or 0
        _wait_for_every_rank()
        return status
    except (ValueError, OSError, ImportError, TypeError, HubError) as e:  # OSError: a full disk, a file unreadable
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the output folder is only replaced when complete: nothing half-written stays
        print(f"{prog}: interrupted; no output was written", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not _peer_left(e):
            raise
        from ..core.distributed import rank  # the process group is up: `_peer_left` says so

        # the process that failed said why; this one only stopped waiting for it (no traceback of its own)
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0] or type(e).__name__  # no source path
        print(f"{prog}: error: rank {rank()} stopped: another process of the run left ({reason})", file=sys.stderr)
        return 1
    finally:
        if joined and (dist := _process_group()) is not None:
            dist.destroy_process_group()


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _process_group():
    """`torch.distributed` where a launcher started this command and its process group is up, else None."""
    if not _launched():
        return None
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def _peer_left(error: RuntimeError) -> bool:
    """Whether `error` is a collective failing because another rank of a launched run went away (gloo's
    transport reports it as a plain RuntimeError, nccl as a `DistError`)."""
    if _process_group() is None:
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def _wait_for_every_rank() -> None:
    """After a command succeeded, wait until every rank has finished its work before the process group is torn
    down: a rank that destroys gloo while another still talks to it can abort at exit ("terminate called without
    an active exception"). Not done after an error, where the other ranks may never arrive."""
    if (dist := _process_group()) is not None:
        dist.barrier()


def _configure_logging(quiet: bool) -> None:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..hub.record import set_invocation

    set_invocation(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    finally:
        set_invocation(None)


if __name__ == "__main__":
    sys.exit(main())
