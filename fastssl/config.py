"""Config dataclasses as command-line flags: one place documents a setting.

Every job's settings live in one dataclass whose field comments are the ``--help`` text;
:func:`add_dataclass_arguments` turns the fields into flags and :func:`config_from_args`
turns parsed flags back into the dataclass.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

__all__ = ["add_dataclass_arguments", "config_from_args"]


def _field_help(cls) -> dict[str, str]:
    """Help strings from a config dataclass's source comments (one place documents a setting)."""
    import inspect

    out = {}
    try:
        source = inspect.getsource(cls)
    except OSError:  # no source shipped: the flags still work, with plain names as help
        return out
    for line in source.splitlines():
        line = line.strip()
        if ":" in line and "=" in line and "#" in line and not line.startswith(("#", "def", '"')):
            out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, required=(), skip=(),
                            choices: dict | None = None) -> None:
    """One flag per field of the config dataclass ``cls`` (``--name-with-dashes``); booleans
    get ``--x/--no-x``; defaults and help come from the dataclass."""
    choices = choices or {}
    helps = _field_help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = helps.get(f.name, f.name.replace("_", " "))
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_,
                                required=f.name in required, choices=choices.get(f.name))


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from parsed flags; progress follows --quiet."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if "progress" in {f.name for f in fields(cls)}:
        values["progress"] = not getattr(args, "quiet", False)
    return cls(**values)
