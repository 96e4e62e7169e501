"""fastssl.kmeans.assign / assign_grouped against the float64 reference."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from fastssl import assign as kmeans
from fastssl._native import has_cpu_ext
from fastssl.reference.kmeans import assign_grouped_reference, assign_reference

needs_ext = pytest.mark.skipif(not has_cpu_ext(), reason="fastssl._C is not built")

# (x dtype, relative tolerance of the distance at the chosen label vs the fp64 minimum,
#  scaled by ||x||^2 + ||c||^2). bf16 is compared against the fp64 reference of the
#  bf16-rounded inputs, so only accumulation error remains.
DTYPES = [(torch.float32, 2e-6), (torch.float16, 2e-6), (torch.bfloat16, 2e-6)]
SHAPES = [  # (n, d, k)
    (1, 1, 1), (1, 33, 5), (7, 1, 3), (50, 33, 1), (3, 8, 40),  # k > n
    (301, 33, 70), (229, 768, 97), (500, 130, 257),
]


def _centroids_as_multiplied(c, x_dtype):
    """Every engine rounds the centroids to x's precision (precision="data")."""
    return c.to(x_dtype).float() if x_dtype in (torch.float16, torch.bfloat16) else c


def _cpu_isa() -> str:
    from fastssl._native import build_info

    return build_info().get("cpu_isa", "")


def _random(rng, shape, dtype):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def _check_against_reference(x, c, labels, dist, metric, rtol):
    """Distance at the chosen label equals the reference optimum; labels agree where the
    gap to the runner-up is clear (ties make labels ambiguous)."""
    x64, c64 = x.double(), c.double()
    if metric == "cos":
        x64 = torch.nn.functional.normalize(x64, dim=1)
        c64 = torch.nn.functional.normalize(c64, dim=1)
    dots = x64 @ c64.T
    if metric == "l2":
        scores = (x64 * x64).sum(1, keepdim=True) - 2 * dots + (c64 * c64).sum(1)
        scale = (x64 * x64).sum(1) + (c64 * c64).sum(1).max()
    else:
        scores = -dots
        scale = x64.norm(dim=1) * c64.norm(dim=1).max() + 1e-30
    labels = torch.as_tensor(np.asarray(labels))
    dist = torch.as_tensor(np.asarray(dist)).double()
    best, ref_labels = scores.min(dim=1)
    at_label = scores.gather(1, labels[:, None])[:, 0]
    tol = rtol * scale * x.shape[1] ** 0.5 + 1e-6
    assert torch.all(at_label - best <= tol), "chosen centroid is not (near-)optimal"
    expected = best.clamp_min(0) if metric == "l2" else -best
    assert torch.all((dist - expected).abs() <= tol), "reported distance is off"
    if scores.shape[1] > 1:
        two = scores.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 10 * tol
        assert torch.equal(labels[clear], ref_labels[clear])


