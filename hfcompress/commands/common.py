"""Parser pieces every command shares."""

from __future__ import annotations

import argparse

__all__ = ["HANDLER", "add_common", "add_load_save_options"]

# the parsed namespace names its handler as "module:function", imported when the command runs
HANDLER = "_hfcompress_handler"


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars or info logs.")


def add_load_save_options(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        default="auto",
        help=f"dtype to hold MODEL's weights in {when} (default auto: the checkpoint's); the maths runs in float32.",
    )
