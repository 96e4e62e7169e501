"""``fastssl curate``: hierarchical k-means tree, balanced sample and a report.

Paper 2's trees ship as configs: ``--config fastssl/configs/paper2_T1.yaml`` (or _T2).
Per-level settings (``--iterations``, ``--resampling-steps``, ``--sample-size``,
``--sampling-strategy``) take one value or one per level. ``--resampling-steps`` counts
the k-means runs of a level the way SDC and paper 2 count them: the first k-means is
step 1, so 10 = the first k-means + 9 resampled ones, and 1 = no resampling.

Files in ``--out``:
    job.json               the run's fingerprint (tree settings + sampled sha256 of every
                           shard); a rerun with other settings or other data is refused,
                           naming the differences, unless --overwrite
    .fastssl.lock          held while a job runs: a second job into --out fails at once
    tree/                  the HierarchicalTree (plain .npy levels, memory-mapped), its
                           progress.json (the finished steps; job.json is the one resume
                           record) and checkpoints while running (every finished step,
                           the k-means++ start every minute, Lloyd centroids every
                           --checkpoint-every iterations, every batch of the split)
    curated_indices.npy    (target,) int64 rows of the data chosen by hierarchical_sample
    curated_tiles.csv      one line per curated tile: row,source,slide,level,x,y,size,mpp,
                           cluster_1..cluster_L (source from the embed index.csv, the tile
                           fields from the tile index its manifest names, empty without
                           them; see fastssl.curation.curated_table)
    report.json            cluster-size distributions per level, balance metrics (normalised
                           entropy, Gini) of the tree and of the sample, ground-truth group
                           coverage when --labels is given, timings
    plots/*.png            per level: cluster-size histogram (every cluster) and the
                           sample's balance against the full data and a random sample (only
                           when matplotlib is importable)

Rerunning the same command resumes the tree where it stopped, inside a step too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from fastssl.config import (Range, add_dataclass_arguments, check_choice, check_range, check_settings,
                            declared_choices, declared_ranges, field_help, flag_name, setting)
from fastssl.curation.hierarchical import PER_LEVEL, HierarchicalConfig, LevelConfig
from fastssl.curation.report import balance_metrics, build_report, summary_text, write_plots

log = logging.getLogger(__name__)

__all__ = ["CurateConfig", "add_arguments", "run", "balance_metrics", "build_report", "summary_text"]


def _levels(value) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {value!r}: expected e.g. 10000,1000,100") from None


def per_level(name: str, value, n_levels: int):
    """A scalar (same for every level) or a list with one entry per level ("null"/"-"
    entries take the default) of per-level setting ``name`` (PER_LEVEL), each value checked
    against the setting's declaration (HierarchicalConfig); raises ValueError naming the flag."""
    ranges, choices = declared_ranges(HierarchicalConfig), declared_choices(HierarchicalConfig)
    flag = flag_name(name)
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    out = []
    for item in items:
        if item is None or item in ("", "-", "null", "None"):
            out.append(None)
            continue
        try:
            v = str(item) if name in choices else _strict_int(item)
        except (TypeError, ValueError):
            kind = "str" if name in choices else "int"
            raise ValueError(f"{flag} {value!r}: expected {kind} values") from None
        if name in choices:
            check_choice(name, v, choices[name])
        else:
            check_range(name, v, ranges[name])
        out.append(v)
    if len(out) == 1 and not isinstance(value, (list, tuple)):
        return out[0]
    if len(out) != n_levels:
        raise ValueError(f"{flag} has {len(out)} values for {n_levels} levels; give one value "
                         "or one per level")
    return out


def _strict_int(item) -> int:
    if isinstance(item, bool):
        raise TypeError(item)
    if isinstance(item, float) and not item.is_integer():
        raise ValueError(item)
    return int(str(item)) if not isinstance(item, (int, float)) else int(item)


