"""Config dataclasses as command-line flags: one place documents a setting.

Every job's settings live in one dataclass whose field comments are the ``--help`` text;
:func:`add_dataclass_arguments` turns the fields into flags and :func:`config_from_args`
turns parsed flags back into the dataclass.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

__all__ = ["add_dataclass_arguments", "config_from_args", "parse_bool", "Range", "check_range", "flag_name"]

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def flag_name(name: str) -> str:
    """``clip_grad`` -> ``--clip-grad`` (how errors name a setting)."""
    return "--" + name.replace("_", "-")


def parse_bool(value, *, name: str) -> bool:
    """A bool from a bool or one of true/false/yes/no/on/off (any case); anything else is a
    ValueError naming the setting (a quoted YAML ``"no"`` must not read as true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{flag_name(name)}: {value!r} is not a boolean; use true/false, yes/no or on/off")


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``low``/``high`` (None: unbounded), closed unless
    ``low_open``/``high_open``; ``integer`` demands a whole number. NaN and inf never pass."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return f"any finite {'integer' if self.integer else 'number'}"


def check_range(name: str, value, allowed: Range, *, optional: bool = False) -> None:
    """ValueError ``--name: got V; allowed: ...`` unless ``value`` is in ``allowed``
    (``optional``: None passes too, for "default" settings)."""
    if optional and value is None:
        return
    if value not in allowed:
        raise ValueError(f"{flag_name(name)}: got {value!r}; allowed: {allowed}")


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
