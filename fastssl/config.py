"""Config dataclasses as command-line flags: one place documents a setting.

Every job's settings live in one dataclass whose field comments are the ``--help`` text;
:func:`add_dataclass_arguments` turns the fields into flags and :func:`config_from_args`
turns parsed flags back into the dataclass.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

__all__ = ["add_dataclass_arguments", "config_from_args", "parse_bool", "Range", "check_range", "check_ranges",
           "flag_name", "COMMAND_RANGES"]

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
# (flags and --config alike) before a command starts work, and a config's validate() can call
# check_ranges(self, COMMAND_RANGES[...]). None means "the default" and passes.
# tests/test_cli.py checks that every int/float flag of every command is listed here.
_COUNT, _NONNEG, _POS = Range(1, integer=True), Range(0, integer=True), Range(0, low_open=True)
_FRACTION, _SIDE = Range(0, 1), Range(8, 16384, integer=True)
_SEED = Range(0, 2**63 - 1, integer=True)
COMMAND_RANGES: dict[str, dict[str, Range]] = {
    "phantom": dict(studies=_COUNT, size=Range(32, 16384, integer=True), seed=_SEED, workers=_COUNT,
                    both_views_fraction=_FRACTION, lateral_only_fraction=_FRACTION,
                    no_view_position_fraction=_FRACTION, corrupt=_NONNEG, uncertain_fraction=_FRACTION),
    "prepare": dict(size=Range(8, 8192, integer=True), shard_size=Range(1, 1 << 20, integer=True), workers=_COUNT,
                    seed=_SEED),
    "pretrain": dict(img_size=Range(0, 16384, integer=True), patch_size=Range(0, 1024, integer=True),
                     mask_ratio=Range(0, 1, high_open=True), temperature=_POS, beta_max=Range(0),
                     beta_ramp_epochs=Range(-1), epochs=_COUNT, batch_size=_COUNT, base_lr=_POS,
                     min_lr=Range(0), warmup_epochs=Range(0), weight_decay=Range(0),
                     beta1=Range(0, 1, high_open=True), beta2=Range(0, 1, high_open=True),
                     clip_grad=Range(0), crop_min=Range(0, 1, low_open=True), workers=_NONNEG, seed=_SEED,
                     log_every=_COUNT, ckpt_every=_COUNT, stop_after_steps=_NONNEG,
                     decoder_dim=_COUNT, decoder_heads=_COUNT, decoder_depth=_COUNT, beta_steepness=_POS,
                     warmup_start=Range(0, 1), max_views=_COUNT, pixel_mean=Range(-1), pixel_std=Range(-1),
                     val_batches=_NONNEG),
    "finetune": dict(epochs=_COUNT, warmup_epochs=_NONNEG, batch_size=_COUNT, base_lr=_POS, weight_decay=Range(0),
                     layer_decay=Range(0, 1, low_open=True), clip_grad=Range(0), crop_min=Range(0, 1, low_open=True),
                     eval_batch_size=_COUNT, seed=_SEED, n_boot=_COUNT, stop_after_epochs=_NONNEG,
                     label_fraction=Range(0, 1, low_open=True), label_seed=_SEED),
    "compare": dict(n_boot=_COUNT, seed=_SEED, alpha=Range(0, 1, low_open=True, high_open=True)),
    "plot": dict(samples=_COUNT),
    "probe": dict(batch_size=_COUNT, workers=_NONNEG, l2=Range(0), max_iter=_COUNT, n_boot=_NONNEG,
                  seed=_SEED, knn_k=_NONNEG, label_fraction=Range(0, 1, low_open=True), label_seed=_SEED),
    "embed": dict(img_size=_SIDE, in_chans=Range(1, 64, integer=True), batch_size=_COUNT,
                  shard_size=_COUNT, workers=_NONNEG),
    "curate": dict(iterations=_COUNT, split_k=_COUNT, split_iterations=_COUNT, resampling_steps=_COUNT,
                   sample_size=_COUNT, init_sample_size=_COUNT, seed=_SEED, memory_budget_mb=_POS,
                   target_size=Range(0), split_inits=_COUNT, init_sample_per_centroid=_COUNT,
                   checkpoint_every=_NONNEG),
    "demo": dict(studies=_COUNT, phantom_size=Range(32, 16384, integer=True), img_size=_SIDE, epochs=_COUNT,
                 batch_size=_COUNT, base_lr=_POS, points=_COUNT, dim=_COUNT, components=_COUNT,
                 target=Range(0, 1, low_open=True), seed=_SEED),
}
