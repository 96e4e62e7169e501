"""Masked-autoencoder ops with autograd and implementation dispatch.

    random_masking(batch, num_patches, mask_ratio, *, device, generator)
    gather_tokens(x, ids_keep, *, ids_restore, pos_embed, sample_embed, impl, validate)
    unshuffle_with_mask_token(x_vis, mask_token, ids_restore, *, impl, validate)
    mae_loss(pred, imgs, mask, *, patch_size, target, eps, ids_masked, groups, return_groups,
             impl, validate)

``impl``: "auto" (Triton for CUDA tensors when installed, the PyTorch reference
otherwise; FASTSSL_IMPL overrides it), "triton" (CUDA, or CPU under TRITON_INTERPRET=1)
or "torch" (fastssl.reference.mae). Importing this package does not import Triton.
"""
from fastssl.ops._common import IMPLS
from fastssl.ops.mae_loss import TARGETS, mae_loss
from fastssl.ops.masking import gather_tokens, random_masking, unshuffle_with_mask_token

__all__ = ["random_masking", "gather_tokens", "unshuffle_with_mask_token", "mae_loss",
           "IMPLS", "TARGETS"]
