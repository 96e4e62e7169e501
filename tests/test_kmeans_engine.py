"""impl="auto": the one engine choice (fastssl._assign_engine) and everything that uses it.

No GPU here: the device probes (compute capability, Triton importable, fastssl._C's CUDA
engine) are monkeypatched, and each expected engine is written out by hand from the rule
in the module docstring.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fastssl import _dispatch
from fastssl import assign as kmeans
from fastssl.assign import dispatch as _assign_engine
from fastssl.assign import triton_engine as _triton_assign
from fastssl.errors import MissingDependencyError

GPU = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, triton, cuda_ext): what the probes report for a CUDA device."""
    real_import = _triton_assign.importlib.import_module

    def set_probes(capability=(9, 0), triton=True, cuda_ext=True):
        monkeypatch.setattr(_assign_engine, "_capability", lambda device: capability)
        monkeypatch.setattr(_assign_engine, "has_cuda_ext", lambda: cuda_ext)
        monkeypatch.setattr(kmeans, "has_cuda_ext", lambda: cuda_ext)

        def import_module(name, *args):
            if not triton and name == "fastssl.kernels.assign":
                raise ImportError("No module named 'triton'")
            return real_import(name, *args)

        monkeypatch.setattr(_triton_assign.importlib, "import_module", import_module)

    monkeypatch.setattr(_assign_engine, "AUTO_DEVICE_ENGINE", {})
    monkeypatch.delenv("FASTSSL_IMPL", raising=False)
    _dispatch.env_override.cache_clear()
    yield set_probes
    _dispatch.env_override.cache_clear()


@pytest.mark.parametrize("capability, triton, cuda_ext, assign, grouped", [
    ((9, 0), True, True, "triton", "cuda"),    # Hopper, everything installed
    ((8, 0), True, True, "triton", "cuda"),    # A100
    ((8, 6), True, True, "cuda", "cuda"),      # ~100 KiB of shared memory: not compiled for it
    ((10, 0), True, True, "cuda", "cuda"),     # no recorded config or offline compile
    ((9, 0), False, True, "cuda", "cuda"),     # Triton missing
    ((9, 0), True, False, "triton", "torch"),  # no CUDA engine in fastssl._C
    ((9, 0), False, False, "torch", "torch"),  # neither
    ((8, 6), True, False, "torch", "torch"),
])
def test_auto_on_a_gpu(fake_gpu, capability, triton, cuda_ext, assign, grouped):
    fake_gpu(capability, triton, cuda_ext)
    assert _assign_engine.auto_engine("assign", GPU) == assign
    assert _assign_engine.auto_engine("assign_grouped", GPU) == grouped
    assert _assign_engine.auto_engine("assign_topk", GPU) == "torch"


@pytest.mark.parametrize("table, triton, cuda_ext, expected", [
    ({9: "cuda"}, True, True, "cuda"),       # the measurement wins over the rule
    ({8: "cuda"}, True, True, "triton"),     # another architecture's entry does not apply
    ({9: "triton"}, False, True, "cuda"),    # a measured engine that cannot run: the rule
    ({9: "cuda"}, True, False, "triton"),
])
def test_measured_table_entry_wins_when_it_can_run(fake_gpu, monkeypatch, table, triton,
                                                   cuda_ext, expected):
    fake_gpu((9, 0), triton, cuda_ext)
    monkeypatch.setattr(_assign_engine, "AUTO_DEVICE_ENGINE", table)
    assert _assign_engine.auto_engine("assign", GPU) == expected
    # the table is for plain assignment: grouped keeps its own rule
    assert _assign_engine.auto_engine("assign_grouped", GPU) == ("cuda" if cuda_ext else "torch")


def test_auto_in_host_memory(fake_gpu, monkeypatch):
    cpu = torch.device("cpu")
    assert _assign_engine.auto_engine("assign", cpu) == "cpu"
    assert _assign_engine.auto_engine("assign_grouped", cpu) == "cpu"
    assert _assign_engine.auto_engine("assign_topk", cpu) == "torch"
    monkeypatch.setattr(_assign_engine, "has_cpu_ext", lambda: False)
    assert _assign_engine.auto_engine("assign", cpu) == "torch"


def test_the_ops_ask_the_one_choice(fake_gpu, monkeypatch):
    """assign, assign_grouped and assign_topk resolve "auto" through auto_engine, with
    the device their input lives on (here a CPU tensor posing as a CUDA one)."""
    fake_gpu((9, 0), True, True)
    asked = []
    real_choose = _assign_engine.choose

    def spy(op, device):
        asked.append((op, device))
        return real_choose(op, device)

    monkeypatch.setattr(_assign_engine, "choose", spy)
    monkeypatch.setattr(kmeans, "device_of_array", lambda a, kind: GPU)
    x = torch.ones(4, 3)
    assert kmeans.resolved_engine(x) == "triton"
    assert kmeans.resolved_engine(x, op="assign_grouped") == "cuda"
    assert kmeans.resolved_engine(x, op="assign_topk") == "torch"
    assert asked == [("assign", GPU), ("assign_grouped", GPU), ("assign_topk", GPU)]


