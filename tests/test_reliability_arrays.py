"""assign on unusual layouts: non-native byte order (in memory and memory-mapped), reversed
rows, broadcast views, expanded tensors; sparse tensors are refused with a TypeError."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from fastssl.assign import arrays as _arrays
from fastssl._native import has_cpu_ext
from fastssl.assign import assign

IMPLS = ["torch"] + (["cpu"] if has_cpu_ext() else [])


def reference(x: np.ndarray, c: np.ndarray):
    """float64 nearest centroid (squared L2) of native-order copies."""
    x64, c64 = np.asarray(x, dtype=np.float64), np.asarray(c, dtype=np.float64)
    d = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


def check(x, c, impl, **kw):
    labels, distances = assign(x, c, impl=impl, **kw)
    ref_labels, ref_dist = reference(np.asarray(x), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(labels), ref_labels)
    np.testing.assert_allclose(np.asarray(distances), ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_big_endian_inputs_give_the_native_answer(rng, impl):
    x = rng.standard_normal((500, 8)).astype(">f4")
    c = rng.standard_normal((17, 8))
    check(x, c.astype("<f4"), impl)
    check(x, c.astype(">f4"), impl)
    check(x.astype("<f4"), c.astype(">f2"), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_memmapped_big_endian_npy_is_converted_chunk_by_chunk(tmp_path, rng, impl):
    x = rng.standard_normal((20000, 64)).astype(">f4")           # 5 MiB on disk
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert not mm.dtype.isnative and _arrays.is_memmap(mm)
    c = rng.standard_normal((9, 64)).astype(np.float32)
    tracemalloc.start()
    labels, distances = assign(mm, c, impl=impl, chunk_size=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ref_labels, ref_dist = reference(x, c)
    np.testing.assert_array_equal(np.asarray(labels), ref_labels)
    np.testing.assert_allclose(np.asarray(distances), ref_dist, rtol=1e-4, atol=1e-3)
    assert peak < x.nbytes / 2, f"peak {peak} bytes: the memmap was copied whole ({x.nbytes} bytes)"


@pytest.mark.parametrize("impl", IMPLS)
def test_reversed_sliced_and_broadcast_rows(rng, impl):
    x = rng.standard_normal((300, 12)).astype(np.float32)
    c = rng.standard_normal((7, 12)).astype(np.float32)
    check(x[::-1], c, impl)
    check(x[::-3], c[::-1], impl)
    check(np.asfortranarray(x), c, impl)
    check(np.broadcast_to(x[5], (40, 12)), c, impl)
    check(x, np.broadcast_to(c[2], (3, 12)), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_and_transposed_torch_tensors(impl):
    g = torch.Generator().manual_seed(0)
    row, c = torch.randn(1, 16, generator=g), torch.randn(5, 16, generator=g)
    check(row.expand(30, 16), c, impl)
    check(torch.randn(16, 30, generator=g).t(), c, impl)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_raise_type_error_naming_the_argument():
    dense = torch.randn(6, 4)
    with pytest.raises(TypeError, match=r"x is a sparse torch tensor .*x.to_dense\(\)"):
        assign(dense.to_sparse(), dense)
    with pytest.raises(TypeError, match="centroids is a sparse torch tensor"):
        assign(dense, dense.to_sparse_csr())