@dataclass
class CurateConfig(HierarchicalConfig):
    """``fastssl curate``'s settings, declared once: the tree's (:class:`HierarchicalConfig`,
    whose source comments are the flags' help) and the job's own below. The tree's resume
    record stays HierarchicalConfig's (:func:`tree_config`); this class declares the flags,
    the YAML keys and the CLI's ranges, and ``CurateConfig(...).validate()`` checks them all."""

    levels: list = field(default_factory=lambda: [1000, 100, 10])  # clusters per level, finest first, e.g. 10000,1000,100,10
    out: str = "runs/curate"  # output directory
    target_size: float = setting(0.1, range=Range(0))  # points to keep: a count, or a fraction of the points if < 1; 0 = no sample
    sample_strategy: str = setting("random", choices=("random", "closest", "furthest"))  # points taken inside a level-1 cluster
    labels: str | None = None  # optional ground-truth groups for the report: a CSV with columns source,label matched by tile path to the embed index.csv beside the shards, or an (n,) integer .npy in the data's row order
    overwrite: bool = False  # replace a run of other settings or other data found in --out
    verify_data: bool = False  # fingerprint the shards by a full sha256 (default: size and sampled blocks, cheap at hundreds of GB)

    def validate(self) -> None:
        check_settings(self)   # every declared range and choice, in the CLI's words
        super().validate()


SETTINGS = CurateConfig   # the dataclass declaring this command's settings (fastssl.config)
# Flags add_dataclass_arguments cannot make: the comma lists (--levels and the per-level
# settings: _add_per_level_arguments), and no flag at all for the API's init_candidates and
# for progress (--quiet).
_OWN_FLAGS = ("levels", *PER_LEVEL, "init_candidates", "progress")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # not required=True: the router's pre-pass would reject a --data given by --config
    parser.add_argument("--data", nargs="+", default=None,
                        help="(required) embeddings: .npy shard paths, a directory of them (an "
                             "embed output directory is read in its manifest's order), or a glob")
    _add_per_level_arguments(parser)
    add_dataclass_arguments(parser, CurateConfig, skip=_OWN_FLAGS)   # --out, --target-size, ..., --seed, --overwrite


def _add_per_level_arguments(parser: argparse.ArgumentParser) -> None:
    """--levels and the per-level flags: one value, or a comma list (a YAML list) with one per
    level, parsed by per_level. Default, help and allowed values come from their declaration
    (CurateConfig, HierarchicalConfig; LevelConfig's k for each --levels entry)."""
    helps, declared = field_help(CurateConfig), {f.name: f for f in fields(CurateConfig)}
    allowed = {**{k: str(v) for k, v in declared_ranges(CurateConfig).items()},
               **{k: " | ".join(v) for k, v in declared_choices(CurateConfig).items()}}
    parser.add_argument("--levels", type=_levels, default=declared["levels"].default_factory(),
                        help=f"{helps['levels']}; each {declared_ranges(LevelConfig)['k']}")
    for name in PER_LEVEL:
        parser.add_argument(flag_name(name), default=declared[name].default,
                            help=f"{helps[name]}; {allowed[name]}; one value, or one per level (comma list)")