def test_fastssl_impl_overrides_auto_only(fake_gpu, monkeypatch):
    fake_gpu((9, 0), True, True)
    x = np.ones((4, 3), np.float32)
    monkeypatch.setenv("FASTSSL_IMPL", "torch")
    _dispatch.env_override.cache_clear()
    assert kmeans.resolved_engine(x) == "torch"
    assert kmeans.resolved_engine(x, op="assign_grouped") == "torch"
    assert kmeans.resolved_engine(x, impl="cpu") == "cpu"  # an explicit impl is kept
    monkeypatch.setattr(kmeans, "device_of_array", lambda a, kind: GPU)
    assert kmeans.resolved_engine(torch.ones(4, 3)) == "torch"  # not the Triton kernel


def test_an_explicit_impl_never_falls_back(fake_gpu, monkeypatch):
    fake_gpu((9, 0), False, False)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(MissingDependencyError, match="impl='cuda'"):
        kmeans.resolved_engine(x, impl="cuda")
    with pytest.raises(MissingDependencyError, match="impl='triton'.*numpy"):
        kmeans.resolved_engine(x, impl="triton")
    with pytest.raises(MissingDependencyError, match="assign_grouped runs with impl='cuda'"):
        kmeans.resolved_engine(torch.ones(4, 3), op="assign_grouped", impl="triton")
    monkeypatch.setattr(kmeans, "has_cpu_ext", lambda: False)
    with pytest.raises(MissingDependencyError, match="impl='cpu'.*not built"):
        kmeans.resolved_engine(x, impl="cpu")
    with pytest.raises(ValueError, match="op='assign_many'"):
        kmeans.resolved_engine(x, op="assign_many")


def test_the_choice_is_logged_once_per_process(fake_gpu, monkeypatch, caplog):
    fake_gpu((8, 0), False, True)
    monkeypatch.setattr(_assign_engine, "_logged", set())
    with caplog.at_level(logging.INFO, logger="fastssl.kmeans"):
        for _ in range(3):
            _assign_engine.auto_engine("assign", GPU)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastssl.kmeans"]
    assert len(lines) == 1, lines
    assert "assign impl='auto' on cuda:0: cuda" in lines[0]
    assert "sm_80" in lines[0] and "Triton does not import" in lines[0]


# ----------------------------------------------------------------------- curation
def _spy_choices(monkeypatch):
    asked = []
    real_choose = _assign_engine.choose

    def spy(op, device):
        asked.append(op)
        return real_choose(op, device)

    monkeypatch.setattr(_assign_engine, "choose", spy)
    return asked


def test_kmeans_device_assigner_resolves_auto_through_the_one_choice(monkeypatch):
    """KMeans on a device: the DeviceAssigner passes the user's impl on (a hard-coded
    "cuda" would raise here, the device being the CPU) and auto_engine picks; labels are
    the float64 nearest centroids."""
    from fastssl.curation import kmeans as curation

    monkeypatch.setattr(curation, "assign_device", lambda impl: torch.device("cpu"))
    asked = _spy_choices(monkeypatch)
    assigner = curation.KMeans(curation.KMeansConfig(k=3, impl="auto")).assigner
    assert isinstance(assigner, curation.DeviceAssigner)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((57, 5)).astype(np.float32)
    c = rng.standard_normal((6, 5)).astype(np.float32)
    labels, _ = assigner(x, c)
    want = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, want.argmin(1))
    assert asked == ["assign"]
    assert assigner.engine == _assign_engine.choose("assign", torch.device("cpu"))[0] == "cpu"


