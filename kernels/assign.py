"""Nearest-centroid assignment: x @ c^T fused with a running per-row argmin.

One persistent kernel. Each program takes work items (a tile of BLOCK_M rows of x and
one contiguous range of centroid tiles, a "split") and walks the items' centroid tiles
x depth steps as ONE flattened loop, so Triton's software pipeliner keeps loads in
flight across centroid tiles (at d = 128 a centroid tile is only two 64-deep steps; a
nested loop would drain the pipeline every two steps). A "resident" config (d <= 256)
instead loads the x tile once per work item and pipelines the centroid tiles alone,
halving the bytes read per tile at d = 128. ``tl.dot`` lowers to wgmma on
sm_90 and mma on sm_80; on sm_90 the tiles arrive through TMA tensor descriptors when
the strides allow (16-byte aligned), otherwise through masked pointer loads.

After the last depth step of a centroid tile the (BLOCK_M, BLOCK_N) product becomes a
score (``||c||^2 - 2 x.c`` for l2, ``-x.c`` for ip/cos; +inf past k), its row minimum
and first argmin are taken, and the running (value, index) pair keeps the smaller,
earlier one: ties go to the lowest index. Scores never leave registers; per row and
split the kernel writes one float32 score and one int64 index. The launcher adds
``||x||^2`` (l2) or divides by ``||x||`` (cos) and reduces over splits.

That fold (the "epilogue": CUDA-core work per score, a row min and argmin) runs after
each tile's MMA, and inside one program the tensor cores wait for it (Triton 3.8 places
``wgmma.wait_group 0`` right after each tile's MMA, so a deferred fold within the
program cannot overlap it). ``schedule="two_per_sm"`` hides it across programs: two
persistent programs per SM, with tiles sized (registers, shared memory) so both stay
resident, and the warp schedulers issue one program's fold while the other's MMA runs.
It is selectable by AssignConfig, not the default until a GPU run measures it
(bench/gpu_kmeans.py --tune times it).

Splits serve short inputs (few row tiles, many centroids: row tiles alone would leave
most SMs idle) and large k (work items run split-major, so all programs sweep one
L2-sized panel of centroids together instead of streaming all k from HBM each).

Nothing here imports fastssl: the launcher takes tensors its caller validated
(fastssl.assign.triton_engine prepares them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = ["AssignConfig", "TUNED", "ARCHS", "SCHEDULES", "pick_config", "assign_partial",
           "finish", "row_sqnorms", "PRECISIONS"]

# Where the argmin fold runs relative to the MMAs: "serial" one persistent program per
# SM (the fold stalls the tensor cores), "two_per_sm" two co-resident programs per SM.
SCHEDULES = ("serial", "two_per_sm")
# float32 inputs: tf32 (one tensor-core product) or tf32x3 (split products, ~fp32).
PRECISIONS = {"tf32": "tf32", "3xtf32": "tf32x3", "ieee": "ieee"}
METRIC_L2, METRIC_IP = 0, 1


@dataclass(frozen=True)
class AssignConfig:
    """Tile shape and pipelining of one launch. ``measured`` says whether a device run
    chose it (bench/gpu_kmeans.py --tune) or it is a starting point by arithmetic."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    measured: bool = False
    resident: bool = False  # d <= block_k: x's tile loaded once per work item
    schedule: str = "serial"  # one of SCHEDULES (module docstring)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")

    @property
    def programs_per_sm(self) -> int:
        return 2 if self.schedule == "two_per_sm" else 1

    def for_width(self, d: int) -> "AssignConfig":
        """A resident config's depth block is the whole (padded) row."""
        if not self.resident:
            return self
        if d > 256:
            raise ValueError(f"resident tiles hold the whole row: d={d} > 256")
        return replace(self, block_k=_pow2_at_least(d, 16))


