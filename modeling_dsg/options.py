"""Command-line options derived from the options dataclasses: each option is written once.

A field of an options dataclass (`BuildOptions`, `RMUOptions`, `EvalOptions`, ...) carries its help in
`field(metadata=...)`, written with `option(...)`; `add_options(parser, Options)` turns every field into
an argparse option and `from_args(Options, args)` reads them back. The rules, from the field's type:

- `--name-with-dashes` for `name_with_dashes` (or the `flag` given), parsed into `args.<name>` (or `dest`,
  when two dataclasses of one command share a field name);
- `bool`: a switch; one that defaults to True is turned off with `--no-<name>` (or `flag`); with
  `negatable`, both `--<name>` and `--no-<name>`;
- `int`, `float`, `str` (also `X | None`): a value of that type; `tuple[X, ...]`: one or more values;
- `choices` (an enumeration of the runtime's configuration, never spelled out again) and `metavar`;
- `cli_default`: what the command line defaults to when it differs from the Python default.

Validation lives with the dataclass (its `validate()` method), so the command line and the Python API
refuse the same values with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Union

_NOT_GIVEN = object()


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    choices: typing.Sequence | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    dest: str | None = None,
    cli_default: Any = _NOT_GIVEN,
    cli: bool = True,
    negatable: bool = False,
) -> Any:
    """A dataclass field whose metadata describes its command-line option (see the module docstring)."""
    metadata = {
        "help": help,
        "choices": choices,
        "metavar": metavar,
        "flag": flag,
        "dest": dest,
        "cli": cli,
        "negatable": negatable,
    }
    if cli_default is not _NOT_GIVEN:
        metadata["cli_default"] = cli_default
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap(annotation) -> tuple[type, bool]:
    """(the value type, whether it is a tuple of them) of `X`, `X | None` or `tuple[X, ...] | None`."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def cli_fields(cls, exclude: typing.Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]


def add_options(parser: argparse.ArgumentParser, cls, *, exclude: typing.Collection[str] = ()) -> None:
    """Add one argparse option per field of the options dataclass `cls` (but those in `exclude`)."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls, exclude):
        meta = f.metadata
        dest = meta.get("dest") or f.name
        default = meta.get("cli_default", f.default)
        kind, many = _unwrap(hints[f.name])
        help_text = meta.get("help")
        if help_text and default not in (None, False, True) and "default" not in help_text:
            help_text += " (default: %(default)s)"
        if kind is bool:
            if meta.get("negatable"):
                flag = meta.get("flag") or "--" + f.name.replace("_", "-")
                parser.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            elif default:
                flag = meta.get("flag") or "--no-" + f.name.replace("_", "-")
                parser.add_argument(flag, dest=dest, action="store_false", help=help_text)
            else:
                flag = meta.get("flag") or "--" + f.name.replace("_", "-")
                parser.add_argument(flag, dest=dest, action="store_true", help=help_text)
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": dest, "type": kind, "default": default, "help": help_text}
        if many:
            kwargs["nargs"] = "+"
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar") is not None:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of `cls` from parsed arguments: its command-line fields, and defaults for the rest."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in cli_fields(cls):
        dest = f.metadata.get("dest") or f.name
        if not hasattr(args, dest):
            continue  # an option this command does not offer keeps the dataclass default
        value = getattr(args, dest)
        if _unwrap(hints[f.name])[1] and value is not None:
            value = tuple(value) or None
        values[f.name] = value
    values.update(overrides)
    return cls(**values)


def add_corpora(parser: argparse.ArgumentParser) -> None:
    """`--forget`, `--retain` and `--text-field`: the text corpora of `dsg build`, `dsg sweep` and `dsg rmu`."""
    parser.add_argument(
        "--forget",
        required=True,
        nargs="+",
        metavar="SRC",
        help=".txt/.jsonl/.parquet or Hub dataset NAME[:CONFIG][@SPLIT]",
    )
    parser.add_argument("--retain", required=True, nargs="+", metavar="SRC", help="same kinds as --forget")
    parser.add_argument("--text-field", help="the JSONL/parquet field holding the text")
