"""Host <-> device copies and host syncs in the eager training step, counted on the CPU.

tests/test_ops_sync.py checks the same on a GPU with ``torch.cuda.set_sync_debug_mode``;
without one, a dispatch mode records every aten op of the step (forward and backward)
and counts the ones that copy between host and device or wait for the device on CUDA:
``lift_fresh`` (a tensor made from host data: ``torch.tensor``, ``new_tensor``, a
host-to-device copy), ``_local_scalar_dense`` (``.item()``, ``bool()``, ``float()``),
``nonzero`` / ``masked_select`` / indexing by a bool tensor (the result's size is read on
the host), and ``_to_copy`` / ``copy_`` across devices.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl.models.alignment import ALIGN_LOSSES, alignment_loss
from fastssl.models.mvmae import MultiViewMAE, model_config

SYNCING = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default",
           "aten._local_scalar_dense.default", "aten.nonzero.default",
           "aten.masked_select.default", "aten.item.default"}


class HostCopies(TorchDispatchMode):
    """Records the ops of SYNCING, bool-mask indexing and cross-device copies."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNCING:
            self.seen.append(name)
        elif name.startswith("aten.index.") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.seen.append(name + " (bool mask)")
        elif name == "aten._to_copy.default" and "device" in kwargs \
                and torch.device(kwargs["device"]) != args[0].device:
            self.seen.append(name + " (device)")
        elif name == "aten.copy_.default" and args[0].device != args[1].device:
            self.seen.append(name + " (device)")
        return func(*args, **kwargs)


def test_the_counter_sees_host_copies():
    """The counter is real: each construct below is one host copy or host read on CUDA."""
    z = torch.randn(4, 3)
    with HostCopies() as rec:
        z.new_tensor(4)
        z.sum().item()
        bool((z > 0).any())
        z[z > 0]
        torch.tensor([1.0, 2.0])
    assert len(rec.seen) == 5, rec.seen


@pytest.mark.parametrize("kind", ALIGN_LOSSES)
def test_alignment_loss_makes_no_host_copy(kind):
    """Every kind, forward and backward, with missing views."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, 16, generator=g).requires_grad_()
    avail = torch.rand(6, 3, generator=g) < 0.6
    avail[0] = True
    with HostCopies() as rec:
        alignment_loss(z, avail, kind).backward()
    assert rec.seen == [], rec.seen


@pytest.mark.parametrize("mode", ["paired", "single"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.93])
def test_multiview_mae_eager_step_makes_no_host_copy(mode, mask_ratio):
    """MultiViewMAE's eager forward + backward (paired: both views, alignment with beta;
    single: one view). Zero copies: the released reduction's factor and beta stay host
    floats folded into device ops, the alignment's batch count a host int."""
    torch.manual_seed(0)
    model = MultiViewMAE(model_config("test"))
    x = torch.randn(6, 1, 32, 32)
    with HostCopies() as rec:
        if mode == "paired":
            out = model(x[:3], x[3:], mask_ratio=mask_ratio, beta=0.5)
        else:
            out = model(x, None, views=0, mask_ratio=mask_ratio)
        out["loss"].backward()
    assert rec.seen == [], rec.seen