# ------------------------------------------------------------------ the job
def _index_csv_for(data) -> Path | None:
    """The embed index.csv that numbers the rows of ``data`` (a directory or its shards)."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    dirs = {Path(item) if Path(item).is_dir() else Path(item).parent for item in items}
    if len(dirs) != 1:
        return None
    path = dirs.pop() / "index.csv"
    return path if path.exists() else None


def load_labels(path: str, data, n_rows: int) -> np.ndarray:
    """(n_rows,) int64 ground-truth group of every data row.

    A CSV (columns ``source`` or ``path``, and ``label``) is matched by tile path to the
    embed index.csv beside the shards, so its row order does not matter; a .npy must
    already be in the data's row order (index.csv's order).
    """
    from fastssl.errors import DataError

    if str(path).lower().endswith(".csv"):
        return _labels_by_path(Path(path), data, n_rows)
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"cannot load labels ({exc})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(path, f"expected a 1-D integer array, got {labels.dtype} {labels.shape}")
    return np.asarray(labels, dtype=np.int64)


def _write_tile_table(args, tree, indices: np.ndarray, point_ids: np.ndarray | None,
                      out: Path) -> Path:
    """curated_tiles.csv of the curated tree points ``indices`` (data rows via point_ids
    when non-finite rows were left out)."""
    from fastssl.curation.curated_table import (CURATED_TABLE, join_tiles, read_sources,
                                                selected_clusters, tile_index_for,
                                                write_curated_table)

    rows = indices if point_ids is None else point_ids[indices]
    order = np.argsort(rows, kind="stable")
    rows, points = rows[order], indices[order]
    index = _index_csv_for(args.data)
    sources = read_sources(index, rows) if index is not None else None
    tiles_csv = tile_index_for(index)
    tiles = join_tiles(tiles_csv, sources) if tiles_csv is not None else None
    return write_curated_table(out / CURATED_TABLE, rows, selected_clusters(tree, points),
                               sources, tiles)


def _labels_by_path(path: Path, data, n_rows: int) -> np.ndarray:
    import csv

    from fastssl.errors import DataError

    index = _index_csv_for(data)
    if index is None:
        raise DataError(path, "labels by tile path need the embed index.csv beside the shards "
                              "(give --data the embed output directory)")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle))
        with open(index, newline="", encoding="utf-8") as handle:
            sources = [row["source"] for row in csv.DictReader(handle)]
    except (OSError, KeyError, csv.Error) as exc:
        raise DataError(path, f"cannot read labels or {index} ({exc})") from None
    key = "source" if table and "source" in table[0] else "path"
    if not table or key not in table[0] or "label" not in table[0]:
        raise DataError(path, "expected a CSV with columns source (or path) and label")
    by_source = {row[key]: row["label"] for row in table}
    missing = [s for s in sources if s not in by_source]
    if missing:
        raise DataError(path, f"{len(missing)} of {len(sources)} tiles of {index} have no "
                              f"label (first: {missing[0]!r})")
    if len(sources) != n_rows:
        raise DataError(index, f"lists {len(sources)} rows but the data has {n_rows}")
    _, codes = np.unique(np.array([by_source[s] for s in sources]), return_inverse=True)
    return codes.astype(np.int64)


def tree_config(args: argparse.Namespace):
    """The HierarchicalConfig of the flags (per-level values resolved), validated.

    Raises ValueError with a one-line message naming the flag.
    """
    levels = _levels(args.levels)
    values = {name: per_level(name, getattr(args, name), len(levels)) for name in PER_LEVEL}
    level_cfgs = [LevelConfig(k=k, **{name: v[i] for name, v in values.items()
                                      if isinstance(v, list)}) for i, k in enumerate(levels)]
    # a value given once is the config's; a list is the levels' (the config keeps its default)
    scalars = {name: v for name, v in values.items() if v is not None and not isinstance(v, list)}
    config = HierarchicalConfig(
        levels=level_cfgs, **scalars, resample_level1=args.resample_level1,
        resampling_init=args.resampling_init, split_k=args.split_k,
        split_iterations=args.split_iterations, split_inits=args.split_inits, init=args.init, empty=args.empty,
        init_sample_size=args.init_sample_size,
        init_sample_per_centroid=args.init_sample_per_centroid,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
        memory_budget_mb=args.memory_budget_mb, fp64_accumulate=args.fp64_accumulate,
        impl=args.impl, precision=args.precision, nonfinite=args.nonfinite,
        progress=None if not getattr(args, "quiet", False) else False)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    from fastssl import distributed as dist
    from fastssl.curation._source import PointSource

    if not args.data:
        raise ValueError("--data is required (a flag or the 'data' key of --config)")
    config = tree_config(args)
    out = Path(args.out)
    dist.init()
    source = PointSource.from_data(args.data)
    with _open_curate_job(args, config, out, source):
        return _run_locked(args, source, config, out)


def _open_curate_job(args, config, out: Path, source):
    """fastssl.jobs.open_job for --out. The run's fingerprint is the tree settings + a content
    hash of every shard, hashed once, by the main rank: ``source`` (a PointSource of the
    shards) keeps the hashes for the tree's progress record."""
    from fastssl import distributed as dist
    from fastssl import jobs

    def fingerprint() -> jobs.JobFingerprint:
        inputs = jobs.fingerprint_files(list(source.names),
                                        full=bool(getattr(args, "verify_data", False)))
        source.known_hashes = jobs.sampled_hashes(inputs)
        return jobs.JobFingerprint("curate", _flat(config.to_json()), inputs)

    return jobs.open_job(out, fingerprint, overwrite=args.overwrite, stale=("tree", "tree/work/level_*"),
                         rank=dist.rank(), world=dist.world_size())