# The table a first call reads, so that no call autotunes. Keyed by
# (compute capability major, dtype, d bucket); a bucket is the smallest of
# D_BUCKETS >= d. Entries with measured=False are arithmetic starting points:
#   sm_90, 16-bit: 128x256x64, 3 stages = 3 x 48 KiB of shared memory, 8 warps (two
#     warpgroups, a 128x256 fp32 accumulator = 128 registers per thread);
#   sm_90, fp32: 128x128x32, 3 stages = 3 x 32 KiB;
#   sm_80: 128x128x64 (16-bit) / 128x64x32 (fp32), 3 stages, within 164 KiB.
# Compiled offline for sm_90a with Triton 3.8 (tests/test_kmeans_triton.py does it on
# the CPU): every sm_90 entry lowers to wgmma with TMA loads (cp.async.bulk.tensor) and
# a 3-4 stage pipeline; 128x256 tiles use 255 registers with 8-16 bytes of spills,
# 128x128 tiles 126-239 registers and none. On sm_80, fp32 3xtf32 spills ~100 bytes.
# bench/gpu_kmeans.py --tune times candidates per row and prints entries to paste here.
D_BUCKETS = (64, 128, 256, 512, 1 << 30)
# The compute capabilities TUNED is sized for (sm_80: 164 KiB of shared memory per block,
# sm_90: 227 KiB) and tests/test_kmeans_triton.py compiles offline; impl="auto" picks
# this kernel only on these (sm_86/89 have ~100 KiB and would need their own entries).
ARCHS = ((8, 0), (9, 0))
_H16 = AssignConfig(128, 256, 64, 8, 3)
_H16_SMALL_D = AssignConfig(128, 256, 64, 8, 4)
_H32 = AssignConfig(128, 128, 32, 8, 3)
_A16 = AssignConfig(128, 128, 64, 8, 3)
_A32 = AssignConfig(128, 64, 32, 4, 3)
TUNED: dict[tuple[int, str, int], AssignConfig] = {}
for _bucket in D_BUCKETS:
    for _dt in ("bfloat16", "float16"):
        TUNED[(9, _dt, _bucket)] = _H16_SMALL_D if _bucket <= 256 else _H16
        TUNED[(8, _dt, _bucket)] = _A16
    TUNED[(9, "float32", _bucket)] = _H32
    TUNED[(8, "float32", _bucket)] = _A32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(v))


def pick_config(device: torch.device, dtype: torch.dtype, n: int, k: int, d: int) -> AssignConfig:
    """The recorded config for this device, dtype and d; under the CPU interpreter,
    where every program instance costs about a millisecond, tiles just covering the
    problem (at least 16, tl.dot's smallest)."""
    if device.type != "cuda":
        return AssignConfig(min(64, _pow2_at_least(n, 16)), min(64, _pow2_at_least(k, 16)),
                            min(64, _pow2_at_least(d, 16)), 4, 1)
    major = torch.cuda.get_device_capability(device)[0]
    bucket = next(b for b in D_BUCKETS if d <= b)
    key = (9 if major >= 9 else 8, str(dtype).replace("torch.", ""), bucket)
    return TUNED[key]


@triton.jit
def _load_tile(src, off_r, off_k, stride, n_rows, d, r_local, k_local, USE_TMA: tl.constexpr):
    """Rows [off_r, off_r + R) x depth [off_k, off_k + K) of an (n_rows, d) matrix; zeros
    outside it (TMA fills out-of-range boxes with zeros itself)."""
    if USE_TMA:
        tile = src.load([off_r, off_k])
    else:
        r = off_r + r_local
        c = off_k + k_local
        tile = tl.load(src + r[:, None].to(tl.int64) * stride + c[None, :],
                       mask=(r[:, None] < n_rows) & (c[None, :] < d), other=0.0)
    return tile


@triton.jit
def _fold_tile(acc, off_n, cols_local, csq_ptr, k, best, best_idx, METRIC: tl.constexpr):
    """Fold one (BLOCK_M, BLOCK_N) tile of x.c into the running (value, index) minimum."""
    cols = off_n + cols_local
    if METRIC == 0:
        bias = tl.load(csq_ptr + cols, mask=cols < k, other=float("inf"))
        score = bias[None, :] - 2.0 * acc
    else:
        score = tl.where((cols < k)[None, :], -acc, float("inf"))
    # one reduction for both (value, first index): the epilogue runs on the CUDA cores
    # between tensor-core tiles, so its cost is per element
    tile_best, tile_arg = tl.min(score, axis=1, return_indices=True,
                                 return_indices_tie_break_left=True)
    better = tile_best < best  # strict: an earlier tile keeps a tie
    return (tl.where(better, tile_best, best),
            tl.where(better, off_n + tile_arg.to(tl.int64), best_idx))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # exact: bf16 -> fp32, and fp32 products of bf16 values are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)


