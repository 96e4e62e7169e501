"""Process-group setup and the few collectives fastssl jobs need.

``init()`` reads the launcher's environment:

    torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    SLURM      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST (first host
               becomes the master), SLURM_JOB_ID (picks a default port)

and initialises ``torch.distributed`` (nccl when CUDA is visible, gloo otherwise). With
none of them set, one process works alone: nothing is initialised and every helper below
behaves as the identity (rank 0 of 1). The collectives accept numpy arrays or torch
tensors and return the caller's type, so algorithm code never branches on the backend.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500

__all__ = [
    "DistInfo", "init", "shutdown", "is_initialized", "rank", "world_size", "local_rank",
    "is_main", "barrier", "all_reduce_sum", "broadcast", "all_gather_arrays", "gather_arrays", "first_host",
    "rank_slice", "rank_world", "all_gather_tensor", "pick_device", "check_device", "DEVICES", "usable_cores",
]


@dataclass(frozen=True)
class DistInfo:
    """What ``init`` found: rank, world size, local rank, backend ('' when alone)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "torchrun" | "slurm" | "none"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty")
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launch_env() -> tuple[str, int, int, int, str | None, int | None]:
    """(launcher, rank, world, local_rank, master_addr, master_port) from the environment."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        local = _env_int("LOCAL_RANK") or 0
        return "torchrun", rank, world, local, os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT")
    rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    if rank is not None and world is not None and world > 1:
        local = _env_int("SLURM_LOCALID") or 0
        addr = os.environ.get("MASTER_ADDR") or first_host(os.environ.get("SLURM_NODELIST", ""))
        port = _env_int("MASTER_PORT")
        if port is None:
            job = _env_int("SLURM_JOB_ID") or 0
            port = DEFAULT_PORT + job % 10000  # jobs sharing a node get different ports
        return "slurm", rank, world, local, addr, port
    return "none", 0, 1, 0, None, None


def init(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialises torch.distributed from torchrun / SLURM variables (idempotent).

    Args:
        backend: "nccl" | "gloo" | None (nccl when CUDA is available, else gloo).
        timeout_s: collective timeout.
    Returns:
        DistInfo; world_size 1 and backend '' when no launcher variables are set.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK") or 0,
                        dist.get_backend(), "existing")
    launcher, rank_, world, local, addr, port = _launch_env()
    if world <= 1:
        return DistInfo(0, 1, 0, "", launcher)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if rank_ < 0 or rank_ >= world:
        raise ValueError(f"rank {rank_} is outside [0, {world}) ({launcher} variables)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    addr = addr or "127.0.0.1"
    port = port or DEFAULT_PORT
    if launcher == "torchrun":
        # env:// lets torchrun's agent store serve the rendezvous (a tcp:// URL would try
        # to listen on MASTER_PORT, which the agent already holds)
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
        init_method = "env://"
    else:
        init_method = f"tcp://{addr}:{port}"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank_, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    log.info("distributed: %s rank %d/%d (local %d) backend %s master %s:%s",
             launcher, rank_, world, local, backend, addr, port)
    return DistInfo(rank_, world, local, backend, launcher)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK") or _env_int("SLURM_LOCALID") or 0


def is_main() -> bool:
    return rank() == 0


def rank_slice(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Contiguous rows [start, stop) of n owned by a rank (balanced to within one row)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def rank_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is initialised."""
    return rank(), world_size()


