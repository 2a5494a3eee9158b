"""Handlers of `hfcompress card` and `hfcompress push`."""

from __future__ import annotations

import argparse
import logging

from ..hub.card import generate_card
from ..hub.push import check_model_folder, push_to_hub
from ..steps import verify_folder

__all__ = ["run_card", "run_push", "run_verify"]

logger = logging.getLogger(__name__)


def run_card(args: argparse.Namespace) -> int:
    check_model_folder(args.output)
    path = generate_card(args.output, repo_id=args.repo_id, template=args.template)
    logger.info("wrote %s", path)
    return 0


def run_push(args: argparse.Namespace) -> int:
    url = push_to_hub(
        args.output,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        timeout=args.timeout,
    )
    print(url)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """`hfcompress verify OUTPUT`."""
    result = verify_folder(args.output)
    reader = ""
    if result["reader"] == "hfcompress":
        reader = f"; read by hfcompress, as {result['why']}"
    print(
        f"{result['model']}: OK ({result['class']}, {result['tensors']} tensors, {result['compressed_layers']} "
        f"compressed layers, finite weights{', finite outputs' if result['forward'] else ''}"
        f"{', weight files as recorded' if result['files'] else ''}{reader})"
    )
    return 0
