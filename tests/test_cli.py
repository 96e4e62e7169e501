"""The command router: --config files, overrides, errors."""
from __future__ import annotations

import pytest

from fastssl import cli


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_documents_its_flags(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--quiet" in out


def test_config_supplies_a_required_flag_and_flags_override_it(tmp_path, monkeypatch):
    seen = {}

    def run(args):
        seen.update(vars(args))
        return 0

    parser, module = cli.command_parser("pretrain")
    monkeypatch.setattr(module, "run", run)
    config = tmp_path / "c.yaml"
    config.write_text("cache: /data/cache\nepochs: 7\nbatch_size: 12\n")
    assert cli.main(["pretrain", "--config", str(config), "--epochs", "3"]) == 0
    assert seen["cache"] == "/data/cache"  # required flag, given by the file
    assert seen["epochs"] == 3  # the flag wins over the file
    assert seen["batch_size"] == 12


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit, match="unknown keys \\['no_such_flag'\\]"):
        cli.main(["phantom", "--config", str(bad)])
    with pytest.raises(SystemExit, match="cannot read"):
        cli.main(["phantom", "--config", str(tmp_path / "missing.yaml")])
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match="expected a mapping"):
        cli.main(["phantom", "--config", str(notmap)])


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_shipped_curate_config_parses():
    """Every key of the example config is a flag of `fastssl curate`."""
    from importlib import resources

    import yaml

    text = resources.files("fastssl").joinpath("configs/curate_example.yaml").read_text()
    config = yaml.safe_load(text)
    parser, _ = cli.command_parser("curate")
    cli._apply_config(parser, config, "curate_example.yaml")  # raises on unknown keys
    assert config