# What every command's --device accepts, in the words its help shows (config.setting appends
# it to the flag's help, as it appends a range). mps is refused, not half supported: pretrain
# sums its validation loss in float64 on the device, which MPS lacks, AMP/autocast and
# torch.compile are CUDA-only paths here, and no job has been run on MPS.
DEVICES = "auto (CUDA when visible, else the CPU) | cpu | cuda (this rank's GPU) | cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(name) -> str:
    """``name`` if it is a device name :func:`pick_device` takes (:data:`DEVICES`), else a
    ValueError naming ``--device``: the one check of the API's configs and the CLI."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"--device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


check_device.allowed = DEVICES   # the help text of the flag a setting declared with this check gets


def pick_device(name: str = "auto", local_rank_: int | None = None):
    """The one device rule of every command's ``--device``.

    Args:
        name: "auto" (CUDA when visible, else the CPU), "cpu", "cuda" or "cuda:N"
            (:func:`check_device`).
        local_rank_: this process's local rank: with a bare "cuda" (or "auto" that picks
            CUDA) the process binds to GPU local_rank % device_count; None keeps the
            current CUDA device.
    Returns:
        torch.device; a bare "cuda" comes back with its index (the device in use).
    Raises:
        ValueError: a name outside :data:`DEVICES` (torch's own RuntimeError would reach
            the user as a traceback); "cuda..." asked for where no CUDA device is visible,
            or "cuda:N" beyond the visible devices.
    """
    import torch

    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is visible")
    if device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return device
    if local_rank_ is not None:
        torch.cuda.set_device(local_rank_ % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (a batch
    job or taskset is often given fewer than os.cpu_count()), else os.cpu_count(). The
    default of every "all cores" --workers and the CLI's cap on a number given."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------ collectives
def _comm_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_tensor(x: Any):
    """(tensor on the communication device, restore function back to the caller's type)."""
    import torch

    if isinstance(x, torch.Tensor):
        dev = x.device
        t = x.detach().to(_comm_device()).contiguous()
        return t, lambda r: r.to(dev)
    arr = np.ascontiguousarray(x)
    t = torch.from_numpy(arr.copy()).to(_comm_device())
    return t, lambda r: r.cpu().numpy()


def all_reduce_sum(x: Any) -> Any:
    """Element-wise sum over ranks; numpy in -> numpy out, tensor in -> tensor out.

    Alone, returns x unchanged (no copy). Use float64/int64 for sums that must not
    depend on the order in which ranks add up.
    """
    if not is_initialized():
        return x
    import torch.distributed as dist

    t, back = _to_tensor(x)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return back(t)


def broadcast(x: Any, src: int = 0) -> Any:
    """The value of rank ``src`` on every rank. Shape and dtype must agree on all ranks."""
    if not is_initialized():
        return x
    import torch.distributed as dist

    t, back = _to_tensor(x)
    dist.broadcast(t, src=src)
    return back(t)


def _padded_rows(x: Any):
    """(x padded to the longest first dimension over ranks, every rank's length, restore
    function): what variable-length gathers send. One all-gather of world ints."""
    import torch
    import torch.distributed as dist

    t, back = _to_tensor(x)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return padded, sizes, back


def gather_arrays(x: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's array, in rank order, on rank ``dst`` only (None elsewhere): what a
    result only one rank writes should cost the others (a few bytes, not a full copy).

    Args:
        x: (n_r, ...) numpy array or tensor; trailing shape and dtype equal on all ranks.
    Returns:
        on ``dst`` a list of world_size arrays of the caller's type ([x] when alone); None
        on every other rank.
    """
    if not is_initialized():
        return [x]
    import torch
    import torch.distributed as dist

    padded, sizes, back = _padded_rows(x)
    mine = dist.get_rank() == dst
    out = [torch.empty_like(padded) for _ in sizes] if mine else None
    dist.gather(padded, out, dst=dst)
    return [back(o[:s]) for o, s in zip(out, sizes)] if mine else None


def all_gather_arrays(x: Any) -> list[Any]:
    """Every rank's array, in rank order; arrays may differ in their first dimension.

    Args:
        x: (n_r, ...) numpy array or tensor; trailing shape and dtype equal on all ranks.
    Returns:
        list of world_size arrays of the caller's type; [x] when alone.
    """
    if not is_initialized():
        return [x]
    import torch
    import torch.distributed as dist

    padded, sizes, back = _padded_rows(x)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [back(o[:s]) for o, s in zip(out, sizes)]


def all_gather_tensor(x, grad: bool = False):
    """(B, ...) torch tensor per rank -> (world*B, ...) in rank order; x itself when alone.

    Every rank must pass the same shape (no padding: that is ``all_gather_arrays``). With
    ``grad=True`` the result is differentiable with respect to every rank's rows (torch's
    autograd all_gather: each rank's gradient flows back to the rank that owns the rows),
    as contrastive losses with negatives from other ranks need; else it is a constant.
    """
    if not is_initialized() or world_size() == 1:
        return x
    import torch
    import torch.distributed as dist

    if grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
