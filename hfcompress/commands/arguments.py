"""Command-line flags generated from config dataclasses, so each option's help is written once."""

from __future__ import annotations

import argparse
import dataclasses
import typing

__all__ = ["add_config_arguments", "config_kwargs"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, names: list[str]) -> None:
    """Add `--<name>` options for the given fields of dataclass `config_cls`, with its defaults and help."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in names:
        field = fields[name]
        help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = field.default
        kind = hints[name]
        if kind is bool and default:
            parser.add_argument(
                "--no-" + name.replace("_", "-"), dest=name, action="store_false", default=True, help=f"Turn off: {help_text}"
            )
            parser.add_argument(_flag(name), dest=name, action="store_true", help="(the default)")
        elif kind is bool:
            parser.add_argument(_flag(name), action="store_true", default=default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(_flag(name), choices=choices, default=default, help=f"{help_text} (default: {default})")
        elif name == "modules_to_not_convert":
            parser.add_argument(_flag(name), nargs="+", default=None, metavar="NAME", help=help_text)
        else:
            cast = {int: int, float: float}.get(kind, str)
            parser.add_argument(_flag(name), type=cast, default=default, help=f"{help_text} (default: {default})")


def config_kwargs(args: argparse.Namespace, config_cls) -> dict:
    """The parsed values that are fields of `config_cls`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