@triton.jit
def _assign_kernel(
    x_src, c_src, csq_ptr, best_ptr, idx_ptr,
    n, k, d, stride_x, stride_c,
    n_row_tiles, n_splits, tiles_per_split,
    METRIC: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong (Triton 3.8)
    RESIDENT: tl.constexpr,  # BLOCK_K >= d: x's tile is loaded once per work item
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    k_steps = tl.cdiv(d, BLOCK_K)
    rows_local = tl.arange(0, BLOCK_M)
    cols_local = tl.arange(0, BLOCK_N)
    depth_local = tl.arange(0, BLOCK_K)
    for item in range(pid, n_row_tiles * n_splits, n_programs):
        row_tile = item % n_row_tiles  # neighbours share a split: same centroid tiles in L2
        split = item // n_row_tiles
        off_m = row_tile * BLOCK_M
        first_col = split * tiles_per_split * BLOCK_N
        best = tl.full((BLOCK_M,), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_M,), tl.int64)
        if RESIDENT:  # small d: one depth step per centroid tile, x's tile kept
            a = _load_tile(x_src, off_m, 0, stride_x, n, d, rows_local, depth_local, USE_TMA)
            for tile in tl.range(0, tiles_per_split, num_stages=NUM_STAGES):
                off_n = first_col + tile * BLOCK_N
                b = _load_tile(c_src, off_n, 0, stride_c, k, d, cols_local, depth_local,
                               USE_TMA)
                acc = _dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION, UPCAST)
                best, best_idx = _fold_tile(acc, off_n, cols_local, csq_ptr, k, best,
                                            best_idx, METRIC)
        else:  # one flattened (centroid tile x depth step) loop for the pipeliner
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for step in tl.range(0, tiles_per_split * k_steps, num_stages=NUM_STAGES):
                tile = step // k_steps
                ks = step - tile * k_steps
                off_n = first_col + tile * BLOCK_N
                a = _load_tile(x_src, off_m, ks * BLOCK_K, stride_x, n, d, rows_local,
                               depth_local, USE_TMA)
                b = _load_tile(c_src, off_n, ks * BLOCK_K, stride_c, k, d, cols_local,
                               depth_local, USE_TMA)
                acc = _dot(a, b, acc, PRECISION, UPCAST)
                if ks == k_steps - 1:
                    best, best_idx = _fold_tile(acc, off_n, cols_local, csq_ptr, k, best,
                                                best_idx, METRIC)
                    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        rows = off_m + rows_local
        out = split.to(tl.int64) * n + rows
        tl.store(best_ptr + out, best, mask=rows < n)
        tl.store(idx_ptr + out, best_idx, mask=rows < n)


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float32:
        return PRECISIONS[precision]
    if dtype == torch.bfloat16 and _interpreting():
        return "ieee"  # the upcast operands: no tf32 rounding of exact bf16 values
    return "tf32"  # unused by 16-bit operands


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs sm_90, 16-byte aligned base and row stride, unit inner stride."""
    if t.device.type != "cuda" or _interpreting():
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    size = t.element_size()
    return (t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.shape[1] * size >= 16)


def _sources(x, c, cfg: AssignConfig, use_tma: bool):
    if not use_tma:
        return x, c
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(c, [cfg.block_n, cfg.block_k]))


def _program_count(device: torch.device, items: int, per_sm: int = 1) -> int:
    """Persistent programs: ``per_sm`` per SM, at most one per work item; under the
    interpreter one per work item."""
    if device.type != "cuda":
        return items
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(items, per_sm * sms)


L2_SHARE = 0.4  # of the L2 cache, for the centroid panel that all programs sweep together


def _default_splits(device: torch.device, row_tiles: int, col_tiles: int, c_bytes: int,
                    per_sm: int = 1) -> int:
    """Enough centroid splits to (a) give every SM work when row tiles are few and (b)
    keep each split's centroid panel in L2. Work items run split-major, so all programs
    sweep the same panel at once: with k = 100k, d = 1024 bf16 (200 MB of centroids) a
    single sweep would stream every centroid tile from HBM once per program."""
    programs = _program_count(device, 1 << 30, per_sm)
    occupancy = programs // max(row_tiles, 1)
    panels = 1
    if device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        panels = triton.cdiv(c_bytes, max(1, int(L2_SHARE * l2)))
    return max(1, min(col_tiles, max(occupancy, panels)))


def assign_partial(
    x: torch.Tensor,
    c: torch.Tensor,
    c_sqnorm: torch.Tensor | None,
    *,
    precision: str = "tf32",
    config: AssignConfig | None = None,
    splits: int | None = None,
    use_tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split best score and its centroid index for every row.

    Args:
        x: (n, d) float32 | float16 | bfloat16, unit inner stride, on a CUDA device (or
            the CPU under TRITON_INTERPRET=1).
        c: (k, d) same dtype and device, unit inner stride (already normalised for cos).
        c_sqnorm: (k,) float32 ||c||^2 for l2; None for inner-product scores.
        precision: float32 inputs only: "tf32" | "3xtf32" | "ieee".
        config: tiles, pipelining and schedule (SCHEDULES: programs per SM); None =
            pick_config().
        splits: centroid ranges processed independently (then reduced); None =
            _default_splits (SM occupancy for short x, L2-sized centroid panels).
        use_tma: None = whenever the device and strides allow.
    Returns:
        best (S, n) float32 score (smaller is better: ||c||^2 - 2 x.c or -x.c) and idx
        (S, n) int64 global centroid index, one row per split, on x's device and the
        current stream.
    """
    n, d = x.shape
    k = c.shape[0]
    cfg = (config or pick_config(x.device, x.dtype, n, k, d)).for_width(d)
    row_tiles = triton.cdiv(n, cfg.block_m)
    col_tiles = triton.cdiv(k, cfg.block_n)
    if splits is None:
        splits = _default_splits(x.device, row_tiles, col_tiles, k * d * x.element_size(),
                                 cfg.programs_per_sm)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)
    tma = _tma_ok(x) and _tma_ok(c) if use_tma is None else use_tma
    x_src, c_src = _sources(x, c, cfg, tma)
    best = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    idx = torch.empty((splits, n), dtype=torch.int64, device=x.device)
    metric = METRIC_L2 if c_sqnorm is not None else METRIC_IP
    csq = c_sqnorm if c_sqnorm is not None else best  # unread for ip
    grid = (_program_count(x.device, row_tiles * splits, cfg.programs_per_sm),)
    _assign_kernel[grid](
        x_src, c_src, csq, best, idx, n, k, d, x.stride(0), c.stride(0),
        row_tiles, splits, tiles_per_split,
        METRIC=metric, PRECISION=_dot_precision(x.dtype, precision),
        USE_TMA=tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NUM_STAGES=cfg.num_stages, UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        RESIDENT=cfg.resident,
        num_warps=cfg.num_warps,
    )
    return best, idx


def finish(best: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce (S, n) per-split results to (n,) labels and scores; ties: the lowest split,
    whose centroids come first."""
    if best.shape[0] == 1:
        return idx[0], best[0]
    win = best.argmin(dim=0, keepdim=True)  # first minimum on ties
    return idx.gather(0, win)[0], best.gather(0, win)[0]


@triton.jit
def _row_sqnorm_kernel(x_ptr, out_ptr, n, d, stride_x,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for off in range(0, d, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                    mask=(rows[:, None] < n) & (cols[None, :] < d), other=0.0).to(tl.float32)
        total += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, total, mask=rows < n)


def row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """(n,) float32 ||x_i||^2 of an (n, d) tensor with unit inner stride: one read of x,
    float32 accumulation (no float32 copy of x, which torch's x.float() would write)."""
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d = min(128, _pow2_at_least(d, 16))
    block_r = 64 if x.device.type == "cuda" else min(256, _pow2_at_least(n, 16))
    _row_sqnorm_kernel[(triton.cdiv(n, block_r),)](x, out, n, d, x.stride(0),
                                                  BLOCK_R=block_r, BLOCK_D=block_d)
    return out