@needs_ext
@pytest.mark.parametrize("dtype, rtol", DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("n, d, k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_assign_matches_reference(rng, dtype, rtol, n, d, k, metric):
    x, c = _random(rng, (n, d), dtype), _random(rng, (k, d), torch.float32)
    labels, dist = kmeans.assign(x, c, metric=metric, impl="cpu")
    assert labels.dtype == torch.int64 and dist.dtype == torch.float32
    assert labels.shape == (n,) and dist.shape == (n,)
    # The engine multiplies in x's precision: 16-bit rows round the centroids too.
    c_used = _centroids_as_multiplied(c, dtype)
    if metric == "cos" and c_used is not c:
        # unit centroids rounded to 16 bits are no longer exactly unit
        rtol = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    _check_against_reference(x.float(), c_used, labels, dist, metric, rtol)


# (n, d, k) per instruction-set path: an odd depth, a single centroid, and a depth past
# every micro-kernel's depth chunk (fp32: 192-256 words; AVX512-BF16: 512 words = 1024
# dimensions), so the partial-sum passes run in both modes. n is not a multiple of any
# row block (MC = 64, 192, 224).
ISA_SHAPES = [(333, 71, 45), (229, 33, 1), (451, 1100, 70)]
_ISA_SCRIPT = """
import json, sys
import numpy as np, torch
from fastssl import assign as kmeans
from fastssl._native import native
data = np.load(sys.argv[1])
out = {"isa": native().cpu_isa()}
for i in range(len(data.files) // 2):
    x, c = data[f"x{i}"], data[f"c{i}"]
    l, d = kmeans.assign(x, c, impl="cpu")
    lb, db = kmeans.assign(torch.from_numpy(x).bfloat16(), c, impl="cpu")
    out[str(i)] = {"f32": [l.tolist(), d.tolist()], "bf16": [lb.tolist(), db.tolist()]}
print(json.dumps(out))
"""


CPU_ISAS = ["generic", "avx2", "avx512", "avx512_bf16", "amx"]  # narrowest first


@needs_ext
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set_path_agrees(isa, tmp_path, rng):
    """Each micro-kernel (capped by FASTSSL_CPU_ISA, read once per process) assigns fp32
    and bf16 rows as the float64 oracle does (bf16: x and centroids rounded to bf16)."""
    import json

    arrays = {}
    for i, (n, d, k) in enumerate(ISA_SHAPES):
        arrays[f"x{i}"] = rng.standard_normal((n, d)).astype(np.float32)
        arrays[f"c{i}"] = rng.standard_normal((k, d)).astype(np.float32)
    np.savez(tmp_path / "data.npz", **arrays)
    env = dict(os.environ, FASTSSL_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "data.npz")],
                            env=env, capture_output=True, text=True, check=True)
    out = json.loads(result.stdout)
    # a cap above what the CPU has runs the CPU's widest engine
    assert CPU_ISAS.index(out["isa"]) <= CPU_ISAS.index(isa)
    for i in range(len(ISA_SHAPES)):
        x, c = torch.from_numpy(arrays[f"x{i}"]), torch.from_numpy(arrays[f"c{i}"])
        got = out[str(i)]
        _check_against_reference(x, c, got["f32"][0], got["f32"][1], "l2", 2e-6)
        xb, cb = x.bfloat16().float(), c.bfloat16().float()
        _check_against_reference(xb, cb, got["bf16"][0], got["bf16"][1], "l2", 2e-6)


@needs_ext
def test_numpy_in_numpy_out_and_torch_in_torch_out(rng):
    x = rng.standard_normal((40, 9)).astype(np.float32)
    c = rng.standard_normal((6, 9)).astype(np.float32)
    labels, dist = kmeans.assign(x, c)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64
    assert isinstance(dist, np.ndarray) and dist.dtype == np.float32
    tl, td = kmeans.assign(torch.from_numpy(x), torch.from_numpy(c))
    assert isinstance(tl, torch.Tensor) and isinstance(td, torch.Tensor)
    np.testing.assert_array_equal(tl.numpy(), labels)
    # torch impl gives the same answer and the same types
    rl, rd = kmeans.assign(x, c, impl="torch")
    assert isinstance(rl, np.ndarray)
    np.testing.assert_allclose(rd, dist, rtol=1e-5, atol=1e-5)


@needs_ext
def test_float64_and_strided_inputs(rng):
    x = rng.standard_normal((64, 40))
    c = rng.standard_normal((10, 20))
    xs = x[:, ::2]  # non-contiguous rows
    labels, dist = kmeans.assign(xs, c)
    ref_l, ref_d = assign_reference(torch.from_numpy(xs), torch.from_numpy(c), dtype=torch.float64)
    _check_against_reference(torch.from_numpy(xs).float(), torch.from_numpy(c).float(),
                             labels, dist, "l2", 2e-6)


