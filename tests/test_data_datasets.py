"""Datasets over the cache (shapes, pairing, epoch draws, label policy) and the batch
augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicom_factory import make_mimic
from fastssl.data.augment import BatchAugment, CenterResize, to_unit
from fastssl.data.cache import open_shard, prepare_cache
from fastssl.data.datasets import VIEW_IDS, PairedViewDataset, SingleViewDataset, StudyViewsDataset, make_loader

STUDIES = [
    ("10000001", "50000001", ["PA", "LATERAL"]),
    ("10000001", "50000002", ["AP", "PA", "LL", "LATERAL"]),  # 2 x 2 choices
    ("10000002", "50000003", ["AP"]),
    ("10000003", "50000004", ["LATERAL"]),
    ("10000004", "50000005", [None, "PA", "LATERAL"]),
    ("11000006", "50000007", ["PA", "LATERAL", None]),
    ("11000007", "50000008", ["PA", "LL"]),
]
SPLITS = {"50000008": "test"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    make_mimic(root, STUDIES, size=20, splits=SPLITS)
    out = {}
    for name, kwargs in {"zeros": {}, "ignore": dict(uncertain="ignore", blank="ignore"),
                         "u16": dict(dtype="uint16")}.items():
        out[name] = str(root / f"cache_{name}")
        prepare_cache(root, out[name], size=16, shard_size=4, workers=1, progress=False, **kwargs)
    return out


def test_single_view_shapes_and_filters(caches):
    ds = SingleViewDataset(caches["zeros"], split="train")
    assert len(ds) == 14  # 16 images, 2 in the test split
    image, labels, study, view = ds[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.uint8
    assert labels.shape == (14,) and labels.dtype == torch.int8
    assert study.dtype == torch.int64 and view.dtype == torch.int64
    assert len(SingleViewDataset(caches["zeros"], split="train", views="frontal")) == 6
    assert len(SingleViewDataset(caches["zeros"], split=None, views=("frontal", "lateral"))) == 14
    assert len(SingleViewDataset(caches["zeros"], split="test")) == 2
    with pytest.raises(ValueError, match="views"):
        SingleViewDataset(caches["zeros"], views="oblique")
    with pytest.raises(ValueError, match="split"):
        SingleViewDataset(caches["zeros"], split="holdout")
    # a batch is the stack of its items, gathered from several shards at once
    idx = [13, 0, 7, 3, 3]
    batch = ds[idx]
    for b, i in enumerate(idx):
        for got, want in zip(batch, ds[i]):
            assert torch.equal(got[b], want)
    # the pixels are the shard's
    row = ds.rows[7]
    np.testing.assert_array_equal(batch[0][2, 0].numpy(), open_shard(caches["zeros"], ds.index.shard[row])[ds.index.offset[row]])
    items = ds.__getitems__(idx)
    assert len(items) == 5 and torch.equal(items[2][0], batch[0][2])


def test_label_policy_reaches_the_dataset(caches):
    zeros = SingleViewDataset(caches["zeros"], split=None)
    ignore = SingleViewDataset(caches["ignore"], split=None)
    lz, li = zeros[np.arange(len(zeros))][1], ignore[np.arange(len(ignore))][1]
    assert set(lz.unique().tolist()) <= {0, 1} and -1 in li.unique().tolist()
    assert torch.equal(lz, li.clamp(min=0))  # only the -1 (uncertain/blank) entries differ
    u16 = SingleViewDataset(caches["u16"], split=None)
    assert u16[0][0].dtype == torch.uint16


def test_paired_dataset_pairs_and_epoch_draws(caches):
    ds = PairedViewDataset(caches["zeros"], split="train", seed=3)
    assert sorted(ds.study_ids.tolist()) == ["50000001", "50000002", "50000005", "50000007"]
    frontal, lateral, labels, study = ds[np.arange(len(ds))]
    assert frontal.shape == lateral.shape == (4, 1, 16, 16) and labels.shape == (4, 14)
    assert study.tolist() == [0, 1, 2, 3]
    # the drawn images are of the right view and of the right study
    f_rows, l_rows = ds.choose(np.arange(len(ds)))
    assert (ds.index.view[f_rows] == "frontal").all() and (ds.index.view[l_rows] == "lateral").all()
    assert (ds.index.study_id[f_rows] == ds.study_ids).all() and (ds.index.study_id[l_rows] == ds.study_ids).all()
    # same (seed, epoch) -> same draw, in any process; epochs explore every image
    s2 = int(np.flatnonzero(ds.study_ids == "50000002")[0])
    draws = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        f, l = ds.choose(np.array([s2]))
        assert (f, l) == ds.choose(np.array([s2]), epoch=epoch)
        draws.add((int(f[0]), int(l[0])))
    assert len(draws) == 4  # 2 frontal x 2 lateral
    other = PairedViewDataset(caches["zeros"], split="train", seed=4)
    assert any(ds.choose(np.array([s2]), e) != other.choose(np.array([s2]), e) for e in range(10))
    pref = PairedViewDataset(caches["zeros"], split="train", preferred_only=True)
    f, _ = pref.choose(np.array([s2]))
    assert pref.index.view_position[f[0]] == "PA"
    assert len(PairedViewDataset(caches["zeros"], split="test")) == 1


def test_study_views_dataset_is_the_released_flu_policy(caches):
    """Every train study with an image (single-image ones too); up to 3 slots in index
    order; a study with 4 images gets a seeded subset of 3 that changes with the epoch."""
    ds = StudyViewsDataset(caches["zeros"], split="train", max_views=3, seed=0)
    index = ds.index
    train_rows = set(np.flatnonzero(index.split == "train").tolist())
    assert len(ds) == 6  # 50000008 is in the test split
    per_study = {int(s): set(np.flatnonzero((index.study_id == s) & (index.split == "train")).tolist())
                 for s in ds.study_ids}
    subsets = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        images, available, views, labels, study = ds.get_batch(np.arange(len(ds)))
        assert images.shape == (6, 3, 1, 16, 16) and available.dtype == torch.bool
        seen = set()
        for i, sid in enumerate(ds.study_ids):
            rows = ds.rows[ds.slots(np.array([i]))[0]]
            rows = rows[available[i].numpy()]
            assert set(rows.tolist()) <= per_study[int(sid)] and len(set(rows.tolist())) == rows.size
            assert rows.size == min(3, len(per_study[int(sid)]))
            for j, r in enumerate(rows):
                np.testing.assert_array_equal(images[i, j, 0].numpy(),
                                              open_shard(caches["zeros"], index.shard[r])[index.offset[r]])
                assert int(views[i, j]) == VIEW_IDS[index.view[r]]
            assert int(images[i, rows.size:].abs().sum()) == 0  # missing slots are zero
            if len(per_study[int(sid)]) == 4:
                subsets.add(tuple(sorted(rows.tolist())))
            seen |= set(rows.tolist())
        assert len(train_rows - seen) == 1  # only the 4-image study leaves one image out
    assert len(subsets) > 1  # the subset changes with the epoch
    again = StudyViewsDataset(caches["zeros"], split="train", seed=0)
    again.set_epoch(7)
    assert torch.equal(again.get_batch(np.arange(6))[0], images)  # (seed, epoch) fixes the draw
    assert 2 in views[available].tolist()  # the unknown view slot gets data
    with pytest.raises(ValueError, match="max_views"):
        StudyViewsDataset(caches["zeros"], max_views=0)


def test_augment_hflip_and_torchvision_jitter():
    """hflip=1 mirrors the identity crop; the torchvision-style jitter equals torchvision's
    adjust_brightness / adjust_contrast on float images in the drawn order."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional", reason="torchvision is the oracle")
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    flip = BatchAugment(out_size=16, scale=(1, 1), ratio=(1, 1), max_rotation_deg=0, brightness=0,
                        contrast=0, mean=0.0, std=1.0, hflip=1.0)
    torch.testing.assert_close(flip(x), x.flip(-1), atol=1e-5, rtol=0)
    aug = BatchAugment(out_size=16, brightness=0.4, contrast=0.4, jitter_p=0.5, jitter_style="torchvision")
    bright = torch.tensor([0.7, 1.3, 1.1, 0.6, 1.4, 0.9]).view(6, 1, 1, 1)
    contr = torch.tensor([1.2, 0.8, 0.6, 1.4, 1.0, 0.7]).view(6, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    got = aug._torchvision_jitter(x, bright, contr, g)
    v = torch.rand(6, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    for i in range(6):
        want = x[i]
        if v[i, 0] < 0.5:
            ops = [(tvf.adjust_brightness, bright[i]), (tvf.adjust_contrast, contr[i])]
            for fn, factor in (ops if v[i, 1] < 0.5 else ops[::-1]):
                want = fn(want, float(factor))
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)
    assert (v[:, 0] < 0.5).any() and (v[:, 0] >= 0.5).any()  # both branches were checked


@pytest.mark.parametrize("workers", [0, 2])
def test_make_loader_covers_each_study_once(caches, workers):
    ds = PairedViewDataset(caches["zeros"], split=None)
    loader = make_loader(ds, batch_size=2, num_workers=workers, drop_last=False, seed=1)
    seen = []
    for frontal, lateral, labels, study in loader:
        assert frontal.shape[1:] == (1, 16, 16) and frontal.dtype == torch.uint8
        seen += study.tolist()
    assert sorted(seen) == list(range(len(ds)))


def test_augment_identity_and_determinism():
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    ident = BatchAugment(out_size=16, scale=(1, 1), ratio=(1, 1), max_rotation_deg=0,
                         brightness=0, contrast=0, mean=0.0, std=1.0)
    torch.testing.assert_close(ident(x), x.float() / 255, atol=1e-5, rtol=0)
    aug = BatchAugment(out_size=8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    y = aug(x, generator=g1)
    assert y.shape == (3, 1, 8, 8) and y.dtype == torch.float32
    assert torch.equal(y, aug(x, generator=g2))
    # uint16 is scaled by 65535: x * 257 is the same picture as x in uint8
    x16 = (x.to(torch.int32) * 257).to(torch.uint16)
    torch.testing.assert_close(ident(x16), ident(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        aug(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale"):
        BatchAugment(scale=(0.5, 2))


def test_augment_rotation_and_crop_geometry():
    # A bright square at the top-left; a crop of the top-left quarter magnifies it 2x.
    x = torch.zeros(1, 1, 32, 32)
    x[..., :8, :8] = 1
    aug = BatchAugment(out_size=32, scale=(0.25, 0.25), ratio=(1, 1), max_rotation_deg=0, brightness=0,
                       contrast=0, mean=0.0, std=1.0)
    theta = aug.theta(1, "cpu")
    theta[:, :, 2] = torch.tensor([-0.5, -0.5])  # force the crop to the top-left quarter
    grid = F.affine_grid(theta, [1, 1, 32, 32], align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False)
    assert y[0, 0, 1:15, 1:15].min() > 0.99 and y[0, 0, 17:, 17:].max() < 0.01
    # rotations stay within the requested range: |theta| rotation <= 10 degrees
    th = BatchAugment(max_rotation_deg=10, scale=(1, 1), ratio=(1, 1)).theta(256, "cpu")
    angles = torch.atan2(th[:, 1, 0], th[:, 0, 0]).abs()
    assert angles.max() <= np.deg2rad(10) + 1e-6 and angles.max() > np.deg2rad(5)


def test_center_resize():
    x = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    out = CenterResize(out_size=10, mean=0.0, std=1.0)(x)
    want = F.interpolate(to_unit(x), size=(10, 10), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, want)
    crop = CenterResize(out_size=10, crop=0.5, mean=0.0, std=1.0)(x)
    torch.testing.assert_close(crop, to_unit(x)[..., 5:15, 5:15])
