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
import sys
from typing import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("fastssl.data.phantom", "write a synthetic paired-view chest X-ray set (DICOM, MIMIC-CXR layout)"),
    "prepare": ("fastssl.data.cache", "convert DICOM studies once into memory-mapped .npy shards"),
    "pretrain": ("fastssl.train.pretrain", "multi-view MAE pretraining (paired), or the single-view / supervised baselines"),
    "probe": ("fastssl.eval.probe", "linear probe on frozen CLS features: per-label and macro AUROC with bootstrap CIs"),
    "finetune": ("fastssl.eval.finetune", "full fine-tuning with study-level logits, model selection on validation AUROC"),
    "compare": ("fastssl.eval.compare", "paired patient-bootstrap test of two runs' macro AUROC (their scores.csv)"),
    "embed": ("fastssl.curation.embed", "embed image tiles with a timm model into fp16 .npy shards"),
    "curate": ("fastssl.train.curate", "hierarchical k-means tree, balanced sample and report"),
    "demo": ("fastssl.demo", "the main job end to end on built-in phantom data"),
}


def _load_config(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise SystemExit(f"--config {path}: cannot read ({exc.strerror})")
    except yaml.YAMLError as exc:
        raise SystemExit(f"--config {path}: not valid YAML ({exc})")
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values")
    return data


def _apply_config(parser: argparse.ArgumentParser, config: dict, path: str) -> None:
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(k.replace("-", "_") for k in config) - known)
    if unknown:
        raise SystemExit(
            f"--config {path}: unknown keys {unknown}; see `--help` for the accepted flags"
        )
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in config.items()})
    # A value from the file satisfies a required flag.
    for action in parser._actions:
        if action.dest in {k.replace("-", "_") for k in config}:
            action.required = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastssl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(
        prog=f"fastssl {name}", description=COMMANDS[name][1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of flag values (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    module.add_arguments(parser)
    return parser, module


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
    parser, module = command_parser(name)
    # Find --config first with a parser that knows nothing else, so that a required flag
    # whose value comes from the file is not reported missing.
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    pre, _ = finder.parse_known_args(rest)
    if pre.config:
        _apply_config(parser, _load_config(pre.config), pre.config)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