@needs_ext
def test_memmap_streams_in_bounded_memory(tmp_path, rng):
    n, d, k, chunk = 20_000, 64, 33, 1_000
    path = tmp_path / "x.npy"
    data = rng.standard_normal((n, d)).astype(np.float32)
    np.save(path, data)
    c = rng.standard_normal((k, d)).astype(np.float32)
    in_memory = kmeans.assign(data, c)
    del data
    x = np.load(path, mmap_mode="r")
    tracemalloc.start()
    labels, dist = kmeans.assign(x, c, chunk_size=chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(labels, in_memory[0])
    np.testing.assert_array_equal(dist, in_memory[1])
    outputs = n * (8 + 4)
    chunk_bytes = chunk * d * 4
    # A few chunk-sized temporaries (the copy, the finiteness mask) plus the outputs;
    # the whole file (5 MB) must never be resident as a Python-owned array.
    assert peak < outputs + 4 * chunk_bytes + (1 << 20), f"peak {peak} bytes"
    assert peak < n * d * 4 / 2


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_assign_grouped_matches_per_group_loop(rng, dtype):
    sizes_x = [0, 1, 57, 300, 13, 0, 128]
    sizes_c = [2, 1, 35, 35, 40, 0, 3]
    x_off = np.concatenate([[0], np.cumsum(sizes_x)]).astype(np.int64)
    c_off = np.concatenate([[0], np.cumsum(sizes_c)]).astype(np.int64)
    x = _random(rng, (int(x_off[-1]), 48), dtype)
    c = _random(rng, (int(c_off[-1]), 48), torch.float32)
    labels, dist = kmeans.assign_grouped(x, x_off, c, c_off, impl="cpu")
    c_used = _centroids_as_multiplied(c, dtype)
    ref_l, ref_d = assign_grouped_reference(x.float(), torch.from_numpy(x_off), c_used,
                                            torch.from_numpy(c_off), dtype=torch.float64)
    for g in range(len(sizes_x)):
        lo, hi = x_off[g], x_off[g + 1]
        if lo == hi:
            continue
        assert torch.all((labels[lo:hi] >= c_off[g]) & (labels[lo:hi] < c_off[g + 1]))
        local = labels[lo:hi] - int(c_off[g])
        _check_against_reference(x[lo:hi].float(), c_used[c_off[g]:c_off[g + 1]], local,
                                 dist[lo:hi], "l2", 2e-6)
    torch.testing.assert_close(dist, ref_d, rtol=1e-5, atol=1e-4)


@needs_ext
def test_grouped_chunked_memmap_equals_whole(tmp_path, rng):
    """Chunk boundaries may cut a group: the answer must not change."""
    sizes = rng.integers(0, 120, size=40)
    x_off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    c_off = np.arange(41, dtype=np.int64) * 5
    x = rng.standard_normal((int(x_off[-1]), 16)).astype(np.float32)
    c = rng.standard_normal((200, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    whole = kmeans.assign_grouped(x, x_off, c, c_off)
    chunked = kmeans.assign_grouped(np.load(tmp_path / "x.npy", mmap_mode="r"), x_off, c,
                                    c_off, chunk_size=97)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    ref = kmeans.assign_grouped(x, x_off, c, c_off, impl="torch", chunk_size=97)
    np.testing.assert_allclose(ref[1], whole[1], rtol=1e-5, atol=1e-5)


@needs_ext
def test_ties_resolve_to_lowest_index():
    x = np.ones((5, 4), dtype=np.float32)
    c = np.ones((70, 4), dtype=np.float32)  # every centroid identical
    labels, dist = kmeans.assign(x, c)
    np.testing.assert_array_equal(labels, 0)
    np.testing.assert_array_equal(dist, 0)


# ------------------------------------------------------------------------- bad input
BAD_CASES = [
    (lambda: (np.ones((3, 4), np.float32), np.ones((2, 5), np.float32)), ValueError, "second dimensions"),
    (lambda: (np.ones((0, 4), np.float32), np.ones((2, 4), np.float32)), ValueError, "x is empty"),
    (lambda: (np.ones((3, 4), np.float32), np.ones((0, 4), np.float32)), ValueError, "centroids is empty"),
    (lambda: (np.ones(4, np.float32), np.ones((2, 4), np.float32)), ValueError, "must be 2-D"),
    (lambda: (np.ones((3, 4), np.int32), np.ones((2, 4), np.float32)), TypeError, "dtype int32"),
    (lambda: ([[1.0, 2.0]], np.ones((2, 2), np.float32)), TypeError, "numpy array"),
]


@pytest.mark.parametrize("make, error, message", BAD_CASES)
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_bad_input_raises_typed_error(make, error, message, impl):
    x, c = make()
    with pytest.raises(error, match=message):
        kmeans.assign(x, c, impl=impl)


def test_nonfinite_rows_are_named(rng):
    x = rng.standard_normal((100, 8)).astype(np.float32)
    x[37, 3] = np.nan
    x[80, 0] = np.inf
    c = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="x row 37 holds NaN or inf"):
        kmeans.assign(x, c)
    with pytest.raises(ValueError, match="x row 37"):
        kmeans.assign(x, c, chunk_size=10)
    c[2, 1] = np.inf
    with pytest.raises(ValueError, match="centroids row 2"):
        kmeans.assign(x[:30], c)
    kmeans.assign(x, c, check_finite=False)  # skipping the check must not crash


@pytest.mark.parametrize(
    "x_off, c_off, message",
    [
        ([0, 5, 4, 10], [0, 1, 2, 3], "non-decreasing"),
        ([0, 5, 9], [0, 1, 3], "end at n=10"),
        ([1, 5, 10], [0, 1, 3], "start at 0"),
        ([0, 5, 10], [0, 1, 3, 3], "G\\+1"),
        ([0, 5, 10], [0, 0, 3], "group 0 has 5 rows but no centroids"),
        ([[0, 10]], [[0, 3]], "1-D"),
    ],
)
def test_bad_offsets(x_off, c_off, message):
    x = np.ones((10, 3), np.float32)
    c = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        kmeans.assign_grouped(x, np.array(x_off), c, np.array(c_off))


def test_impl_resolution(monkeypatch):
    from fastssl import _dispatch
    from fastssl.errors import MissingDependencyError

    x = np.ones((3, 2), np.float32)
    with pytest.raises(MissingDependencyError, match="impl='cuda'"):
        kmeans.assign(x, x, impl="cuda")
    with pytest.raises(ValueError, match="impl='faiss'"):
        kmeans.assign(x, x, impl="faiss")
    monkeypatch.setenv("FASTSSL_IMPL", "nonsense")
    _dispatch.env_override.cache_clear()
    try:
        with pytest.raises(ValueError, match="FASTSSL_IMPL"):
            kmeans.assign(x, x)
        kmeans.assign(x, x, impl="torch")  # explicit impl ignores the override
    finally:
        monkeypatch.delenv("FASTSSL_IMPL")
        _dispatch.env_override.cache_clear()


# --------------------------------------------------------------- property (hypothesis)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def grouped_problems(draw):
    """Offsets that are sometimes malformed (negative steps, wrong ends, empty groups)."""
    groups = draw(st.integers(1, 6))
    d = draw(st.integers(1, 40))
    x_sizes = draw(st.lists(st.integers(0, 60), min_size=groups, max_size=groups))
    c_sizes = draw(st.lists(st.integers(0, 40), min_size=groups, max_size=groups))
    x_off = np.concatenate([[0], np.cumsum(x_sizes)]).astype(np.int64)
    c_off = np.concatenate([[0], np.cumsum(c_sizes)]).astype(np.int64)
    n, k = int(x_off[-1]), int(c_off[-1])
    corrupt = draw(st.sampled_from(["none", "none", "swap", "end", "short"]))
    if corrupt == "swap" and groups > 1:
        x_off[1], x_off[2] = x_off[2] + 1, x_off[1]
    elif corrupt == "end":
        c_off[-1] += draw(st.integers(1, 5))
    elif corrupt == "short":
        x_off = x_off[:-1] if len(x_off) > 2 else x_off
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int16"]))
    return n, d, k, x_off, c_off, dtype


@needs_ext
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=grouped_problems(), seed=st.integers(0, 2**31 - 1))
def test_grouped_property_typed_error_or_correct(problem, seed):
    n, d, k, x_off, c_off, dtype = problem
    rng = np.random.default_rng(seed)
    if dtype == "int16":
        x = rng.integers(-5, 5, size=(n, d)).astype(np.int16)
    else:
        x = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).to(
            getattr(torch, dtype))
    c = rng.standard_normal((k, d)).astype(np.float32)
    try:
        labels, dist = kmeans.assign_grouped(x, x_off, c, c_off)
    except (ValueError, TypeError):
        return  # a typed error is an acceptable answer to malformed input
    xf = torch.as_tensor(np.asarray(x)).float() if dtype == "int16" else x.float()
    c_used = torch.from_numpy(c)
    if dtype in ("bfloat16", "float16"):
        c_used = _centroids_as_multiplied(c_used, getattr(torch, dtype))
    for g in range(len(x_off) - 1):
        lo, hi = int(x_off[g]), int(x_off[g + 1])
        if lo == hi:
            continue
        local = labels[lo:hi] - int(c_off[g])
        assert torch.all((local >= 0) & (local < int(c_off[g + 1] - c_off[g])))
        _check_against_reference(xf[lo:hi], c_used[int(c_off[g]):int(c_off[g + 1])], local,
                                 dist[lo:hi], "l2", 2e-6)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), d=st.integers(1, 70), k=st.integers(1, 90),
       seed=st.integers(0, 2**31 - 1))
