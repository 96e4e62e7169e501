"""The exported encoder is a timm checkpoint (issue 12.1) and embed resamples the position
embedding of weights trained at another image size (12.7)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
safetensors = pytest.importorskip("safetensors")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fastssl.models import mvmae  # noqa: E402
from fastssl.models.mvmae import VIEW_IDS, ViewEncoder, model_config  # noqa: E402
from fastssl.models import export  # noqa: E402
from fastssl.models.export import export_encoder, load_encoder, read_export_metadata  # noqa: E402

MANIFEST = {"pixel_mean": 0.4375, "pixel_std": 0.1875}
VIEWS = ("frontal", "lateral", "unknown")


class ClsViewEncoder(ViewEncoder):
    """MVMAE's released variant: the view embedding is added to CLS as well."""

    def forward_features(self, images, views=None):
        b = images.shape[0]
        view = self.view_embed(mvmae._view_ids(views, b, images.device))[:, None]  # (B, 1, D)
        x = self.vit.patch_embed(images) + self.vit.pos_embed[:, 1:] + view
        x = torch.cat([self._cls(b) + view, x], dim=1)
        return self.vit.norm(self.vit.blocks(x))


def _encoder(variant: str, seed: int = 0) -> ViewEncoder:
    """A trained-looking test encoder: every parameter random (no zero biases / embeddings).

    variant: "mvmae" (the released recipe: qk-norm, no CLS position row), "mae" (CLS
    position row, no qk-norm), "cls" (the view embedding added to CLS too)."""
    torch.manual_seed(seed)
    cfg = model_config("test", recipe="mae" if variant == "mae" else "mvmae")
    enc = ClsViewEncoder(cfg) if variant == "cls" else ViewEncoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc.eval()


def _timm_from_file(path: str):
    """The README's lines."""
    meta = safetensors.safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True, **json.loads(meta["timm_kwargs"]),
                              pretrained_cfg_overlay=dict(file=path, **json.loads(meta["pretrained_cfg"])))
    model.norm.eps = float(meta["final_norm_eps"])
    return model


@pytest.mark.parametrize("variant", ["mvmae", "mae", "cls"])
def test_timm_reproduces_fastssl_features_for_every_view(tmp_path, variant):
    enc = _encoder(variant)
    paths = export_encoder(enc, enc.cfg, str(tmp_path / "encoder.safetensors"), manifest=MANIFEST, views=VIEWS)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "encoder.safetensors", "encoder_lateral.safetensors", "encoder_unknown.safetensors"]
    images = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    features = {}
    for path, view in zip(paths, VIEWS):
        model = _timm_from_file(path).eval()
        with torch.no_grad():
            ours = enc(images, views=VIEW_IDS[view])
            features[view] = model(images)
        assert (features[view] - ours).abs().max().item() < 1e-5, view
    # the views really differ: a file that ignored its view would fail above
    assert (features["frontal"] - features["lateral"]).abs().max().item() > 1e-2


def test_file_is_exactly_a_timm_state_dict_with_its_metadata(tmp_path):
    enc = _encoder("mvmae")
    path = export_encoder(enc, enc.cfg, str(tmp_path / "encoder.safetensors"), manifest=MANIFEST)[0]
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
    kwargs = read_export_metadata(path)["timm_kwargs"]
    assert keys == set(VisionTransformer(**kwargs).state_dict())
    meta = read_export_metadata(path)
    assert meta["view"] == "frontal" and meta["img_size"] == "32" and meta["in_chans"] == "1"
    assert float(meta["pixel_mean"]) == 0.4375 and float(meta["pixel_std"]) == 0.1875
    assert meta["model_config"] == json.loads(json.dumps(enc.cfg.__dict__))
    data = timm.data.resolve_data_config(model=_timm_from_file(path))
    assert tuple(data["input_size"]) == (1, 32, 32) and tuple(data["mean"]) == (0.4375,)
    assert tuple(data["std"]) == (0.1875,)
    # pos_embed holds the frontal view row on the patch rows; its CLS row is 0 (the released
    # encoder adds no position to CLS: its trained row is not used, here it is random)
    with safetensors.safe_open(path, "pt") as f:
        pos = f.get_tensor("pos_embed")
    frontal = enc.view_embed.weight[VIEW_IDS["frontal"]].detach()
    assert torch.equal(pos[0, 1:], enc.vit.pos_embed[0, 1:].detach() + frontal)
    assert not enc.cfg.cls_pos_embed and enc.vit.pos_embed[0, 0].abs().max() > 0.01
    assert torch.equal(pos[0, 0], torch.zeros_like(pos[0, 0]))


