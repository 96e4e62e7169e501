"""Each setting declared once: the CLI (flags and --config) and the Python API accept and
refuse the same values, for every command, setting by setting, at the boundaries."""
from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest

from fastssl import cli
from fastssl.config import Range, declared_choices, declared_ranges

# Every command declares its settings on a dataclass (module.SETTINGS).
DECLARED = ("phantom", "plot", "prepare", "pretrain", "probe", "finetune", "embed", "tile", "compare", "grids",
            "curate", "demo", "export")


def _embed_api(**settings):
    from fastssl.curation.embed import EmbedConfig, _check_config

    _check_config(EmbedConfig(random_init=True, **settings))   # what embed_images runs first


def _curate_api(**settings):
    from fastssl.curation.hierarchical import HierarchicalConfig
    from fastssl.train.curate import CurateConfig

    # a tree setting is walked through HierarchicalConfig alone (what the curate job checks
    # first), so that its own check is tested, not CurateConfig's in its place
    tree = set(settings) <= {f.name for f in dataclasses.fields(HierarchicalConfig)}
    (HierarchicalConfig if tree else CurateConfig)(levels=[8, 4], **settings).validate()


# The Python API each command's settings reach: a SETTINGS dataclass checks at construction;
# embed's check runs first in embed_images; curate's are checked by validate(), the tree's by
# HierarchicalConfig.validate() on their own.
API = {"embed": _embed_api, "curate": _curate_api}


def _api_for(name: str):
    """(callable(**settings) raising ValueError on a refused value, set of setting names it takes)
    or (None, empty set)."""
    if name in API:
        return API[name], {f.name for f in dataclasses.fields(_settings_class(name))}
    cls = _settings_class(name)
    if cls is None:
        return None, set()
    return (lambda **settings: cls(**settings)), {f.name for f in dataclasses.fields(cls)}


def _boundaries(allowed: Range) -> list[tuple[object, bool]]:
    """(value, inside?) pairs at the edges of ``allowed``: min, max, min-1, max+1 (a small step
    for real numbers, the bound itself for an open end), and a fraction for an integer range.
    Whether each is inside is known by construction, not by asking Range."""
    step = 1 if allowed.integer else 1e-6
    cases = []
    if allowed.low is not None:
        low = int(allowed.low) if allowed.integer else float(allowed.low)
        cases += [(low, not allowed.low_open), (low - step, False)]
        if allowed.low_open:
            cases.append((low + step, True))
        if allowed.integer:
            cases.append((low + 1.5, False))
    if allowed.high is not None:
        high = int(allowed.high) if allowed.integer else float(allowed.high)
        cases += [(high, not allowed.high_open), (high + step, False)]
        if allowed.high_open:
            cases.append((high - step, True))
    return cases


@functools.lru_cache(maxsize=None)
def _parser(name: str) -> argparse.ArgumentParser:
    return cli.command_parser(name)[0]


def _required_argv(parser: argparse.ArgumentParser, skip: str) -> list[str]:
    """Placeholder values for the command's required flags and positionals (none of them is
    checked on disk)."""
    argv = []
    for action in parser._actions:
        if action.required and action.dest != skip:
            value = action.choices[0] if action.choices else "placeholder"
            argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


def _cli_accepts(name: str, dest: str, text: str) -> bool:
    """Whether ``fastssl NAME --DEST TEXT`` gets past parsing and the router's checks."""
    parser = _parser(name)
    flag = next(a.option_strings[0] for a in parser._actions if a.dest == dest)
    try:
        args = parser.parse_args(_required_argv(parser, dest) + [flag, text])
        cli.check_args(name, args)
    except SystemExit as exc:
        assert exc.code == 2
        return False
    except ValueError:
        return False
    return True


def _api_accepts(call, name: str, value) -> bool:
    try:
        call(**{name: value})
    except ValueError as exc:
        assert "--" + name.replace("_", "-") in str(exc) or name in str(exc), exc   # names the setting
        return False
    return True


def _settings_class(name: str):
    _, module = cli.command_parser(name)
    return getattr(module, "SETTINGS", None)


