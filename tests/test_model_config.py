"""ModelConfig's rules live in one place (ModelConfig.validate): every entry point that
builds a model config (the dataclass itself, model_config, MultiViewMAE, pretrain's
resolved settings, load_encoder, the evaluations' random:PRESET encoder) goes through it
and fails with the same message, written out here by hand."""
from __future__ import annotations

import warnings
from dataclasses import asdict

import pytest
import torch

from fastssl.eval.probe import load_eval_encoder
from fastssl.models.export import load_encoder
from fastssl.models.mvmae import ModelConfig, MultiViewMAE, ViewEncoder, check_model_config, model_config
from fastssl.train.pretrain import PretrainConfig

# The "test" preset: img 32, patch 8, embed_dim 32 (2 heads); decoder 32 x 2 heads.
_IMG_RULE = "img_size=36 is not a multiple of patch_size=8"
_DECODER_WIDTH_RULE = "decoder_dim=48 differs from embed_dim=32: that needs decoder_embed=True (a projection)"
_DECODER_HEADS_RULE = "decoder_dim=32 is not a multiple of decoder_heads=3"


def _pretrain(tmp_path, **kw):
    return PretrainConfig(cache=str(tmp_path), out=str(tmp_path / "out"), preset="test", **kw).resolved()


def _checkpoint_with(tmp_path, **fields):
    """A checkpoint.pt whose stored model_config has ``fields`` replaced (as a run of an
    older or hand-edited file would carry)."""
    enc = ViewEncoder(model_config("test"))
    path = str(tmp_path / "checkpoint.pt")
    torch.save(dict(model={f"encoder.{k}": v for k, v in enc.state_dict().items()},
                    model_config=dict(asdict(enc.cfg), **fields)), path)
    return path


_ENCODER_ENTRY_POINTS = {
    "ModelConfig": lambda tmp: ModelConfig(img_size=36, patch_size=8, embed_dim=32, num_heads=2),
    "model_config": lambda tmp: model_config("test", img_size=36),
    "pretrain": lambda tmp: _pretrain(tmp, img_size=36),
    "load_encoder": lambda tmp: load_encoder(_checkpoint_with(tmp, img_size=36)),
    "random encoder": lambda tmp: load_eval_encoder("random:test:36"),
}
_DECODER_ENTRY_POINTS = {
    "model_config": lambda tmp, **kw: model_config("test", **kw),
    "MultiViewMAE": lambda tmp, **kw: MultiViewMAE(ModelConfig(**dict(asdict(model_config("test")), **kw))),
    "pretrain": lambda tmp, **kw: _pretrain(tmp, **kw),
}


@pytest.mark.parametrize("entry", sorted(_ENCODER_ENTRY_POINTS))
def test_every_entry_point_gives_the_encoder_rules_message(entry, tmp_path):
    with pytest.raises(ValueError) as err:
        _ENCODER_ENTRY_POINTS[entry](tmp_path)
    assert str(err.value) == _IMG_RULE


@pytest.mark.parametrize("entry", sorted(_DECODER_ENTRY_POINTS))
@pytest.mark.parametrize("override, message", [(dict(decoder_dim=48), _DECODER_WIDTH_RULE),
                                               (dict(decoder_heads=3), _DECODER_HEADS_RULE)])
def test_every_model_entry_point_gives_the_decoder_rules_message(entry, override, message, tmp_path):
    with pytest.raises(ValueError) as err:
        _DECODER_ENTRY_POINTS[entry](tmp_path, **override)
    assert str(err.value) == message


@pytest.mark.parametrize("entry", sorted(_DECODER_ENTRY_POINTS))
def test_every_model_entry_point_calls_the_one_validate(entry, tmp_path, monkeypatch):
    """A copy of the rules elsewhere would pass a config that validate() refuses: make
    validate() refuse a config every copy accepts, and each entry point must refuse it."""
    original = ModelConfig.validate

    def stricter(self, decoder=True):
        original(self, decoder)
        if decoder and self.decoder_depth == 3:
            raise ValueError("decoder_depth=3 refused by the one validate()")

    monkeypatch.setattr(ModelConfig, "validate", stricter)
    with pytest.raises(ValueError, match=r"^decoder_depth=3 refused by the one validate\(\)$"):
        _DECODER_ENTRY_POINTS[entry](tmp_path, decoder_depth=3)


def test_an_encoder_only_config_skips_the_decoder_rules():
    """A loaded encoder keeps ModelConfig's default decoder (768 wide, no projection), which
    a full model with embed_dim 192 would refuse: construction checks the encoder only."""
    cfg = ModelConfig(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3)
    assert cfg.num_patches == 4
    with pytest.raises(ValueError, match="^decoder_dim=768 differs from embed_dim=192"):
        cfg.validate()
    with pytest.raises(ValueError, match="^embed_dim=192 is not a multiple of num_heads=5$"):
        ModelConfig(embed_dim=192, num_heads=5)


def test_check_model_config_is_a_deprecated_alias():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_model_config(model_config("test"))
    assert [w.category for w in seen] == [DeprecationWarning]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="^temperature=0.0; expected > 0$"):
        check_model_config(_unchecked(temperature=0.0))


def _unchecked(**fields) -> ModelConfig:
    """A ModelConfig built without its construction check (as a caller could by
    object.__setattr__), to see the alias still applies the rules."""
    cfg = model_config("test")
    for k, v in fields.items():
        object.__setattr__(cfg, k, v)
    return cfg
