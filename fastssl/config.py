"""Config dataclasses as command-line flags: each setting declared once.

Every job's settings live in one dataclass. A field declares its default and type; a
field made with :func:`setting` also declares its allowed values (a :class:`Range` or a
tuple of choices); its trailing source comment is the ``--help`` text. From that one
declaration derive: the flags (:func:`add_dataclass_arguments`, types, choices, help), the
YAML keys (the router's ``--config``, keys equal to the flags), the CLI's range check
(:data:`COMMAND_RANGES`) and the Python API's check (:func:`check_settings`, called by the
dataclass's ``__post_init__``). A command module names its dataclass ``SETTINGS``.
"""
from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields

__all__ = ["add_dataclass_arguments", "config_from_args", "parse_bool", "Range", "check_range", "check_ranges",
           "flag_name", "COMMAND_RANGES", "setting", "setting_of", "declared_ranges", "declared_choices",
           "declared_checks", "command_checks", "check_settings", "check_choice", "parse_setting", "ParsedFlag"]

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
        low, high = (None if v is None else f"{int(v)}" if self.integer else f"{v:g}" for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return f"any finite {'integer' if self.integer else 'number'}"


def check_range(name: str, value, allowed: Range, *, optional: bool = False) -> None:
    """ValueError ``--name: got V; allowed: ...`` unless ``value`` is in ``allowed``
    (``optional``: None passes too, for "default" settings)."""
    if optional and value is None:
        return
    if value not in allowed:
        raise ValueError(f"{flag_name(name)}: got {value!r}; allowed: {allowed}")


def setting(default=MISSING, *, range: Range | None = None, choices=None, check=None, parse=None):
    """A dataclass field that declares a setting's allowed values once: ``range`` (a
    :class:`Range`; comma lists are checked element by element), ``choices`` (a tuple),
    ``check`` (a function of the value raising ValueError naming the flag, for values no
    range or tuple can list, e.g. ``cuda:N``; its ``allowed`` text, if any, is appended to
    the help as a range's is) or, for a composite value, ``parse`` (value -> the setting's
    value, e.g. "0.05,0.05" or [0.05, 0.05] -> (0.05, 0.05); ValueError when not allowed,
    without the flag's name: the callers add it). None always passes (it means "the
    default", e.g. the recipe's). The help text stays the field's trailing comment."""
    metadata = {}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if check is not None:
        metadata["check"] = check
    if parse is not None:
        metadata["parse"] = parse
    return field(default=default, metadata=metadata)


def setting_of(cls, name: str):
    """A field declaring what field ``name`` of dataclass ``cls`` declares (default, range,
    choices, check, parse): a setting passed through to another API's config, whose allowed values
    must not drift from that config's."""
    declared = next(f for f in fields(cls) if f.name == name)
    return field(default=declared.default, metadata=dict(declared.metadata))


def declared_ranges(cls) -> dict[str, Range]:
    """{field name: Range} of the fields of dataclass ``cls`` declared with a range."""
    return {f.name: f.metadata["range"] for f in fields(cls) if "range" in f.metadata}


def declared_choices(cls) -> dict[str, tuple]:
    """{field name: allowed values} of the fields of dataclass ``cls`` declared with choices."""
    return {f.name: f.metadata["choices"] for f in fields(cls) if "choices" in f.metadata}


def declared_checks(cls) -> dict:
    """{field name: check function} of the fields of dataclass ``cls`` declared with a check."""
    return {f.name: f.metadata["check"] for f in fields(cls) if "check" in f.metadata}


def parse_setting(name: str, parse, value):
    """``parse(value)``, its ValueError naming the setting (``--holdout: ...``); None passes."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise ValueError(f"{flag_name(name)}: {exc}") from None


def check_settings(config) -> None:
    """ValueError naming the first field of dataclass instance ``config`` outside its declared
    range, choices or check (the same one-line messages as the CLI's). A field declared with
    ``parse`` is first replaced by its parsed value (frozen or not: a check that keeps the raw
    text would leave every reader to parse it again)."""
    for f in fields(config):
        if "parse" in f.metadata:
            object.__setattr__(config, f.name, parse_setting(f.name, f.metadata["parse"], getattr(config, f.name)))
    check_ranges(config, declared_ranges(type(config)))
    for name, allowed in declared_choices(type(config)).items():
        check_choice(name, getattr(config, name), allowed)
    for name, check in declared_checks(type(config)).items():
        if getattr(config, name) is not None:
            check(getattr(config, name))


def check_choice(name: str, value, allowed: tuple) -> None:
    """ValueError ``--name: V is not one of a, b`` unless ``value`` is None or in ``allowed``."""
    if value is not None and value not in allowed:
        raise ValueError(f"{flag_name(name)}: {value!r} is not one of {', '.join(map(str, allowed))}")


def field_help(cls) -> dict[str, str]:
    """Help strings from a config dataclass's source comments (one place documents a setting);
    a subclass's comments win over its bases' (a command's settings may extend an API's)."""
    import inspect

    out = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source shipped: the flags still work, with plain names as help
            continue
        out.update(_comment_help(source))
    return out


def _comment_help(source: str) -> dict[str, str]:
    """{field: text after '#'} of the field lines of one class's source."""
    out = {}
    for line in source.splitlines():
        line = line.strip()
        if ":" in line and "=" in line and "#" in line and not line.startswith(("#", "def", '"')):
            out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return out


_KINDS = {"str": str, "int": int, "float": float, "bool": bool}


def _flag_type(f):
    """A field's flag type: its default's type, or the annotation's first type for a None
    default (``int | None`` -> int)."""
    if f.default is not None:
        return type(f.default)
    return _KINDS[str(f.type).split("|")[0].strip()]


class ParsedFlag:
    """argparse ``type`` of a setting declared with ``parse``: a flag's text (or a --config
    value, a YAML list included) through the same parse as the API, its ValueError as
    argparse's one-line error."""

    def __init__(self, parse):
        self.parse = parse
        self.__name__ = getattr(parse, "__name__", "value")   # argparse names the type in some errors

    def __call__(self, value):
        try:
            return self.parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def _flag_default(f):
    """What argparse shows and parses for a field's default: a tuple as its comma text (the
    flag's own form, "0.05,0.05"), anything else as is."""
    return ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, required=(), skip=(),
                            choices: dict | None = None, flags: dict | None = None) -> None:
    """One flag per field of the config dataclass ``cls`` (``--name-with-dashes``, or the
    name ``flags`` gives a field); booleans (``bool | None`` too: None = not given) get
    ``--x/--no-x``; types (a declared ``parse`` for composite values), defaults, declared
    choices and ranges, and help come from the dataclass."""
    choices = {**declared_choices(cls), **(choices or {})}
    ranges, checks, flags = declared_ranges(cls), declared_checks(cls), flags or {}
    helps = field_help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        help_ = helps.get(f.name, f.name.replace("_", " "))
        if f.name in ranges:
            help_ += f"; {ranges[f.name]}"
        if getattr(checks.get(f.name), "allowed", None):
            help_ += f"; {checks[f.name].allowed}"
        if "parse" in f.metadata:
            parser.add_argument(flag, dest=f.name, type=ParsedFlag(f.metadata["parse"]), default=_flag_default(f),
                                help=help_, required=f.name in required)
        elif _flag_type(f) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=_flag_type(f), default=f.default, help=help_,
                                required=f.name in required, choices=choices.get(f.name))


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from parsed flags; progress follows --quiet."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if "progress" in {f.name for f in fields(cls)}:
        values["progress"] = not getattr(args, "quiet", False)
    return cls(**values)


