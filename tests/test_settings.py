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


def _per_level(name: str) -> tuple:
    """The command's per-level settings (curate: one value, or a comma list with one per level)."""
    return getattr(cli.command_parser(name)[1], "PER_LEVEL", ())


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
    if cls is not None:   # a per-level setting's flag takes a comma list: checked by its command (test below)
        declared = {k: v for k, v in declared_choices(cls).items() if k not in _per_level(name)}
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


def _yaml_args(name: str, values: dict, tmp_path) -> argparse.Namespace | None:
    """The checked flags of ``fastssl NAME --config FILE`` whose YAML holds ``values`` (the
    command's other required flags as placeholders), or None when the router refuses them."""
    import yaml

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(values))
    try:
        args, _ = cli._parse(name, _required_argv(_parser(name), next(iter(values))) + ["--config", str(config)])
        cli.check_args(name, args)
    except SystemExit as exc:
        assert exc.code == 2
        return None
    except ValueError:
        return None
    return args


# Composite settings (declared with parse=): values each must accept and refuse, the same way
# through a flag (a list as its comma text), a --config file (the text or a YAML list) and the API.
COMPOSITE = {
    ("prepare", "holdout"): (["0.1,0.2", "0,0", " 0.3 , 0.1 ", [0.3, 0.1], [0, 0.999]],
                             ["0.5", "0.5,0.5", "0.6,0.4", "-0.1,0.1", "nan,0.1", "a,b", "0.1,0.1,0.1", [0.5], [1, 0]]),
    ("prepare", "frontal_order"): (["PA", "ap, pa", ["AP", "PA"]], [",", " ", []]),
    ("prepare", "lateral_views"): (["LATERAL", "ll,lateral", ["LL"]], [",", []]),
}


def test_every_composite_setting_has_cases():
    declared = {(name, f.name) for name in DECLARED for f in dataclasses.fields(_settings_class(name))
                if "parse" in f.metadata}
    assert declared == set(COMPOSITE)


@pytest.mark.parametrize("name, setting", sorted(COMPOSITE))
def test_api_and_cli_accept_and_refuse_the_same_composite_values(name, setting, tmp_path):
    """A composite value ("0.05,0.05", a view list) is parsed and checked by one function: a
    flag, a --config value (text or list) and the API accept the same values, as the same value."""
    call, _ = _api_for(name)
    for values, inside in ((COMPOSITE[name, setting][0], True), (COMPOSITE[name, setting][1], False)):
        for value in values:
            text = value if isinstance(value, str) else ",".join(map(str, value))
            assert _cli_accepts(name, setting, text) is inside, (setting, text)
            args = _yaml_args(name, {setting: value}, tmp_path)
            assert (args is not None) is inside, (setting, value)
            assert _api_accepts(call, setting, value) is inside, (setting, value)
            if inside:   # the same value, whichever way it came
                assert getattr(args, setting) == getattr(call(**{setting: value}), setting), (setting, value)


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


def _curate_cli_config(values: dict, tmp_path, *, yaml: bool):
    """The tree config of `fastssl curate` given ``values`` as flags (a list as its comma text)
    or in a --config file: past the router's checks and tree_config (the per-level parse and
    checks curate's run starts with); None when refused."""
    from fastssl.train.curate import tree_config

    if yaml:
        args = _yaml_args("curate", values, tmp_path)
    else:
        argv = [text for key, value in values.items()
                for text in ("--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, list)
                             else str(value))]
        try:
            args = _parser("curate").parse_args(argv)
            cli.check_args("curate", args)
        except SystemExit as exc:
            assert exc.code == 2
            args = None
        except ValueError:
            args = None
    try:
        return None if args is None else tree_config(args)
    except ValueError as exc:
        assert "--" + next(iter(values)).replace("_", "-") in str(exc), exc   # names the flag
        return None


