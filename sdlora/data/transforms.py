"""Resize, crop, flip and tensor conversion with PIL and torch only (our own code, no torchvision).

A :class:`CropPlan` is decided before any pixel is read (bucket, crop offset, flip), so the same
plan drives the image pipeline and the latent cache keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import BucketAssignment


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a training sample.

    The image (full size ``original``, width x height) is resized to ``resized`` and a ``bucket``
    window is taken at (``left``, ``top``) of the resized image; ``flip`` mirrors the result.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    bucket: tuple[int, int]
    left: int
    top: int
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the window as SDXL's micro-conditioning expects it, after the flip.

        A flip mirrors the window's position: its left edge becomes ``resized_w - (left + bucket_w)``.
        """
        left = self.resized[0] - (self.left + self.bucket[0]) if self.flip else self.left
        return (self.top, left)

    def source_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop window in the coordinates of an image of ``image_size`` (e.g. a reduced-scale decode)."""
        sx = image_size[0] / self.resized[0]
        sy = image_size[1] / self.resized[1]
        return (
            self.left * sx,
            self.top * sy,
            (self.left + self.bucket[0]) * sx,
            (self.top + self.bucket[1]) * sy,
        )


def plan_crop(
    original: tuple[int, int],
    assignment: BucketAssignment,
    *,
    random_crop: bool = False,
    flip_aug: bool = False,
    crop_rng: random.Random | None = None,
    flip_rng: random.Random | None = None,
) -> CropPlan:
    """A :class:`CropPlan`: centre crop, or a uniformly random offset when ``random_crop`` is set;
    a horizontal flip with probability 1/2 when ``flip_aug`` is set."""
    ex, ey = assignment.excess
    if random_crop and (ex or ey):
        if crop_rng is None:
            raise ValueError("random_crop needs a crop_rng")
        left, top = crop_rng.randint(0, ex), crop_rng.randint(0, ey)
    else:
        left, top = ex // 2, ey // 2
    flip = False
    if flip_aug:
        if flip_rng is None:
            raise ValueError("flip_aug needs a flip_rng")
        flip = flip_rng.random() < 0.5
    return CropPlan(
        original=original, resized=assignment.resized, bucket=assignment.bucket, left=left, top=top, flip=flip
    )


def apply_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize and crop ``image`` per ``plan`` in one resampling step (Lanczos), then flip if planned.

    ``image`` may be smaller than ``plan.original`` (a reduced-scale JPEG decode); the crop window is
    mapped onto it, so the result is the same region either way.
    """
    box = plan.source_box(image.size)
    out = image.resize(plan.bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 CHW tensor in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor`: a CHW tensor in [-1, 1] to an RGB image (for previews and tests)."""
    array = tensor.detach().cpu().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")