def _flat(value, prefix: str = "") -> dict:
    """{"levels.2.k": 35000, "iterations": 50, ...}: one entry per setting, so that a
    refused resume names the setting that changed."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i + 1), v) for i, v in enumerate(value))
    else:
        return {prefix.rstrip("."): value}
    out = {}
    for key, v in items:
        out.update(_flat(v, f"{prefix}{key}."))
    return out


def _engines(impl: str) -> str:
    """The engines the tree is built with, as the assignment code resolves ``impl``:
    Lloyd passes use assign, the per-cluster splits assign_grouped."""
    from fastssl.assign import resolved_engine
    from fastssl.curation.kmeans import assign_device

    where = assign_device(impl) or "cpu"
    return (f"{resolved_engine(where, impl=impl)} (splits: "
            f"{resolved_engine(where, op='assign_grouped', impl=impl)}) on {where}")


def _run_locked(args, source, config, out: Path) -> int:
    from fastssl import distributed as dist
    from fastssl.curation.hierarchical import hierarchical_kmeans

    t0 = time.perf_counter()
    log.info("curate: levels %s, split_k %s, %s iterations, %s k-means runs per level "
             "(resampling %s), budget %.0f MiB, assignment engine %s",
             [lv.k for lv in config.levels], config.split_k,
             config.iterations, [config.level_value(d, "resampling_steps")
                                 for d in range(1, len(config.levels) + 1)],
             config.resampling_init, config.memory_budget_mb, _engines(config.impl))
    # job.json (open_job, above) is the run's one resume record: progress.json lists steps only
    tree = hierarchical_kmeans(source, config=config, output_dir=out / "tree", overwrite=args.overwrite,
                               resume_record=False)
    tree_s = time.perf_counter() - t0
    if not dist.is_main():
        return 0
    return _sample_and_report(args, tree, out, t0, tree_s)


def _sample_and_report(args, tree, out: Path, t0: float, tree_s: float) -> int:
    """The curated sample, report.json, plots and the summary (main rank)."""
    from fastssl.atomic import atomic_save_npy, atomic_write_text

    point_ids = None
    if tree.meta.get("point_ids"):
        point_ids = np.load(out / "tree" / tree.meta["point_ids"])
    target = float(args.target_size)   # in range: checked by the router (CurateConfig's declaration)
    n_target = int(round(target * tree.n_points)) if 0 < target < 1 else int(target)
    indices = None
    if n_target > 0:
        from fastssl.curation.sampling import hierarchical_sample

        indices = np.asarray(hierarchical_sample(tree, n_target, strategy=args.sample_strategy,
                                                 seed=args.seed), dtype=np.int64)
        rows = indices if point_ids is None else point_ids[indices]
        atomic_save_npy(out / "curated_indices.npy", np.sort(rows).astype(np.int64))
    if indices is not None:
        _write_tile_table(args, tree, indices, point_ids, out)
    n_rows = tree.n_points if point_ids is None else int(tree.meta["data"]["n"])
    labels = load_labels(args.labels, args.data, n_rows) if args.labels else None
    report = build_report(tree, indices, labels, point_ids, seed=args.seed)
    report["seconds"] = {"tree": round(tree_s, 2), "total": round(time.perf_counter() - t0, 2)}
    report["steps"] = tree.meta.get("steps", [])
    report["plots"] = write_plots(tree, out / "plots", indices, seed=args.seed)
    if not report["plots"]:
        report["plots_note"] = "matplotlib is not importable: no PNG plots"
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    print(summary_text(report), file=sys.stdout)
    print(f"wrote {out / 'tree'}, {out / 'report.json'}"
          + (f", {out / 'curated_indices.npy'}, {out / 'curated_tiles.csv'}"
             if indices is not None else ""))
    return 0


def __getattr__(name: str):
    # the report's helpers moved to fastssl.curation.report; the old path works one more release
    if name in ("size_histogram", "cluster_shares"):
        import warnings

        from fastssl.curation import report

        warnings.warn(f"fastssl.train.curate.{name} moved to fastssl.curation.report.{name}; the old path "
                      "goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