def test_load_encoder_rebuilds_the_encoder_bit_for_bit(tmp_path):
    enc = _encoder("mvmae")
    for path in export_encoder(enc, enc.cfg, str(tmp_path / "enc.safetensors"), manifest={}, views=VIEWS):
        back = load_encoder(path)
        assert back.state_dict().keys() == enc.state_dict().keys()
        for k, v in enc.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), (path, k)


def test_load_encoder_reads_the_older_layout(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    enc = _encoder("mvmae")
    path = str(tmp_path / "old.safetensors")
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, path,
              metadata={"format": "fastssl.ViewEncoder", "model_config": json.dumps(asdict(enc.cfg))})
    back = load_encoder(path)
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_wrong_fold_is_caught_at_export(tmp_path, monkeypatch):
    # planted bug: the CLS variant folded as if the view embedding reached the patches only
    monkeypatch.setattr(export, "_cls_terms", lambda encoder: (False, False))
    enc = _encoder("cls")
    with pytest.raises(RuntimeError, match="differ from fastssl's"):
        export_encoder(enc, enc.cfg, str(tmp_path / "encoder.safetensors"), manifest=MANIFEST)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_cls_token_that_is_not_additive_is_refused(tmp_path):
    class Doubled(ViewEncoder):
        def _cls(self, batch):
            return 2 * super()._cls(batch)

    torch.manual_seed(0)
    enc = Doubled(model_config("test")).eval()
    with pytest.raises(ValueError, match="cannot be folded"):
        export_encoder(enc, enc.cfg, str(tmp_path / "encoder.safetensors"), manifest=MANIFEST)


def test_bad_arguments(tmp_path):
    enc = _encoder("mvmae")
    out = str(tmp_path / "e.safetensors")
    with pytest.raises(TypeError, match="manifest"):
        export_encoder(enc, enc.cfg, out, manifest=None)
    with pytest.raises(ValueError, match="views="):
        export_encoder(enc, enc.cfg, out, manifest={}, views="frontal")
    with pytest.raises(ValueError, match="view='side'"):
        export_encoder(enc, enc.cfg, out, manifest={}, views=("side",))


# ------------------------------------------------------------------ 12.7: embed --img-size
def test_embed_resamples_pos_embed_like_timm(tmp_path, caplog):
    from safetensors.torch import save_file

    from fastssl.curation.embed import embed_images

    torch.manual_seed(0)
    trained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1)
    weights = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, weights)
    tiles = np.random.default_rng(0).integers(0, 256, size=(6, 48, 48), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", tiles)
    with caplog.at_level(logging.INFO, logger="fastssl.curation.embed"):
        embed_images(tmp_path / "tiles.npy", tmp_path / "emb", model="vit_tiny_patch16_224", weights=weights,
                     img_size=64, in_chans=1, workers=0, batch_size=6, quiet=True)
    assert "resampled from a 14x14 to a 4x4 patch grid" in caplog.text
    got = np.load(tmp_path / "emb" / "emb_00000.npy")
    # timm's own loader at 64 px (its checkpoint filter resamples the same way)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, in_chans=1, img_size=64,
                            pretrained_cfg_overlay=dict(file=weights, input_size=(1, 224, 224))).eval()
    x = torch.from_numpy(tiles).float()[:, None] / 255
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    mean, std = float(np.mean(ref.pretrained_cfg["mean"])), float(np.mean(ref.pretrained_cfg["std"]))
    with torch.no_grad():
        want = ref((x - mean) / std).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=2e-3)


