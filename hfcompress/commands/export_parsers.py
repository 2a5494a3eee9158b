"""The parsers of `hfcompress export <format>` (parsing imports no torch; the handlers are in `commands.export`)."""

from __future__ import annotations

from ..steps.options import OutputOptions
from .arguments import add_config_arguments
from .common import HANDLER, add_common

__all__ = ["add_export"]

GGUF_DESCRIPTION = (
    "Write an hfcompress checkpoint of a Llama model as one GGUF file: layers quantized symmetric 4-bit or 8-bit with "
    "groups of 32 (e.g. `quantize gptq --sym --group-size 32`) go over code for code as llama.cpp's Q4_0 / Q8_0, "
    "full-precision linears as float16; any other grid is refused with the reason. Needs a byte-level BPE "
    "tokenizer.json in MODEL and `pip install 'hfcompress[gguf]'`."
)
COMPRESSED_TENSORS_DESCRIPTION = (
    "Rewrite an hfcompress checkpoint (e.g. one `quantize ... --offload disk` wrote block by block) as "
    "compressed-tensors one shard at a time, never loading the model: the files `--format compressed-tensors` writes "
    "from memory, with MODEL's compression record and card carried on (the export one more step). What that format "
    "cannot hold (asymmetric 3-bit grids, sparse or factorized layers, ...) is refused with the reason before anything is "
    "written. `quantize ... --offload disk --format compressed-tensors` does both in one command. With "
    "--push-to-hub REPO_ID, OUT is then uploaded in one commit, its card's loading code naming REPO_ID."
)


def add_export(subparsers) -> None:
    export = subparsers.add_parser("export", help="Write a compressed model in another runtime's format.")
    formats = export.add_subparsers(dest="format", metavar="{gguf,compressed-tensors}")
    formats.required = True
    _add_format(
        formats, "gguf", "run_export_gguf",
        help="One GGUF file for llama.cpp (Llama models; Q4_0 / Q8_0 layers).", description=GGUF_DESCRIPTION,
        model="Local hfcompress (or plain) model folder.",
        output=("OUT.gguf", "File to write (refused if it exists, unless --overwrite).", "Replace OUT.gguf if it exists."),
    )  # fmt: skip
    _add_format(
        formats, "compressed-tensors", "run_export_compressed_tensors",
        help="The compressed-tensors format vLLM and plain transformers load, shard by shard.",
        description=COMPRESSED_TENSORS_DESCRIPTION, model="Local hfcompress checkpoint folder.",
        output=("OUT", "Folder to write (refused if not empty, unless --overwrite).", "Replace OUT if it is not empty."),
        push=True,
    )  # fmt: skip


def _add_format(
    formats, name: str, handler: str, *, help: str, description: str, model: str, output: tuple, push: bool = False
) -> None:
    """`export NAME MODEL OUTPUT [--overwrite]`, with `push` [--push-to-hub REPO_ID [--private]]; `output` is
    (metavar, help, --overwrite's help)."""
    metavar, output_help, overwrite_help = output
    parser = formats.add_parser(name, help=help, description=description)
    parser.add_argument("model", metavar="MODEL", help=model)
    parser.add_argument("output", metavar=metavar, help=output_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if push:
        add_config_arguments(parser, OutputOptions, ["push_to_hub", "private"])
    add_common(parser)
    parser.set_defaults(**{HANDLER: f"hfcompress.commands.export:{handler}"})