def _per_level_cases(setting: str) -> tuple[list[tuple[object, bool]], object]:
    """(value, allowed?) cases of a per-level setting from its declaration, and a value it allows."""
    from fastssl.train.curate import CurateConfig

    if setting in declared_ranges(CurateConfig):
        allowed = declared_ranges(CurateConfig)[setting]
        return _boundaries(allowed), int(allowed.low)
    allowed = declared_choices(CurateConfig)[setting]
    others = {v for c in declared_choices(CurateConfig).values() for v in c} - set(allowed)  # e.g. "furthest"
    return [(v, True) for v in allowed] + [(v, False) for v in (*sorted(others), "nonsense")], allowed[0]


@pytest.mark.parametrize("setting", _per_level("curate"))
def test_curate_per_level_settings_are_checked_alike_as_a_scalar_and_in_a_list(setting, tmp_path):
    """curate's per-level settings take one value or one per level: a value outside the declared
    range (or choices) is refused by the flag, the --config file and the API, given once or
    inside a per-level list; a value inside reaches its level (or every level) the same way."""
    from fastssl.curation.hierarchical import HierarchicalConfig
    from fastssl.train.curate import per_level

    cases, ok = _per_level_cases(setting)
    for value, inside in cases:
        for yaml in (False, True):
            once = _curate_cli_config({setting: value, "levels": [8, 4, 2]}, tmp_path, yaml=yaml)
            listed = _curate_cli_config({setting: [ok, value, ok], "levels": [8, 4, 2]}, tmp_path, yaml=yaml)
            assert (once is not None, listed is not None) == (inside, inside), (setting, value, yaml)
            if inside:
                assert getattr(once, setting) == value and getattr(listed.levels[1], setting) == value
        # curate's per-level parse on its own (tree_config runs it; callable without the router)
        for given, n_levels in ((value, 1), ([ok, value, ok], 3)):
            parse = functools.partial(per_level, n_levels=n_levels)
            assert _api_accepts(lambda **s: parse(setting, s[setting]), setting, given) is inside, (setting, given)
        levels = [{"k": 8, setting: ok}, {"k": 4, setting: value}, {"k": 2, setting: ok}]
        assert _api_accepts(lambda **s: HierarchicalConfig(levels=[8, 4, 2], **s).validate(), setting,
                            value) is inside, (setting, value)
        assert _api_accepts(lambda **s: HierarchicalConfig(levels=levels).validate(), setting,
                            value) is inside, (setting, value, "per level")


# curate flags that reach every KMeansConfig but allow other values, and why.
TREE_ONLY = {"iterations": "a tree level runs >= 1 Lloyd iteration; a lone k-means may run 0 (its start only)"}


def test_curate_flags_passed_to_kmeans_allow_what_kmeans_allows():
    """--init, --empty, --memory-budget-mb, ... reach every k-means of the tree: the curate CLI
    and KMeansConfig (the API of one k-means) accept and refuse the same values."""
    from fastssl.curation.kmeans import KMeansConfig

    flags = {a.dest for a in _parser("curate")._actions}

    def kmeans_accepts(name, value) -> bool:
        try:
            KMeansConfig(k=1, **{name: value})
        except ValueError as exc:
            assert name in str(exc), exc
            return False
        return True

    cli_choices = {a.dest: a.choices for a in _parser("curate")._actions if a.choices}
    passed = (set(declared_ranges(KMeansConfig)) | set(declared_choices(KMeansConfig))) & flags
    assert passed >= {"init", "empty", "nonfinite", "impl", "precision", "memory_budget_mb", "init_sample_size"}
    for name in sorted(passed - set(TREE_ONLY)):
        if name in declared_ranges(KMeansConfig):
            cases = _boundaries(declared_ranges(KMeansConfig)[name])
        else:   # each value either side offers, and one neither does
            allowed = declared_choices(KMeansConfig)[name]
            cases = [(v, v in allowed) for v in (*allowed, *cli_choices.get(name, ()), "nonsense")]
        for value, inside in cases:
            assert _cli_accepts("curate", name, str(value)) is inside, (name, value)
            assert kmeans_accepts(name, value) is inside, (name, value)


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
    assert cache._check_settings(str(tmp_path / "out"), cache.PrepareConfig()) == 3

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