def test_cli_exports_every_view_from_a_checkpoint(tmp_path, capsys):
    from dataclasses import asdict

    from fastssl.cli import main as cli

    enc = _encoder("mvmae")
    torch.save(dict(model={f"encoder.{k}": v for k, v in enc.state_dict().items()}, model_config=asdict(enc.cfg)),
               tmp_path / "checkpoint.pt")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(MANIFEST))
    out = tmp_path / "export"
    assert cli(["export", str(tmp_path / "checkpoint.pt"), "--cache", str(tmp_path / "cache"), "--out", str(out),
                "--views", "frontal,lateral"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "encoder.safetensors"),
                                               str(out / "encoder_lateral.safetensors")]
    meta = read_export_metadata(str(tmp_path / "export" / "encoder_lateral.safetensors"))
    assert meta["view"] == "lateral" and float(meta["pixel_std"]) == MANIFEST["pixel_std"]
    assert cli(["export", str(tmp_path / "nope.pt"), "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 2


def test_embed_with_an_export_uses_its_architecture_and_normalisation(tmp_path):
    """`fastssl embed --weights encoder.safetensors` gives the exported encoder's features:
    architecture (qk-norm, final norm eps) and pixel mean/std come from the file, not from
    --model and the timm model's defaults."""
    from fastssl.curation.embed import embed_images
    from fastssl.models.mvmae import ModelConfig

    torch.manual_seed(0)
    enc = ViewEncoder(ModelConfig(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3)).eval()
    path = export_encoder(enc, enc.cfg, str(tmp_path / "encoder.safetensors"), manifest=MANIFEST)[0]
    tiles = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", tiles)
    assert enc.cfg.qk_norm and enc.cfg.final_norm_eps == 1e-5  # the mvmae recipe's, not timm's defaults
    with pytest.raises(ValueError, match="pass --in-chans 1"):
        embed_images(tmp_path / "tiles.npy", tmp_path / "bad", model="vit_large_patch16_224", weights=path,
                     in_chans=3, workers=0, quiet=True)
    embed_images(tmp_path / "tiles.npy", tmp_path / "emb", model="vit_large_patch16_224", weights=path,
                 in_chans=1, workers=0, quiet=True)
    got = np.load(tmp_path / "emb" / "emb_00000.npy").astype(np.float32)
    x = (torch.from_numpy(tiles).float()[:, None] / 255 - MANIFEST["pixel_mean"]) / MANIFEST["pixel_std"]
    with torch.no_grad():
        want = enc(x, views=VIEW_IDS["frontal"]).numpy()
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=5e-3)


def test_cli_export_writes_the_training_normalisation(tmp_path, caplog, capsys):
    """`fastssl export` writes the pixel mean/std the run trained with: its
    --pixel-mean/--pixel-std when set, else its training cache's manifest, never the
    --cache given at export when those differ (one line says so); no record and no --cache
    is a one-line error. Planted: the old rule (the --cache manifest) -> this test fails."""
    from dataclasses import asdict

    from fastssl.cli import main as cli

    enc = _encoder("mvmae")
    train_cache, other = tmp_path / "train_cache", tmp_path / "other"
    for d, m in ((train_cache, {"pixel_mean": 0.5625, "pixel_std": 0.3125}), (other, MANIFEST)):
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(m))
    model = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    for name, settings, want in (("given.pt", dict(pixel_mean=0.25, pixel_std=0.125), (0.25, 0.125)),
                                 ("cache.pt", dict(pixel_mean=-1.0, pixel_std=-1.0), (0.5625, 0.3125))):
        torch.save(dict(model=model, model_config=asdict(enc.cfg), config=dict(cache=str(train_cache), **settings)),
                   tmp_path / name)
        for extra in (["--cache", str(other)], []):
            out = tmp_path / f"export_{name}_{len(extra)}"
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert cli(["export", str(tmp_path / name), "--out", str(out), *extra]) == 0
            meta = read_export_metadata(str(out / "encoder.safetensors"))
            assert (float(meta["pixel_mean"]), float(meta["pixel_std"])) == want, (name, extra)
            assert meta["pretrained_cfg"]["mean"] == [want[0]] and meta["pretrained_cfg"]["std"] == [want[1]]
            assert ("not this cache's 0.4375 / 0.1875" in caplog.text) == bool(extra)
    torch.save(dict(model=model, model_config=asdict(enc.cfg), config=dict(cache=str(tmp_path / "gone"))),
               tmp_path / "gone.pt")
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "records no training normalisation" in err and "pass --cache" in err
    assert cli(["export", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "x"), "--cache", str(other)]) == 0
    assert float(read_export_metadata(str(tmp_path / "x" / "encoder.safetensors"))["pixel_mean"]) == 0.4375


