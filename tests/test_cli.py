"""The command router: --config files, overrides, strict values, user errors as one line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from fastssl import cli
from fastssl.config import Range, check_range, parse_bool


def _cli(argv, capsys, caplog):
    """(exit code, everything the user saw on stderr and in the log) of one in-process call."""
    caplog.clear()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err + caplog.text


def _fake_run(monkeypatch, name):
    seen = {}

    def run(args):
        seen.update(vars(args))
        print("banner: starting")
        return 0
    _, module = cli.command_parser(name)
    monkeypatch.setattr(module, "run", run)
    return seen


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_documents_its_flags_with_each_default_once(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--quiet" in out
    parser, _ = cli.command_parser(name)
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._get_help_string(action) or ""
        assert text.count("(default:") <= 1, (name, action.dest, text)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_numeric_flag_has_a_range(name):
    parser, _ = cli.command_parser(name)
    dests = {a.dest for a in parser._actions}
    ranges = cli.RANGES.get(name, {})
    assert set(ranges) <= dests, f"RANGES[{name!r}] names flags that do not exist: {set(ranges) - dests}"
    exempt = {"levels"}            # a list of counts, checked by curate's own parser
    for action in parser._actions:
        numeric = action.type in (int, float) or (
            isinstance(action.default, (int, float)) and not isinstance(action.default, bool))
        if numeric and action.dest not in exempt:
            assert action.dest in ranges, f"fastssl {name} --{action.dest} has no allowed range"


def test_range_and_bool_helpers():
    assert 0.5 in Range(0, 1) and 1 not in Range(0, 1, high_open=True) and 0 not in Range(0, low_open=True)
    for bad in (float("nan"), float("inf"), True, "3", None):
        assert bad not in Range()
    assert 2.0 in Range(1, integer=True) and 2.5 not in Range(1, integer=True)
    with pytest.raises(ValueError, match=r"^--clip-grad: got -1; allowed: a number >= 0$"):
        check_range("clip_grad", -1, Range(0))
    check_range("split_k", None, Range(1), optional=True)
    assert str(Range(0, 1, high_open=True, integer=True)) == "an integer in [0, 1)"
    for word, value in [("yes", True), ("No", False), ("on", True), ("OFF", False), ("true", True), (False, False)]:
        assert parse_bool(word, name="x") is value
    for bad in ("maybe", "1", 1, 0, None, "", "n"):
        with pytest.raises(ValueError, match="--fp64-accumulate: .* is not a boolean"):
            parse_bool(bad, name="fp64_accumulate")


def test_python_api_configs_check_the_same_ranges():
    from fastssl.eval.finetune import FinetuneConfig
    from fastssl.train.pretrain import PretrainConfig

    PretrainConfig(cache="c").resolved()
    with pytest.raises(ValueError, match=r"^--beta2: got 1.0; allowed: a number in \[0, 1\)$"):
        PretrainConfig(cache="c", beta2=1.0).resolved()
    with pytest.raises(ValueError, match=r"^--clip-grad: got -1.0; allowed: a number >= 0$"):
        FinetuneConfig(cache="c", checkpoint="k", clip_grad=-1.0).validate()


def test_config_supplies_a_required_flag_and_flags_override_it(tmp_path, monkeypatch):
    seen = _fake_run(monkeypatch, "pretrain")
    config = tmp_path / "c.yaml"
    config.write_text("cache: /data/cache\nepochs: 7\nbatch_size: 12\nbase_lr: 1\n")
    assert cli.main(["pretrain", "--config", str(config), "--epochs", "3"]) == 0
    assert seen["cache"] == "/data/cache"  # required flag, given by the file
    assert seen["epochs"] == 3  # the flag wins over the file
    assert seen["batch_size"] == 12
    assert seen["base_lr"] == 1.0 and isinstance(seen["base_lr"], float)


@pytest.mark.parametrize("text, value", [('"no"', False), ("'false'", False), ("no", False), ("off", False),
                                         ('"yes"', True), ("On", True), ("true", True)])
def test_config_booleans_are_strict_quoted_or_not(tmp_path, monkeypatch, text, value):
    seen = _fake_run(monkeypatch, "curate")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: [a.npy]\noverwrite: {text}\nfp64_accumulate: {text}\n")
    assert cli.main(["curate", "--config", str(config)]) == 0
    assert seen["overwrite"] is value and seen["fp64_accumulate"] is value


@pytest.mark.parametrize("text, match", [('overwrite: "maybe"', "--overwrite: 'maybe' is not a boolean"),
                                         ("overwrite: 1", "--overwrite: 1 is not a boolean"),
                                         ("split_k: 2.5", "--split-k: 2.5 is not an integer"),
                                         ("split_k: abc", "--split-k: invalid value 'abc'"),
                                         ("iterations: abc", "--iterations: 'abc' is not a number"),
                                         ("iterations: 10,x", "--iterations: '10,x' is not a number"),
                                         ("iterations: 10,0", "--iterations: got 0; allowed: an integer >= 1"),
                                         ("iterations: -4", "--iterations: got -4; allowed: an integer >= 1")])
def test_config_bad_values_are_one_line_errors(tmp_path, capsys, caplog, text, match):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: [a.npy]\n{text}\n")
    code, err = _cli(["curate", "--config", str(config)], capsys, caplog)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_a_runs_own_config_json_is_accepted_by_config(tmp_path, monkeypatch):
    from fastssl.train.pretrain import PretrainConfig

    saved = asdict(PretrainConfig(cache="/data/c", epochs=3, progress=False, augment=False))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved, indent=2))
    seen = _fake_run(monkeypatch, "pretrain")
    assert cli.main(["pretrain", "--config", str(path)]) == 0
    assert seen["quiet"] is True and seen["augment"] is False
    for key, value in saved.items():
        if key not in ("progress", "workers"):     # workers: clipped to this machine's cores
            assert seen[key] == value, key


def test_config_errors_name_the_file_and_key(tmp_path, capsys, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    for path, match in [(bad, "unknown keys ['no_such_flag']"), (tmp_path / "missing.yaml", "cannot read")]:
        code, err = _cli(["phantom", "--config", str(path)], capsys, caplog)
        assert code == 2 and match in err and str(path) in err
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    code, err = _cli(["phantom", "--config", str(notmap)], capsys, caplog)
    assert code == 2 and "expected a mapping" in err


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def test_shipped_curate_config_parses():
    """Every key of the example config is a flag of `fastssl curate`."""
    from importlib import resources

    import yaml

    text = resources.files("fastssl").joinpath("configs/curate_example.yaml").read_text()
    config = yaml.safe_load(text)
    parser, _ = cli.command_parser("curate")
    cli._apply_config(parser, config, "curate_example.yaml")  # raises on unknown keys
    assert config


def test_quiet_means_no_progress_and_workers_beyond_the_cores_are_clipped_without_warning(monkeypatch, capsys):
    import warnings

    from fastssl.config import config_from_args
    from fastssl.train.pretrain import PretrainConfig

    seen = _fake_run(monkeypatch, "pretrain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["pretrain", "--cache", "c", "--quiet", "--workers", "100000"]) == 0
    assert capsys.readouterr().err == ""
    assert 1 <= seen["workers"] <= (os.cpu_count() or 1)
    cfg = config_from_args(PretrainConfig, argparse.Namespace(**seen))
    assert cfg.progress is False and cfg.workers == seen["workers"]   # pretrain prints no banner


# --------------------------------------------------------------------------- user errors, every command

@pytest.fixture
def junk(tmp_path):
    """A file where a directory is expected, an empty .npy, a tree with no DICOM, a tile folder."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "nodicom" / "sub").mkdir(parents=True)
    (tmp_path / "nodicom" / "sub" / "notes.txt").write_text("not a DICOM")
    (tmp_path / "tiles").mkdir()
    np.save(tmp_path / "tiles" / "t.npy", np.random.default_rng(0).random((16, 16), dtype=np.float32))
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((50, 8), dtype=np.float32))
    return tmp_path


