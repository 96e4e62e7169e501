"""`fastssl <command>`: the command-line entry point.

Each command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only routes, so ``fastssl --help`` imports nothing
heavy. Every command takes ``--config FILE`` (YAML) whose keys equal the flags' long
names (with underscores); flags given on the command line override the file.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import sys
from typing import Sequence

from fastssl.config import COMMAND_RANGES as RANGES
from fastssl.config import command_checks
from fastssl.config import ParsedFlag, check_ranges, flag_name, parse_bool
from fastssl.errors import DataError, MissingDependencyError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("fastssl.data.phantom", "write a synthetic paired-view chest X-ray set (DICOM, MIMIC-CXR layout)"),
    "prepare": ("fastssl.data.cache", "convert DICOM studies once into memory-mapped .npy shards"),
    "pretrain": ("fastssl.train.pretrain", "multi-view MAE pretraining (paired), or the single-view / supervised baselines"),
    "probe": ("fastssl.eval.probe", "linear probe on frozen CLS features: per-label and macro AUROC with bootstrap CIs"),
    "finetune": ("fastssl.eval.finetune", "fine-tuning (full, or frozen-encoder linear) on study logits, epoch chosen on validation (or k-fold CV)"),
    "compare": ("fastssl.eval.compare", "paired patient-bootstrap test of two runs' macro AUROC (their scores.csv)"),
    "tile": ("fastssl.curation.tile", "whole-slide images -> a tile index (tiles.csv) at a physical resolution, tissue only"),
    "embed": ("fastssl.curation.embed", "embed image tiles with a timm model into fp16 .npy shards"),
    "curate": ("fastssl.train.curate", "hierarchical k-means tree, balanced sample and report"),
    "grids": ("fastssl.curation.tiles", "PNG grids of each cluster's tiles closest to its centroid (a curate tree level)"),
    "demo": ("fastssl.demo", "the main job end to end on built-in phantom data"),
    "plot": ("fastssl.plots", "PNG training curves and reconstructions of a pretraining run"),
    "export": ("fastssl.models.export", "timm-ready encoder files (one per view) from a pretrain checkpoint"),
}


# Errors a user causes and can fix (bad values, paths, data): one line, exit code 2.
# Anything else is a bug and keeps its traceback (FASTSSL_DEBUG=1 shows one for these too).
# EOFError and UnpicklingError: numpy and torch reading an empty or foreign file.
USER_ERRORS = (ValueError, TypeError, DataError, OSError, EOFError, pickle.UnpicklingError, MissingDependencyError,
               argparse.ArgumentTypeError)
_FILE_OUTS = {"compare"}     # its --out is a file; every other command's is a directory


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default once: not when the help already states it, nor for None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, "", argparse.SUPPRESS)
                or action.option_strings == [] or action.nargs == 0 and action.default is False):
            return text
        return f"{text} (default: %(default)s)"


def _load_config(path: str, parser: argparse.ArgumentParser | None = None) -> dict:
    """The mapping in YAML (or JSON) file ``path``; errors go through ``parser.error`` (one
    line, exit 2), or are a ValueError without a parser."""
    import yaml

    def fail(message: str):
        if parser is None:
            raise ValueError(message)
        parser.error(message)

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        fail(f"--config {path}: cannot read ({exc.strerror})")
    except yaml.YAMLError as exc:
        fail(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of flag names to values")
    return data


def _is_bool_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                               argparse._StoreFalseAction))


def _config_value(action: argparse.Action, value):
    """A --config value as the flag would have given it: strict booleans, the flag's type
    applied to strings and numbers (YAML's 3 for a float flag, "0.5" for a number)."""
    if value is None and action.default is None:  # null = the flag's default (pretrain: the recipe's)
        return None
    if _is_bool_flag(action):
        return parse_bool(value, name=action.dest)
    if value is None or action.type is None:
        return value
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [_config_value(action, v) for v in value]
    if isinstance(value, list) and not isinstance(action.type, ParsedFlag):
        return value   # left to the command (curate's per-level lists)
    if action.type is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{flag_name(action.dest)}: {value!r} is not an integer")
        return int(value)
    try:   # a composite setting's parse takes a YAML list as it takes the flag's comma text
        return action.type(value if isinstance(value, (str, list)) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{flag_name(action.dest)}: invalid value {value!r} ({exc})") from None


def _apply_config(parser: argparse.ArgumentParser, config: dict, path: str) -> None:
    actions = {action.dest: action for action in parser._actions}
    config = {k.replace("-", "_"): v for k, v in config.items()}
    if "progress" in config and "progress" not in actions:    # a run's own config.json
        config["quiet"] = not parse_bool(config.pop("progress"), name="progress")
    unknown = sorted(set(config) - set(actions))
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    try:
        values = {key: _config_value(actions[key], value) for key, value in config.items()}
    except ValueError as exc:
        parser.error(f"--config {path}: {exc}")
    parser.set_defaults(**values)
    for key in values:          # a value from the file satisfies a required flag
        actions[key].required = False


def check_args(name: str, args: argparse.Namespace) -> None:
    """ValueError naming the first flag of command ``name`` that cannot work: a number outside
    its range, an unknown device or timm model, an --out that is a file."""
    check_ranges(args, RANGES.get(name, {}))
    for key, check in command_checks(name).items():   # the API's own rules (--device...), not second ones
        if getattr(args, key, None) is not None:
            check(getattr(args, key))
    out = getattr(args, "out", None)
    if name not in _FILE_OUTS and isinstance(out, str) and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    model = getattr(args, "model", None)
    if name == "embed" and isinstance(model, str):
        import timm

        if not model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(model):
            raise ValueError(f"--model {model!r}: not a timm model name (see timm.list_models())")


def _clip_workers(args: argparse.Namespace) -> None:
    """More worker processes than usable cores only slows a job down: use the cores, say so once
    (a default of "all cores", None here, is the same count: fastssl.distributed.usable_cores)."""
    from fastssl.distributed import usable_cores

    cores = usable_cores()
    if isinstance(getattr(args, "workers", None), int) and args.workers > cores:
        logging.getLogger("fastssl.cli").info("--workers %d: this machine has %d usable cores; using %d",
                                              args.workers, cores, cores)
        args.workers = cores


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastssl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"fastssl {name}", description=COMMANDS[name][1], formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file of flag values (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no start banners, no info logs (results are still printed)")
    module.add_arguments(parser)
    return parser, module


def _parse(name: str, rest: list[str]) -> tuple[argparse.Namespace, object]:
    parser, module = command_parser(name)
    # Find --config first with a parser that knows nothing else, so that a required flag
    # whose value comes from the file is not reported missing.
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    pre, _ = finder.parse_known_args(rest)
    if pre.config:
        _apply_config(parser, _load_config(pre.config, parser), pre.config)
    return parser.parse_args(rest), module


def _run(name: str, module, args: argparse.Namespace) -> int:
    """The command, with user errors as one line on stderr and exit code 2."""
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("FASTSSL_DEBUG") == "1":
            raise
        print(f"fastssl {name}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastssl {name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from fastssl import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    args, module = _parse(name, rest)
    try:
        check_args(name, args)
    except ValueError as exc:   # returned, not raised: callers of main() get the exit code
        print(f"fastssl {name}: error: {exc} (see fastssl {name} --help)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _clip_workers(args)
    return _run(name, module, args)


if __name__ == "__main__":
    sys.exit(main())
