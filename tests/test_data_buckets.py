"""Aspect-ratio buckets: the resolutions, where images land, and the limits."""

from __future__ import annotations

import math
import random

import pytest

from sdlora.data import BucketConfig, Bucketer, DatasetError, make_bucket_resolutions

CONFIGS = [
    BucketConfig(512),
    BucketConfig(768, min_bucket_reso=320, max_bucket_reso=1280),
    BucketConfig((512, 768)),
    BucketConfig(512, bucket_reso_steps=8, min_bucket_reso=256, max_bucket_reso=1024),
    BucketConfig(512, bucket_no_upscale=True),
    BucketConfig(1024, bucket_reso_steps=32, min_bucket_reso=512, max_bucket_reso=2048, bucket_no_upscale=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c.resolution) + ("-noup" if c.bucket_no_upscale else ""))
def test_bucket_resolutions_respect_limits(config):
    resos = make_bucket_resolutions(config)
    steps = config.bucket_reso_steps
    side = int(math.sqrt(config.max_area)) // steps * steps
    assert (side, side) in resos
    for w, h in resos:
        assert w % steps == 0 and h % steps == 0 and w % 8 == 0 and h % 8 == 0
        assert config.min_bucket_reso <= w <= config.max_bucket_reso
        assert config.min_bucket_reso <= h <= config.max_bucket_reso
        assert w * h <= config.max_area
        assert (h, w) in resos  # portrait for every landscape bucket


def test_default_buckets_match_kohya_for_512():
    resos = set(make_bucket_resolutions(BucketConfig(512)))
    # A few of kohya's well-known SD1.5 buckets at 512 (steps 64, 256..1024).
    for bucket in [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (1024, 256), (448, 576)]:
        assert bucket in resos
    assert len(resos) == 17


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c.resolution) + ("-noup" if c.bucket_no_upscale else ""))
def test_random_sizes_land_in_valid_buckets(config):
    rng = random.Random(0)
    bucketer = Bucketer(config)
    resos = make_bucket_resolutions(config)
    steps = config.bucket_reso_steps
    for _ in range(300):
        w = rng.randint(64, 6000)
        h = max(64, int(w / math.exp(rng.uniform(-2.2, 2.2))))
        a = bucketer.assign(w, h)
        bw, bh = a.bucket
        assert bw % steps == 0 and bh % steps == 0
        assert steps <= bw <= config.max_bucket_reso and steps <= bh <= config.max_bucket_reso
        assert bw * bh <= config.max_area
        rw, rh = a.resized
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, cropped on one axis
        assert abs(rw / rh - w / h) < 0.05 * (w / h) + 2 / min(rw, rh)  # aspect ratio kept by the resize
        if config.bucket_no_upscale:
            assert bw <= max(w, steps) and bh <= max(h, steps)  # never larger than the image
            assert rw <= max(w, bw) and rh <= max(h, bh)
        else:
            assert a.bucket in resos
            # Nearest aspect ratio: no other bucket is closer (in log-ratio distance).
            err = abs(math.log(bw / bh) - math.log(w / h))
            assert all(err <= abs(math.log(x / y) - math.log(w / h)) + 1e-12 for x, y in resos)


def test_obvious_assignments():
    b = Bucketer(BucketConfig(512))
    assert b.assign(1000, 1000).bucket == (512, 512)
    assert b.assign(300, 300).bucket == (512, 512)  # upscaled when allowed
    wide, tall = b.assign(1500, 1000).bucket, b.assign(1000, 1500).bucket
    assert wide == (tall[1], tall[0]) and wide[0] > wide[1]
    assert b.assign(4000, 100).bucket == (1024, 256)  # extreme ratios go to the extreme bucket
    assert b.assign(64, 4000).bucket == (256, 1024)


def test_no_upscale_keeps_small_images_small():
    b = Bucketer(BucketConfig(512, bucket_no_upscale=True))
    a = b.assign(300, 200)
    assert a.bucket == (256, 192)  # its own size rounded down to the step, not the 512 budget
    assert a.resized[0] <= 300 and a.resized[1] <= 200  # never enlarged
    big = b.assign(4000, 3000).bucket
    assert big[0] * big[1] <= 512 * 512 and big[0] / big[1] == pytest.approx(4 / 3, rel=0.2)
    strip = b.assign(3000, 100).bucket
    assert strip[0] <= 1024 and strip[1] == 64


def test_bucketing_off_is_one_square():
    b = Bucketer(BucketConfig(512, enable_bucket=False))
    assert make_bucket_resolutions(BucketConfig(512, enable_bucket=False)) == [(512, 512)]
    a = b.assign(1024, 512)
    assert a.bucket == (512, 512) and a.resized == (1024, 512)


def test_config_errors_name_the_option():
    with pytest.raises(DatasetError, match="bucket_reso_steps"):
        BucketConfig(512, bucket_reso_steps=60)
    with pytest.raises(DatasetError, match="min_bucket_reso"):
        BucketConfig(512, min_bucket_reso=1024, max_bucket_reso=512)
    with pytest.raises(DatasetError, match="resolution"):
        BucketConfig(500)
    with pytest.raises(DatasetError, match="max_bucket_reso"):
        BucketConfig(1024, max_bucket_reso=768)
    with pytest.raises(DatasetError, match="min_bucket_reso"):
        BucketConfig(512, min_bucket_reso=200)