def test_cli_export_out_is_a_job_resumed_refused_or_overwritten(tmp_path, capsys):
    """--out is opened by fastssl.jobs.open_job: the same command rewrites equal files; other
    views, a checkpoint that trained on or another normalisation (its training cache's manifest
    changed) are refused naming them, touching nothing, while an unused --cache (the checkpoint
    records its normalisation) changes nothing and resumes; --overwrite empties
    the folder (no encoder_lateral.safetensors of the previous export is left); a foreign
    folder and a held lock are refused. Planted: --views, the checkpoint's fingerprint or the
    written normalisation left out of job.json -> this test fails."""
    from dataclasses import asdict

    from fastssl import jobs
    from fastssl.cli import main as cli

    enc = _encoder("mvmae")
    ckpt, train_cache, out = tmp_path / "checkpoint.pt", tmp_path / "train_cache", tmp_path / "export"
    train_cache.mkdir()
    (train_cache / "manifest.json").write_text(json.dumps({"pixel_mean": 0.5625, "pixel_std": 0.3125}))

    def save(encoder):
        torch.save(dict(model={f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                        model_config=asdict(encoder.cfg), config=dict(cache=str(train_cache))), ckpt)

    def export(*extra, where=out):
        capsys.readouterr()
        code = cli(["export", str(ckpt), "--out", str(where), "--quiet", *extra])
        return code, capsys.readouterr().err

    def files(where=out):
        """{name: bytes} of what --out holds; a safetensors file as (metadata, tensors as
        numpy): its header's key order changes from one write to the next."""
        from safetensors.numpy import load_file

        return {p.name: (read_export_metadata(str(p)), load_file(str(p))) if p.suffix == ".safetensors"
                else p.read_bytes() for p in where.iterdir() if p.name != jobs.LOCK_NAME}

    def stamps(where=out):
        return {p.name: p.stat().st_mtime_ns for p in where.iterdir() if p.name != jobs.LOCK_NAME}

    def same(a, b):
        return a.keys() == b.keys() and all(
            a[k] == b[k] if isinstance(a[k], bytes) else
            a[k][0] == b[k][0] and a[k][1].keys() == b[k][1].keys() and
            all(np.array_equal(a[k][1][t], b[k][1][t]) for t in a[k][1]) for k in a)

    save(enc)
    assert export("--views", "frontal,lateral") == (0, "")
    first = files()
    assert set(first) == {"job.json", "encoder.safetensors", "encoder_lateral.safetensors"}
    assert json.loads(first["job.json"])["settings"]["pixel_mean"] == 0.5625 and first["encoder.safetensors"][1]
    (out / "encoder.safetensors").unlink()                 # a rerun rewrites: the file comes back, equal
    assert export("--views", "frontal,lateral") == (0, "") and same(files(), first)
    other_cache = tmp_path / "other"
    other_cache.mkdir()
    (other_cache / "manifest.json").write_text(json.dumps(MANIFEST))
    assert export("--views", "frontal,lateral", "--cache", str(other_cache)) == (0, "") and same(files(), first)
    before = stamps()
    code, err = export("--views", "frontal")
    assert code == 2 and err.startswith("fastssl export: error: ") and 'views: "frontal,lateral" -> "frontal"' in err
    assert "--overwrite" in err and stamps() == before, err      # refused before any write
    (train_cache / "manifest.json").write_text(json.dumps({"pixel_mean": 0.5, "pixel_std": 0.3125}))
    code, err = export("--views", "frontal,lateral")
    assert code == 2 and "pixel_mean: 0.5625 -> 0.5" in err, err
    (train_cache / "manifest.json").write_text(json.dumps({"pixel_mean": 0.5625, "pixel_std": 0.3125}))
    save(_encoder("mvmae", seed=1))                         # the run trained on: same name, other weights
    code, err = export("--views", "frontal,lateral")
    assert code == 2 and f"input {ckpt}: " in err and stamps() == before, err
    assert export("--views", "lateral", "--overwrite") == (0, "")
    assert set(files()) == {"job.json", "encoder.safetensors"}
    assert read_export_metadata(str(out / "encoder.safetensors"))["view"] == "lateral"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = export(where=foreign)
    assert code == 2 and "is not empty and has no job.json" in err and files(foreign) == {"notes.txt": b"mine"}
    held = tmp_path / "held"
    with jobs.OutputLock(held):
        code, err = export(where=held)
    assert code == 2 and "is in use by another job" in err and os.listdir(held) == [jobs.LOCK_NAME]