def test_grouped_lloyd_on_a_device_resolves_auto_through_the_one_choice(monkeypatch):
    from fastssl.curation import hierarchical

    monkeypatch.setattr(hierarchical, "assign_device", lambda impl: torch.device("cpu"))
    asked = _spy_choices(monkeypatch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    xo, co = np.array([0, 12, 30]), np.array([0, 2, 5])
    c0 = rng.standard_normal((5, 4)).astype(np.float32)
    c, labels, _ = hierarchical.grouped_lloyd(x, xo, c0, co, 0, impl="auto")
    for g in range(2):  # 0 iterations: labels are the nearest initial centroid in the group
        rows, cents = x[xo[g]:xo[g + 1]].astype(np.float64), c0[co[g]:co[g + 1]]
        d2 = ((rows[:, None] - cents[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(labels[xo[g]:xo[g + 1]], co[g] + d2.argmin(1))
    assert asked == ["assign_grouped"]


def test_assign_device_follows_the_engine_choice(monkeypatch):
    """A GPU with Triton but no CUDA engine in fastssl._C still assigns on the GPU."""
    from fastssl.curation import kmeans as curation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr("fastssl._native.has_cuda_ext", lambda: False)
    monkeypatch.setattr(kmeans, "resolved_engine", lambda where, **kw: "triton")
    assert curation.assign_device("auto") == GPU
    assert curation.assign_device("torch") is None

    def host_only(where, **kw):  # FASTSSL_IMPL=cpu: the chunks stay on the host
        raise MissingDependencyError("impl='cpu' needs host memory")

    monkeypatch.setattr(kmeans, "resolved_engine", host_only)
    assert curation.assign_device("auto") is None


def test_assign_device_takes_the_device_rule_and_the_engine_answer(monkeypatch):
    """assign_device asks fastssl.distributed.pick_device("auto") for the device and
    fastssl.assign.resolved_engine (with the user's impl) whether an engine runs there; it
    probes neither torch.cuda nor fastssl._native itself. No GPU here: both are stand-ins."""
    from fastssl import distributed
    from fastssl.curation import kmeans as curation

    asked = []
    monkeypatch.setattr(distributed, "pick_device", lambda name="auto", local_rank_=None: (
        asked.append(("pick", name)), torch.device("cuda", 3))[1])
    monkeypatch.setattr("fastssl._native.has_cuda_ext", lambda: False)   # must not be what decides

    def engine(where, op="assign", impl="auto"):
        asked.append(("engine", str(where), impl))
        return "cuda"

    monkeypatch.setattr(kmeans, "resolved_engine", engine)
    assert curation.assign_device("cuda") == torch.device("cuda", 3)
    assert curation.assign_device("auto") == torch.device("cuda", 3)
    assert asked == [("pick", "auto"), ("engine", "cuda:3", "cuda"), ("pick", "auto"), ("engine", "cuda:3", "auto")]

    def no_cuda_engine(where, op="assign", impl="auto"):   # the package's own answer, passed on
        raise MissingDependencyError("assign: impl='cuda' cannot run here: fastssl._C was built without CUDA")

    monkeypatch.setattr(kmeans, "resolved_engine", no_cuda_engine)
    with pytest.raises(MissingDependencyError, match="built without CUDA"):
        curation.assign_device("cuda")


def test_assign_device_without_a_gpu(monkeypatch):
    """The CPU-only machine: every impl but "cuda" stays on the host, without asking an
    engine; "cuda" is a MissingDependencyError naming the missing GPU."""
    from fastssl.curation import kmeans as curation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kmeans, "resolved_engine", lambda *a, **kw: pytest.fail("no engine to ask on the host"))
    for impl in ("auto", "cpu", "torch"):
        assert curation.assign_device(impl) is None, impl
    with pytest.raises(MissingDependencyError, match="impl='cuda': k-means needs a visible CUDA device"):
        curation.assign_device("cuda")


def test_curate_logs_the_engines_it_resolves(monkeypatch):
    from fastssl.train import curate

    monkeypatch.delenv("FASTSSL_IMPL", raising=False)
    _dispatch.env_override.cache_clear()
    assert curate._engines("torch") == "torch (splits: torch) on cpu"
    monkeypatch.setattr("fastssl.curation.kmeans.assign_device", lambda impl: GPU)
    monkeypatch.setattr(kmeans, "resolved_engine",
                        lambda where, op="assign", impl="auto": f"{op}@{where}/{impl}")
    assert curate._engines("auto") == ("assign@cuda:0/auto (splits: assign_grouped@cuda:0/auto)"
                                       " on cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device; none is visible on this machine")
def test_gpu_auto_runs_the_engine_the_rule_names():
    """On a real GPU: the engine "auto" names follows the rule (probes unpatched), and
    the assignment it runs matches float64."""
    import importlib.util

    import _kmeans_oracle as oracle
    from fastssl._native import has_cuda_ext

    _dispatch.env_override.cache_clear()
    cap = torch.cuda.get_device_capability()
    triton_ok = importlib.util.find_spec("triton") is not None and cap in ((8, 0), (9, 0))
    expected = _assign_engine.AUTO_DEVICE_ENGINE.get(cap[0]) or (
        "triton" if triton_ok else "cuda" if has_cuda_ext() else "torch")
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(3001, 96, device="cuda", generator=gen).bfloat16()
    c = torch.randn(301, 96, device="cuda", generator=gen)
    assert kmeans.resolved_engine(x) == expected
    labels, distances = kmeans.assign(x, c)
    oracle.check_against_float64(x, oracle.as_multiplied(x, c, "l2"), "l2", labels, distances,
                                 3e-5)