def test_declared_commands_have_a_settings_dataclass():
    for name in cli.COMMANDS:
        cls = _settings_class(name)
        assert (cls is not None) == (name in DECLARED), name
        if cls is not None:   # the CLI's ranges are the dataclass's, not a second table
            assert cli.RANGES[name] == declared_ranges(cls)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_api_and_cli_accept_and_refuse_the_same_numbers(name):
    call, api_names = _api_for(name)
    ranges = cli.RANGES.get(name, {})
    assert ranges or name in ("export",), f"{name}: no numeric setting declared"   # export has none
    for setting, allowed in ranges.items():
        for value, inside in _boundaries(allowed):
            assert _cli_accepts(name, setting, str(value)) is inside, (name, setting, value)
            if setting in api_names:
                assert _api_accepts(call, setting, value) is inside, (name, setting, value)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_api_and_cli_accept_and_refuse_the_same_choices(name):
    cls = _settings_class(name)
    call, api_names = _api_for(name)
    parser = _parser(name)
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices and a.option_strings}
    if cls is not None:
        declared = declared_choices(cls)
        assert {k: v for k, v in choices.items() if k in declared} == declared, name
        assert set(declared) <= set(choices), name   # every declared choice reaches its flag
    for setting, allowed in choices.items():
        for value in (*allowed, "nonsense"):
            inside = value != "nonsense"
            assert _cli_accepts(name, setting, str(value)) is inside, (name, setting, value)
            if setting in api_names:
                assert _api_accepts(call, setting, value) is inside, (name, setting, value)


def test_a_config_file_is_checked_like_the_flags(tmp_path, capsys):
    """The YAML keys are the flags: a value out of range in --config is refused the same way."""
    config = tmp_path / "c.yaml"
    config.write_text("cache: c\nbeta2: 1.0\n")
    assert cli.main(["pretrain", "--config", str(config)]) == 2
    assert "--beta2: got 1.0; allowed: a number in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("setting, value, inside", [("size", 16384, True), ("size", 16385, False), ("size", 7, False),
                                                    ("workers", 0, True), ("workers", -1, False)])
def test_prepare_cache_checks_its_settings_before_reading_the_source(tmp_path, setting, value, inside):
    """The API function itself refuses exactly what the CLI refuses, before any work; an
    accepted value gets as far as the (missing) source."""
    from fastssl.data.cache import prepare_cache
    from fastssl.errors import DataError

    with pytest.raises((ValueError, DataError, OSError)) as err:
        prepare_cache(str(tmp_path / "no-such-source"), tmp_path / "out", progress=False, **{setting: value})
    assert str(err.value).startswith(f"--{setting}: got {value}") is (not inside), err.value
    assert _cli_accepts("prepare", setting, str(value)) is inside


def test_a_kmeans_engine_name_is_checked_before_any_work():
    """KMeansConfig(impl="nonsense") used to pass and fail at the first assignment, after
    k-means++ had run; now the config itself refuses it, and every engine name the curate CLI
    offers is accepted."""
    from fastssl.curation.kmeans import KMeansConfig

    with pytest.raises(ValueError, match=r"^impl='nonsense'; expected one of"):
        KMeansConfig(k=3, impl="nonsense")
    for impl in ("auto", "cpu", "cuda", "torch"):
        assert KMeansConfig(k=3, impl=impl).impl == impl


# Flags several commands share, the commands that take them, and the range they share.
# --workers: 0 = this process everywhere (phantom and prepare also run 1 in this process;
# the DataLoader commands start N >= 1 loader processes).
SHARED = {
    "workers": ({"phantom", "prepare", "pretrain", "probe", "finetune", "embed"}, Range(0, integer=True)),
    "batch_size": ({"pretrain", "probe", "finetune", "embed", "demo"}, Range(1, integer=True)),
    "device": ({"pretrain", "probe", "finetune", "embed"}, None),
    "overwrite": ({"phantom", "prepare", "pretrain", "probe", "finetune", "embed", "tile", "curate", "export",
                   "grids", "demo"}, None),
    "seed": ({"phantom", "prepare", "pretrain", "probe", "finetune", "compare", "curate", "demo"},
             Range(0, 2**63 - 1, integer=True)),
}


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_shared_flags_exist_and_mean_the_same(flag):
    commands, allowed = SHARED[flag]
    have = {name for name in cli.COMMANDS if any(a.dest == flag for a in _parser(name)._actions)}
    assert have == commands, flag
    for name in commands:
        if allowed is not None:
            assert cli.RANGES[name][flag] == allowed, (name, flag)
        if flag == "device":
            assert _cli_accepts(name, flag, "cuda:1") and not _cli_accepts(name, flag, "gpu"), name