def test_assign_property_matches_reference(n, d, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal((k, d)).astype(np.float32)
    labels, dist = kmeans.assign(x, c)
    _check_against_reference(torch.from_numpy(x), torch.from_numpy(c), labels, dist, "l2", 2e-6)


def test_native_layer_rejects_malformed_calls_without_crashing():
    """The bindings re-check what Python validated: direct misuse is a ValueError."""
    if not has_cpu_ext():
        pytest.skip("fastssl._C is not built")
    from fastssl._native import native

    ext = native()
    x = np.ones((4, 3), np.float32)
    c = np.ones((2, 3), np.float32)
    labels = np.empty(4, np.int64)
    dist = np.empty(4, np.float32)
    with pytest.raises(ValueError, match="labels must have shape"):
        ext.assign_cpu(x, False, c, False, 0, np.empty(3, np.int64), dist)
    with pytest.raises(ValueError, match="wrong dtype"):
        ext.assign_cpu(x, False, c, False, 0, np.empty(4, np.int32), dist)
    with pytest.raises(ValueError, match="metric"):
        ext.assign_cpu(x, False, c, False, 7, labels, dist)
    with pytest.raises(ValueError, match="d=3"):
        ext.assign_cpu(x, False, np.ones((2, 5), np.float32), False, 0, labels, dist)
    with pytest.raises(ValueError, match="unsupported dtype"):
        ext.assign_cpu(x.astype(np.float64), False, c, False, 0, labels, dist)
    with pytest.raises(ValueError, match="no centroids"):
        ext.assign_grouped_cpu(x, False, np.array([0, 2, 4]), c, False, np.array([0, 2, 2]),
                               0, labels, dist)
    with pytest.raises(ValueError, match="non-decreasing"):
        ext.assign_grouped_cpu(x, False, np.array([0, 3, 2, 4]), c, False,
                               np.array([0, 1, 1, 2]), 0, labels, dist)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty(4, np.int64)
        ro.flags.writeable = False
        ext.assign_cpu(x, False, c, False, 0, ro, dist)


def test_engines_import_nothing_from_the_dispatch_module():
    """The engines sit below fastssl.kmeans: importing them (and the reference) must not
    import it, so kmeans.py can import them without a cycle."""
    code = ("import sys, fastssl.assign.cuda_engine, fastssl.assign.triton_engine, fastssl.reference.kmeans;"
            "print('fastssl.kmeans' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cosine_centroids_are_normalised_once_in_float64():
    """One normalisation everywhere: float64, then a single rounding to the target dtype.
    (Normalising in float32 first rounds twice: 27 of these 400k fp16 values differ.)"""
    from fastssl.assign.common import normalized_centroids

    rng = np.random.default_rng(4)
    c = rng.standard_normal((4000, 100)) * 3
    exact = c / np.linalg.norm(c, axis=1, keepdims=True)
    got = normalized_centroids(torch.from_numpy(c), torch.float16)
    assert torch.equal(got, torch.from_numpy(exact).to(torch.float16))
    assert np.array_equal(normalized_centroids(c, np.float16), exact.astype(np.float16))
    assert torch.equal(normalized_centroids(torch.zeros(2, 3), torch.float32), torch.zeros(2, 3))


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_assign_topk_matches_float64_sort(rng, metric):
    x = _random(rng, (97, 33), torch.float32)
    c = _random(rng, (41, 33), torch.float32)
    labels, dist = kmeans.assign_topk(x, c, 5, metric=metric)
    x64, c64 = x.double(), c.double()
    if metric == "cos":
        x64 = torch.nn.functional.normalize(x64, dim=1)
        c64 = torch.nn.functional.normalize(c64, dim=1)
    dots = x64 @ c64.T
    scores = ((x64 * x64).sum(1, keepdim=True) - 2 * dots + (c64 * c64).sum(1)
              if metric == "l2" else -dots)
    want = scores.sort(dim=1).values[:, :5]
    assert labels.shape == dist.shape == (97, 5) and labels.dtype == torch.int64
    assert torch.allclose(scores.gather(1, labels), want, atol=1e-4)  # the 5 best, in order
    assert torch.allclose(dist.double(), want.clamp_min(0) if metric == "l2" else -want, atol=1e-4)
    assert torch.equal(labels[:, 0], kmeans.assign(x, c, metric=metric, impl="torch")[0])


def test_assign_topk_ties_streams_and_types(tmp_path, rng):
    base = rng.standard_normal((4, 6)).astype(np.float32)
    c = np.concatenate([base, base, base[:1]])  # copies of every centroid
    labels, dist = kmeans.assign_topk(base, c, 3)
    assert isinstance(labels, np.ndarray) and labels.shape == (4, 3)
    assert np.array_equal(labels[:, :2], np.stack([np.arange(4), np.arange(4) + 4], 1))
    assert labels[0, 2] == 8 and np.all(dist[:, :2] == dist[:, :1])  # 0, 4, then 8
    x = rng.standard_normal((300, 6)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    streamed = kmeans.assign_topk(np.load(path, mmap_mode="r"), c, 4, chunk_size=64)
    whole = kmeans.assign_topk(torch.from_numpy(x), torch.from_numpy(c), 4)
    assert np.array_equal(streamed[0], whole[0].numpy())


@pytest.mark.parametrize("topk, error, message", [
    (0, ValueError, "topk=0"), (10, ValueError, "k=9"), (2.0, TypeError, "topk must be an int")])
def test_assign_topk_bad_arguments(topk, error, message):
    x = np.ones((3, 2), np.float32)
    with pytest.raises(error, match=message):
        kmeans.assign_topk(x, np.ones((9, 2), np.float32), topk)


def test_assign_topk_runs_only_on_the_torch_path():
    from fastssl.errors import MissingDependencyError

    x = np.ones((3, 2), np.float32)
    with pytest.raises(MissingDependencyError, match="only the PyTorch path computes top-k"):
        kmeans.assign_topk(x, x, 2, impl="cpu")
