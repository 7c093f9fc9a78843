"""Aspect-ratio bucketing: which (width, height) each image trains at, and how it is resized.

Bucket resolutions follow kohya's scheme (our own implementation): for a target ``resolution``
(its area is the budget), every width from ``min_bucket_reso`` to ``max_bucket_reso`` in steps of
``bucket_reso_steps`` gets the tallest height, rounded down to the step, whose area fits the budget,
together with the transposed pair and the square bucket. An image goes to the bucket whose aspect
ratio is nearest (compared as ``|log(ar_image / ar_bucket)|``, so portrait and landscape are treated
alike), is resized so that it covers the bucket, and is then cropped to it.

With ``bucket_no_upscale`` an image is never enlarged: it gets its own bucket, its size scaled down
only as far as needed to fit the area budget and ``max_bucket_reso`` on each side, then rounded
down to the step. ``min_bucket_reso`` does not apply then (a small image trains at its own size),
and images of unusual shapes may end up alone in their bucket (batches of one).

With ``enable_bucket=False`` every image is resized to cover ``resolution`` and cropped to it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import DatasetError


@dataclass(frozen=True)
class BucketConfig:
    """Bucketing options; names and defaults follow kohya's sd-scripts.

    ``resolution`` is a side (``512``) or ``(width, height)``; its area is the pixel budget.
    """

    resolution: int | tuple[int, int] = 512
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    enable_bucket: bool = True

    def __post_init__(self) -> None:
        res = self.resolution
        if isinstance(res, (list, tuple)):
            if len(res) != 2:
                raise DatasetError(f"resolution must be one number or (width, height), got {res!r}")
            res = (int(res[0]), int(res[1]))
        else:
            res = (int(res), int(res))
        object.__setattr__(self, "resolution", res if res[0] != res[1] else res[0])
        w, h = res
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            raise DatasetError(f"resolution {self.resolution!r} must be positive multiples of 8 (the VAE scale)")
        steps = self.bucket_reso_steps
        if steps <= 0 or steps % 8:
            raise DatasetError(f"bucket_reso_steps must be a positive multiple of 8, got {steps}")
        if not self.enable_bucket:
            return
        for name in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value <= 0 or value % steps:
                raise DatasetError(f"{name} ({value}) must be a positive multiple of bucket_reso_steps ({steps})")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise DatasetError(
                f"min_bucket_reso ({self.min_bucket_reso}) is larger than max_bucket_reso ({self.max_bucket_reso})"
            )
        if not self.bucket_no_upscale:
            if self.min_bucket_reso > min(w, h):
                raise DatasetError(
                    f"min_bucket_reso ({self.min_bucket_reso}) must not exceed the resolution ({min(w, h)})"
                )
            if self.max_bucket_reso < max(w, h):
                raise DatasetError(
                    f"max_bucket_reso ({self.max_bucket_reso}) must be at least the resolution ({max(w, h)})"
                )
        if self.square_side < steps:
            raise DatasetError(f"resolution {self.resolution!r} is smaller than bucket_reso_steps ({steps})")

    @property
    def size(self) -> tuple[int, int]:
        """``resolution`` as (width, height)."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    @property
    def max_area(self) -> int:
        """The pixel budget: width x height of ``resolution``."""
        w, h = self.size
        return w * h

    @property
    def square_side(self) -> int:
        """Side of the square bucket: sqrt of the area, rounded down to ``bucket_reso_steps``."""
        steps = self.bucket_reso_steps
        return int(math.isqrt(self.max_area) // steps) * steps


def make_bucket_resolutions(config: BucketConfig) -> list[tuple[int, int]]:
    """The predefined buckets (width, height) for ``config``, sorted by aspect ratio (see module doc)."""
    if not config.enable_bucket:
        return [config.size]
    steps, area = config.bucket_reso_steps, config.max_area
    lo, hi = config.min_bucket_reso, config.max_bucket_reso
    side = config.square_side
    resos = {(side, side)}
    for width in range(lo, hi + 1, steps):
        height = min(hi, (area // width) // steps * steps)
        if height >= lo:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos, key=lambda r: (r[0] / r[1], r[0]))


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image trains: ``bucket`` (width, height) and the size it is resized to first.

    ``resized`` covers the bucket (each side >= the bucket's, one side equal); the crop then takes
    a ``bucket``-sized window out of the resized image.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]

    @property
    def excess(self) -> tuple[int, int]:
        """How many pixels the crop removes horizontally and vertically."""
        return (self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1])


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size ``size`` scales to so that it just covers ``bucket`` (aspect ratio kept)."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return (max(bw, round(w * scale)), max(bh, round(h * scale)))


class Bucketer:
    """Assigns images to buckets for one :class:`BucketConfig`."""

    def __init__(self, config: BucketConfig) -> None:
        self.config = config
        self.resolutions = make_bucket_resolutions(config)
        self._log_ratios = [math.log(w / h) for w, h in self.resolutions]

    def assign(self, width: int, height: int) -> BucketAssignment:
        """The bucket and resize size for an image of ``width`` x ``height`` pixels."""
        if width <= 0 or height <= 0:
            raise DatasetError(f"image size must be positive, got {width}x{height}")
        cfg = self.config
        if not cfg.enable_bucket:
            bucket = cfg.size
        elif cfg.bucket_no_upscale:
            bucket = self._own_bucket(width, height)
        else:
            log_ratio = math.log(width / height)
            best = min(range(len(self.resolutions)), key=lambda i: (abs(self._log_ratios[i] - log_ratio), i))
            bucket = self.resolutions[best]
        return BucketAssignment(bucket=bucket, resized=_cover((width, height), bucket))

    def _own_bucket(self, width: int, height: int) -> tuple[int, int]:
        cfg = self.config
        steps = cfg.bucket_reso_steps
        scale = min(1.0, math.sqrt(cfg.max_area / (width * height)), cfg.max_bucket_reso / max(width, height))
        bw = int(width * scale) // steps * steps
        bh = int(height * scale) // steps * steps
        return (min(max(bw, steps), cfg.max_bucket_reso), min(max(bh, steps), cfg.max_bucket_reso))


def bucket_histogram(sizes: Iterable[tuple[tuple[int, int], int]], config: BucketConfig) -> dict[tuple[int, int], int]:
    """Count of samples per bucket for ``(size, weight)`` pairs (weight: the image's repeats).

    Keys are (width, height), ordered by aspect ratio.
    """
    bucketer = Bucketer(config)
    counts: Counter[tuple[int, int]] = Counter()
    for (w, h), weight in sizes:
        counts[bucketer.assign(w, h).bucket] += weight
    return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0])))