CASES = [   # (command line with {t} = the junk dir, words the one-line error must contain)
    ("phantom --out {t}/p --studies 0", "--studies: got 0"),
    ("phantom --out {t}/afile --studies 2", "--out {t}/afile: exists and is not a directory"),
    ("phantom --out {t}/p --both-views-fraction 1.5", "--both-views-fraction"),
    ("phantom --out {t}/afile/sub --studies 2", "Not a directory"),       # OSError, mapped by the router
    ("phantom --out {t}/p --studies 2 --split 1,x", "split"),              # ValueError, mapped by the router
    ("prepare --source {t}/nodicom --out {t}/afile", "is not a directory"),
    ("prepare --source {t}/nodicom --out {t}/c --workers -3", "--workers: got -3"),
    ("prepare --source {t}/nodicom --out {t}/c --size 100000", "--size: got 100000"),
    ("prepare --source {t}/nodicom --out {t}/c", "{t}/nodicom: no "),            # not an empty cache
    ("prepare --source {t}/missing --out {t}/c", "missing"),
    ("pretrain --cache {t}/c --device tpu", "--device: 'tpu'"),
    ("pretrain --cache {t}/c --clip-grad -1", "--clip-grad: got -1.0"),
    ("pretrain --cache {t}/c --mask-ratio 1", "--mask-ratio"),
    ("pretrain --cache {t}/missing --out {t}/r", "manifest.json"),
    ("probe --cache {t}/c --checkpoint {t}/missing.pt", "missing.pt"),
    ("probe --cache {t}/c --checkpoint {t}/x.npy --n-boot -1", "--n-boot"),
    ("finetune --cache {t}/c --checkpoint {t}/missing.pt --out {t}/f", "missing.pt"),
    ("finetune --cache {t}/c --checkpoint random:test --out {t}/f --layer-decay 0", "--layer-decay: got 0"),
    ("compare {t}/a {t}/b", "cannot read"),
    ("embed {t}/tiles --out {t}/e --model nosuchmodel --random-init", "--model 'nosuchmodel'"),
    ("embed {t}/tiles --out {t}/e --random-init --batch-size 0", "--batch-size: got 0"),
    ("embed {t}/missing --out {t}/e --random-init --model vit_tiny_patch16_224", "missing"),
    ("tile {t}/nodicom --out {t}/tt", "{t}/nodicom: no slides"),
    ("tile {t}/nodicom --out {t}/tt --mpp 0", "--mpp: got 0"),
    ("tile {t}/nodicom --out {t}/tt --min-tissue 2", "--min-tissue: got 2"),
    ("grids {t}/missing --embeddings {t}/e", "tree.json is missing"),
    ("grids {t}/missing --embeddings {t}/e --per-cluster 0", "--per-cluster: got 0"),
    ("curate --data {t}/x.npy --out {t}/k --target-size nan", "--target-size: got nan"),
    ("curate --data {t}/x.npy --out {t}/k --iterations -1", "--iterations: got -1"),
    ("curate --data {t}/x.npy --out {t}/k --resampling-steps 0", "--resampling-steps: got 0"),
    ("curate --data {t}/x.npy --out {t}/k --resampling-steps 1,10,-1", "--resampling-steps: got -1"),
    ("curate --data {t}/x.npy --out {t}/k --sample-size 0", "--sample-size: got 0"),
    ("curate --data {t}/x.npy --out {t}/k --levels abc", "--levels"),
    ("curate --data {t}/empty.npy --out {t}/k --levels 2", "error"),
    ("curate --data {t}/missing.npy --out {t}/k", "missing.npy"),
    ("finetune --cache {t}/c --checkpoint {t}/x.npy --epochs 0", "--epochs: got 0"),
    ("finetune --cache {t}/missing --checkpoint {t}/missing.pt --out {t}/f", "missing"),
    ("compare {t}/missing_a {t}/missing_b", "missing_a"),
    ("compare {t}/afile {t}/afile --alpha 1.5", "--alpha: got 1.5"),
    ("plot {t}/missing_run", "missing_run"),
    ("export {t}/missing.pt --cache {t}/c --out {t}/e.safetensors", "missing"),
    ("export {t}/x.npy --cache {t}/missing --out {t}/e.safetensors", "x.npy: not a fastssl checkpoint"),
    ("demo --out {t}/d --studies 0", "--studies: got 0"),
    ("demo --out {t}/d --target 0", "--target: got 0.0"),
    ("plot {t}/missing", "missing is not a directory"),
    ("plot {t}/nodicom --samples 0", "--samples: got 0"),
    ("export {t}/missing.pt --cache {t}/c --out {t}/x", "missing.pt"),
    ("export {t}/afile --cache {t}/missing --out {t}/x", "afile"),
    ("export {t}/afile --out {t}/afile", "--out {t}/afile: exists and is not a directory"),   # its --out is a folder
    ("export {t}/afile --out {t}/x --views frontal,side", "--views: 'frontal,side' is not a comma list"),
]