def _numbers(dest: str, value) -> list:
    """The number(s) of a setting: per-level settings are comma lists ("1,10,10"; "null"
    for a level's default); a non-number is a ValueError naming the flag."""
    if not isinstance(value, str):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for piece in value.replace(" ", "").split(","):
        if piece.lower() in ("", "null", "none"):
            out.append(None)
            continue
        try:
            number = float(piece)
        except ValueError:
            raise ValueError(f"{flag_name(dest)}: {value!r} is not a number or a comma list of numbers") from None
        out.append(int(number) if number.is_integer() else number)
    return out


def check_ranges(settings, ranges: dict[str, Range]) -> None:
    """ValueError naming the first setting of ``settings`` (a dataclass or argparse Namespace)
    outside its range in ``ranges``; comma lists are checked element by element."""
    for name, allowed in ranges.items():
        for value in _numbers(name, getattr(settings, name)):
            check_range(name, value, allowed, optional=True)


# Allowed values of every numeric setting of every command: the CLI checks them after parsing
# (flags and --config alike) before a command starts work. None means "the default" and passes.
# Each command declares its ranges on its module's SETTINGS dataclass (the module named here).
# tests/test_cli.py checks that every int/float flag of every command has a range, and
# tests/test_settings.py walks every command checking that the API and the CLI agree.
# The ranges several commands share (a count, a non-negative count, a positive number, ...).
COUNT, NONNEG, POSITIVE = Range(1, integer=True), Range(0, integer=True), Range(0, low_open=True)
FRACTION, SIDE, SEED = Range(0, 1), Range(8, 16384, integer=True), Range(0, 2**63 - 1, integer=True)

_DECLARED = {"phantom": "fastssl.data.phantom", "plot": "fastssl.plots", "prepare": "fastssl.data.cache",
             "pretrain": "fastssl.train.pretrain", "embed": "fastssl.curation.embed",
             "tile": "fastssl.curation.tile", "compare": "fastssl.eval.compare", "grids": "fastssl.curation.tiles",
             "curate": "fastssl.train.curate", "demo": "fastssl.demo", "probe": "fastssl.eval.probe",
             "finetune": "fastssl.eval.finetune", "export": "fastssl.models.export"}


class _CommandRanges(Mapping):
    """{command: {setting: Range}}: a command's ranges are read from its module's ``SETTINGS``
    dataclass on access (so ``import fastssl.config`` imports no command)."""

    def __getitem__(self, name: str) -> dict[str, Range]:
        return declared_ranges(importlib.import_module(_DECLARED[name]).SETTINGS)

    def __iter__(self):
        return iter(_DECLARED)

    def __len__(self) -> int:
        return len(_DECLARED)


COMMAND_RANGES: Mapping[str, dict[str, Range]] = _CommandRanges()


def command_checks(name: str) -> dict:
    """{field name: check function} declared by command ``name``'s settings dataclass (e.g. its
    --device rule), so that the CLI runs the very checks the API runs; {} for a command
    without one."""
    module = _DECLARED.get(name)
    return {} if module is None else declared_checks(importlib.import_module(module).SETTINGS)
