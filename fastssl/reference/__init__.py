"""Plain PyTorch semantics of every fastssl op: the CPU path and the test oracle.

Each function here is the definition the fast paths (Triton kernels, the native
extension) are checked against. They favour clarity over speed, but stay chunked where
the full intermediate would not fit in memory.
"""
from fastssl.reference.kmeans import assign_grouped_reference, assign_reference

__all__ = ["assign_reference", "assign_grouped_reference"]
from fastssl.reference.mae import (  # noqa: E402
    gather_tokens_backward_reference,
    gather_tokens_reference,
    mae_loss_backward_reference,
    mae_loss_reference,
    num_kept,
    patchify_reference,
    random_masking_reference,
    unshuffle_with_mask_token_backward_reference,
    unshuffle_with_mask_token_reference,
)

__all__ += [
    "patchify_reference", "random_masking_reference", "num_kept",
    "gather_tokens_reference", "gather_tokens_backward_reference",
    "unshuffle_with_mask_token_reference", "unshuffle_with_mask_token_backward_reference",
    "mae_loss_reference", "mae_loss_backward_reference",
]