@pytest.mark.parametrize("line, words", CASES, ids=[c[0].split(" {")[0] + ":" + c[0].split()[-2] for c in CASES])
def test_user_errors_are_one_line_and_exit_2(junk, capsys, caplog, line, words):
    code, err = _cli(line.format(t=junk).split(), capsys, caplog)
    assert code == 2, err
    assert "Traceback" not in err and words.format(t=junk) in err, err


def test_every_command_is_driven_by_the_error_cases():
    assert {line.split()[0] for line, _ in CASES} == set(cli.COMMANDS)


def test_internal_errors_keep_their_traceback(monkeypatch):
    _, module = cli.command_parser("phantom")
    monkeypatch.setattr(module, "run", lambda args: {}["a bug"])
    with pytest.raises(KeyError):
        cli.main(["phantom", "--out", "x"])


def test_one_line_on_stderr_in_a_real_process(junk):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(cli.__file__)),
                                                       os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "fastssl", "phantom", "--out", str(junk / "afile")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fastssl phantom: error: --out")


@pytest.mark.parametrize("line, words", CASES, ids=[c[0].split(" {")[0] + ":" + c[0].split()[-2] for c in CASES])
def test_user_errors_reach_the_user_once_in_the_router_format(junk, capsys, caplog, line, words):
    """Caught once, by the router: one stderr line ``fastssl NAME: error: ...``, no log record of
    level ERROR beside it (a command that also logged the error would show it twice)."""
    caplog.clear()
    name = line.split()[0]
    try:
        code = cli.main(line.format(t=junk).split())
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"fastssl {name}: error: "), err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
