"""Batch augmentation on the device: one affine_grid + grid_sample for the whole batch.

Radiographs arrive from the cache as integer tensors (B, 1, S, S) (uint8 or uint16);
augmenting after the transfer to the GPU keeps the loader workers to a memcpy, which is
what lets one CPU core feed thousands of pairs per second.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment", "CenterResize", "to_unit", "mvmae_train_augment"]

_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 / uint16 / float (B, 1, H, W) -> float32 in [0, 1] (floats pass unchanged)."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x: expected (B, 1, H, W) greyscale, got shape {tuple(x.shape)}")
    if x.dtype in _SCALE:
        return x.to(torch.float32) / _SCALE[x.dtype]
    if x.dtype.is_floating_point:
        return x.to(torch.float32)
    raise TypeError(f"x: expected uint8, uint16 or a float dtype, got {x.dtype}")


class BatchAugment:
    """Random resized crop + small rotation + horizontal flip + brightness/contrast, then
    normalisation.

    Two jitter styles: ``jitter_style="fixed"`` (fastssl's MAE recipe) applies brightness
    then contrast around the image's mean, clamping once; ``"torchvision"`` (the released
    MVMAE recipe: ``RandomApply([ColorJitter(0.4, 0.4)], p=0.8)``) applies, with
    probability ``jitter_p``, brightness ``clamp(x b)`` and contrast
    ``clamp(c x + (1 - c) mean(x))`` in a random order per image, as torchvision does
    (saturation and hue are no-ops on one channel; torchvision's uint8 rounding between
    the two is not reproduced).

    Args:
        out_size: side of the output images.
        scale: (min, max) area fraction of the crop.
        ratio: (min, max) aspect ratio of the crop (log-uniform).
        max_rotation_deg: rotation drawn uniformly in [-max, max] degrees.
        brightness: multiplicative factor drawn in [1 - b, 1 + b].
        contrast: factor c in [1 - c, 1 + c] applied around each image's mean.
        mean, std: the normalisation (x - mean) / std applied last (dataset statistics
            of the [0, 1] pixels, e.g. the cache manifest's pixel_mean / pixel_std).
        hflip: probability of a horizontal flip.
        jitter_p: probability that an image is jittered ("torchvision" style only).
        jitter_style: "fixed" | "torchvision" (see above).
    Call:
        x: (B, 1, S, S) uint8 | uint16 | float tensor on any device.
        generator: an optional torch.Generator on x's device, for reproducible draws.
        Returns (B, 1, out_size, out_size) float32 on x's device.
    """

    def __init__(self, out_size: int = 224, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), max_rotation_deg: float = 10.0,
                 brightness: float = 0.1, contrast: float = 0.1, mean: float = 0.5, std: float = 0.25,
                 hflip: float = 0.0, jitter_p: float = 1.0, jitter_style: str = "fixed"):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale}; expected 0 < min <= max <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio}; expected 0 < min <= max")
        if not 0 <= brightness < 1 or not 0 <= contrast < 1:
            raise ValueError(f"brightness={brightness}, contrast={contrast}; expected in [0, 1)")
        if std <= 0:
            raise ValueError(f"std={std}; expected > 0")
        if not 0 <= hflip <= 1 or not 0 <= jitter_p <= 1:
            raise ValueError(f"hflip={hflip}, jitter_p={jitter_p}; expected probabilities in [0, 1]")
        if jitter_style not in ("fixed", "torchvision"):
            raise ValueError(f"jitter_style={jitter_style!r}; expected 'fixed' or 'torchvision'")
        self.hflip, self.jitter_p, self.jitter_style = hflip, jitter_p, jitter_style
        self.out_size, self.scale, self.ratio = int(out_size), scale, ratio
        self.max_rotation = math.radians(max_rotation_deg)
        self.brightness, self.contrast, self.mean, self.std = brightness, contrast, mean, std

    def __repr__(self) -> str:
        return (f"BatchAugment(out_size={self.out_size}, scale={self.scale}, ratio={self.ratio}, "
                f"max_rotation_deg={math.degrees(self.max_rotation):g}, brightness={self.brightness}, "
                f"contrast={self.contrast}, mean={self.mean}, std={self.std}, hflip={self.hflip}, "
                f"jitter_p={self.jitter_p}, jitter_style={self.jitter_style!r})")

    def theta(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 2, 3) affine maps from output to input coordinates ([-1, 1] both)."""
        u = torch.rand(batch, 6, device=device, generator=generator)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        r = torch.exp(log_r)
        # half-extents of the crop as fractions of the image (1 = whole side)
        w = torch.sqrt(area * r).clamp(max=1.0)
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (1 - w) * (2 * u[:, 2] - 1)
        cy = (1 - h) * (2 * u[:, 3] - 1)
        angle = self.max_rotation * (2 * u[:, 4] - 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # input = R(angle) @ diag(w, h) @ output + centre; the image is square, so a
        # rotation in normalised coordinates is a true rotation in pixels.
        return torch.stack([
            torch.stack([w * cos, -h * sin, cx], dim=1),
            torch.stack([w * sin, h * cos, cy], dim=1),
        ], dim=1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_unit(x)
        if x.shape[2] != x.shape[3]:
            raise ValueError(f"x: expected square images (B, 1, S, S), got shape {tuple(x.shape)}")
        b = x.shape[0]
        theta = self.theta(b, x.device, generator)
        if self.hflip > 0:  # mirror the output: x_in = theta @ (-x_out, y_out, 1)
            flip = torch.rand(b, device=x.device, generator=generator) < self.hflip
            theta[:, :, 0] = torch.where(flip[:, None], -theta[:, :, 0], theta[:, :, 0])
        grid = F.affine_grid(theta, [b, 1, self.out_size, self.out_size], align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        u = torch.rand(b, 2, 1, 1, device=x.device, generator=generator)
        bright = 1 + self.brightness * (2 * u[:, :1] - 1)
        contr = 1 + self.contrast * (2 * u[:, 1:] - 1)
        if self.jitter_style == "torchvision":
            y = self._torchvision_jitter(y, bright, contr, generator)
        else:
            m = y.mean(dim=(2, 3), keepdim=True)
            y = ((y * bright - m * bright) * contr + m * bright).clamp_(0.0, 1.0)
        return (y - self.mean) / self.std

    def _torchvision_jitter(self, y, bright, contr, generator):
        """y (B, 1, H, W) in [0, 1], factors (B, 1, 1, 1) -> jittered y (see the class doc)."""
        v = torch.rand(y.shape[0], 2, 1, 1, device=y.device, generator=generator)
        apply, bright_first = v[:, :1] < self.jitter_p, v[:, 1:] < 0.5

        def brightness(t):
            return (t * bright).clamp(0.0, 1.0)

        def contrast(t):
            return (contr * t + (1 - contr) * t.mean(dim=(2, 3), keepdim=True)).clamp(0.0, 1.0)

        out = torch.where(bright_first, contrast(brightness(y)), brightness(contrast(y)))
        return torch.where(apply, out, y)


def mvmae_train_augment(out_size: int, crop_min: float = 0.5, mean: float = 0.5, std: float = 0.25) -> BatchAugment:
    """The released MVMAE training transform, used there for pretraining *and* fine-tuning
    (agostini335/MVMAE ``TransformMimicFolderMAETrainModule``): RandomResizedCrop(scale
    (crop_min, 1), ratio (1, 1)), RandomHorizontalFlip (p 0.5), ColorJitter(0.4, 0.4) applied
    with p 0.8 (saturation and hue: no-ops on one channel), Normalize(mean, std); no rotation."""
    return BatchAugment(out_size=out_size, scale=(crop_min, 1.0), ratio=(1.0, 1.0), max_rotation_deg=0.0,
                        brightness=0.4, contrast=0.4, mean=mean, std=std, hflip=0.5, jitter_p=0.8,
                        jitter_style="torchvision")


class CenterResize:
    """Deterministic evaluation transform: centred crop of ``crop`` of the side, resize
    (antialiased bilinear) to out_size, normalise. (B, 1, S, S) -> (B, 1, out, out) float32."""

    def __init__(self, out_size: int = 224, crop: float = 1.0, mean: float = 0.5, std: float = 0.25):
        if not 0 < crop <= 1:
            raise ValueError(f"crop={crop}; expected in (0, 1]")
        self.out_size, self.crop, self.mean, self.std = int(out_size), crop, mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x)
        s = x.shape[-1]
        side = max(1, round(s * self.crop))
        top, left = (x.shape[-2] - side) // 2, (s - side) // 2
        x = x[..., top:top + side, left:left + side]
        if x.shape[-2:] != (self.out_size, self.out_size):
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean) / self.std