def test_all_cores_means_the_usable_cores_everywhere(monkeypatch, tmp_path):
    """The "all cores" defaults (phantom, prepare, the DICOM header scan) and the CLI's cap on a
    number given are one count, fastssl.distributed.usable_cores: this process's CPU affinity,
    not os.cpu_count() (a batch job given 3 of 64 cores must not start 64 processes)."""
    import os

    from fastssl.data import cache, mimic, phantom

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    defaults = {k: v for k, v in dataclasses.asdict(phantom.PhantomConfig()).items() if k != "overwrite"}
    assert phantom._settings(**defaults, finding_rates=None)["workers"] == 3
    assert cache._check_settings(str(tmp_path / "out")) == 3

    pools = []

    class Pool:   # records the size the header scan asks for; reads nothing
        def __init__(self, max_workers):
            pools.append(max_workers)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, items, chunksize=1):
            return []

    monkeypatch.setattr(mimic, "ProcessPoolExecutor", Pool)
    mimic._read_headers([str(tmp_path / f"{i}.dcm") for i in range(64)], None)
    assert pools == [3]
    args = argparse.Namespace(workers=100)
    cli._clip_workers(args)
    assert args.workers == 3


# Every value class of --device: the names fastssl.distributed.pick_device takes, and names
# torch.device refuses with a RuntimeError (gpu, cuda:x, '') or that no job here supports
# (mps: float64 on the device, CUDA-only autocast), which must be a ValueError everywhere.
DEVICE_CASES = (("auto", True), ("cpu", True), ("cuda", True), ("cuda:1", True), ("gpu", False),
                ("cuda:x", False), ("", False), ("mps", False), ("cuda:", False), ("CUDA", False))


@pytest.mark.parametrize("name", sorted(SHARED["device"][0]))
def test_api_and_cli_accept_and_refuse_the_same_devices(name):
    """The dataclass (embed: EmbedConfig + the check embed_images runs first) and the CLI take
    one rule, fastssl.distributed.check_device; a refused name is a ValueError naming --device
    (the router prints it as one line), never torch's RuntimeError at pick_device."""
    from fastssl import distributed

    call, api_names = _api_for(name)
    assert "device" in api_names, name
    for value, inside in DEVICE_CASES:
        assert _cli_accepts(name, "device", value) is inside, (name, value)
        assert _api_accepts(call, "device", value) is inside, (name, value)
        if not inside:
            with pytest.raises(ValueError, match="^--device: "):
                distributed.pick_device(value)


def test_every_device_flag_has_the_one_help():
    """One help text for --device, the rule's own (fastssl.distributed.DEVICES)."""
    from fastssl.distributed import DEVICES

    helps = {name: next(a.help for a in _parser(name)._actions if a.dest == "device")
             for name in SHARED["device"][0]}
    assert len(set(helps.values())) == 1 and DEVICES in helps["pretrain"], helps
    assert "mps" not in helps["pretrain"]


def test_compare_runs_checks_its_settings_before_reading_the_runs(tmp_path):
    """compare's --alpha used to be checked by its run() only; the API now refuses it first."""
    from fastssl.eval.compare import compare_runs

    for bad, match in ((dict(alpha=1.0), "--alpha: got 1.0"), (dict(n_boot=0), "--n-boot: got 0")):
        with pytest.raises(ValueError, match=match):
            compare_runs(str(tmp_path / "a"), str(tmp_path / "b"), **bad)


def test_write_exemplar_grids_checks_its_settings_before_reading_the_tree(tmp_path):
    """grids' --per-cluster and --tile-px were checked by the CLI only; the API now refuses
    the same values first (the tree below does not exist)."""
    from fastssl.curation.tiles import write_exemplar_grids

    for bad, match in ((dict(tile_px=4097), "--tile-px: got 4097"), (dict(per_cluster=0), "--per-cluster: got 0"),
                       (dict(level=0), "--level: got 0")):
        with pytest.raises(ValueError, match=match):
            write_exemplar_grids(tmp_path / "curate", tmp_path / "emb", **{"level": 1, **bad})
