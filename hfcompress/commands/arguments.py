"""Command-line flags generated from dataclasses (technique configs, step options), so each option's help is
written once, in the field's metadata."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..core.config import CALIBRATION_FIELDS, warn_deprecated

__all__ = ["add_config_arguments", "cli_fields", "config_kwargs"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(kind):
    """`int | None` -> int; other types as they are."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _is_string_list(kind) -> bool:
    return typing.get_origin(kind) is list and typing.get_args(kind) == (str,)


def _expressible(kind) -> bool:
    kind = _plain(kind)
    return (
        kind in (bool, int, float, str, typing.Any)
        or typing.get_origin(kind) is typing.Literal
        or _is_string_list(kind)
    )


def cli_fields(config_cls) -> list[str]:
    """The fields of `config_cls` a command line can set (scalars, choices, lists of names), calibration fields
    last."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls) if f.init and _expressible(hints[f.name])]
    return [n for n in names if n not in CALIBRATION_FIELDS] + [n for n in names if n in CALIBRATION_FIELDS]


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_cls,
    names: list[str] | None = None,
    required: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """Add `--<name>` options for fields `names` (default: `cli_fields`) of dataclass `config_cls`, with their
    help and defaults (`defaults` overrides some), and the config's deprecated names as hidden aliases."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = defaults or {}
    for name in cli_fields(config_cls) if names is None else names:
        field = fields[name]
        help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = defaults.get(name, field.default if field.default is not dataclasses.MISSING else None)
        kind = _plain(hints[name])
        extra = {"metavar": field.metadata["metavar"]} if "metavar" in field.metadata else {}
        if kind is bool and default:
            parser.add_argument(
                "--no-" + name.replace("_", "-"),
                dest=name,
                action="store_false",
                default=True,
                help=f"Turn off: {help_text}",
            )
            parser.add_argument(_flag(name), dest=name, action="store_true", help="(the default)")
        elif kind is bool and default is None:  # unset: the config decides; either flag overrides it
            parser.add_argument(_flag(name), dest=name, action="store_true", default=None, help=help_text)
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", help="Turn off.")
        elif kind is bool:
            parser.add_argument(_flag(name), action="store_true", default=default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            cast = type(choices[0]) if all(type(c) is type(choices[0]) for c in choices) else str
            parser.add_argument(
                _flag(name), type=cast, choices=choices, default=default, required=name in required,
                help=f"{help_text} (default: {default})",
            )  # fmt: skip
        elif _is_string_list(kind):
            parser.add_argument(_flag(name), nargs="+", default=default, metavar="NAME", help=help_text)
        else:
            cast = {int: int, float: float}.get(kind, str)
            shown = "" if name in required or default is None else f" (default: {default})"
            parser.add_argument(
                _flag(name), type=cast, default=default, required=name in required, help=help_text + shown, **extra
            )
    for old, new in getattr(config_cls, "aliases", {}).items():
        if new in fields and (names is None or new in names):
            parser.add_argument(
                _flag(old), dest=new, action=_DeprecatedFlag, split=_is_string_list(_plain(hints[new])),
                cast={int: int, float: float}.get(_plain(hints[new]), str), new_flag=_flag(new), help=argparse.SUPPRESS,
            )  # fmt: skip


class _DeprecatedFlag(argparse.Action):
    """An old flag that keeps working with a warning; `split`: its value is a comma-separated list."""

    def __init__(self, option_strings, dest, split=False, cast=str, new_flag="", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.split, self.cast, self.new_flag = split, cast, new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated("command line", option_string, self.new_flag)
        if self.split:
            value = [v.strip() for v in values.split(",") if v.strip()]
        else:
            try:
                value = self.cast(values)
            except ValueError:
                parser.error(f"argument {option_string}: invalid {self.cast.__name__} value: {values!r}")
        setattr(namespace, self.dest, value)


def config_kwargs(args: argparse.Namespace, config_cls) -> dict:
    """The parsed values that are fields of `config_cls`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if f.init and hasattr(args, f.name)}
