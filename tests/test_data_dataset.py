"""The dataset folder layout (repeats), the scan summary, samples, crops, flips and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdlora.data import (
    BucketBatchSampler,
    BucketConfig,
    CaptionConfig,
    DatasetError,
    ImageCaptionDataset,
    collate_batch,
    scan_dataset,
    to_image,
)

SMALL = BucketConfig(64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=8)


def stripes(size: tuple[int, int], colours=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> Image.Image:
    """Vertical stripes: left quarter, middle half, right quarter."""
    w, h = size
    img = Image.new("RGB", size, colours[1])
    img.paste(colours[0], (0, 0, w // 4, h))
    img.paste(colours[2], (w - w // 4, 0, w, h))
    return img


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "my set"
    (root / "3_style" / "nested").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "0_off").mkdir()
    (root / ".cache").mkdir()
    stripes((96, 64)).save(root / "plain.png")
    stripes((64, 128)).save(root / "3_style" / "a.png")
    (root / "3_style" / "a.txt").write_text("red, hat\n")
    stripes((128, 128)).save(root / "3_style" / "b.jpg", quality=95)
    stripes((160, 80)).save(root / "3_style" / "nested" / "c.png")
    (root / "3_style" / "nested" / "c.txt").write_text("blue")
    stripes((80, 80)).save(root / "other" / "d.png")
    stripes((80, 80)).save(root / "0_off" / "e.png")
    stripes((80, 80)).save(root / ".cache" / "f.png")
    return root


def test_scan_repeats_groups_and_captions(folder):
    scan = scan_dataset(folder)
    by_name = {i.path.name: i for i in scan.items}
    assert set(by_name) == {"plain.png", "a.png", "b.jpg", "c.png", "d.png"}
    assert {n: i.repeats for n, i in by_name.items()} == {"plain.png": 1, "a.png": 3, "b.jpg": 3, "c.png": 3, "d.png": 1}
    assert {n: i.group for n, i in by_name.items()} == {
        "plain.png": "my set", "a.png": "3_style", "b.jpg": "3_style", "c.png": "3_style", "d.png": "other"}
    assert by_name["a.png"].caption == "red, hat" and by_name["c.png"].caption == "blue"
    assert by_name["b.jpg"].caption is None and by_name["a.png"].size == (64, 128)
    assert [s.path.name for s in scan.skipped] == ["e.png"] and "0 repeats" in scan.skipped[0].reason
    assert scan.num_images == 5 and scan.num_with_repeats == 11 and scan.num_captioned == 2
    assert scan.groups() == {"my set": {"repeats": 1, "images": 1}, "3_style": {"repeats": 3, "images": 3},
                             "other": {"repeats": 1, "images": 1}}


def test_scan_summary_and_report(folder):
    scan = scan_dataset(folder)
    hist = scan.bucket_histogram(SMALL)
    assert sum(hist.values()) == scan.num_with_repeats
    assert sum(scan.bucket_histogram(SMALL, with_repeats=False).values()) == scan.num_images
    assert hist[(64, 64)] == 3 + 1  # b.jpg x3 and d.png
    summary = scan.summary(SMALL, CaptionConfig(template="{caption}, {trigger}", trigger="sks"))
    json.dumps(summary)  # JSON-ready for the UI
    assert summary["images"] == 5 and summary["images_with_repeats"] == 11
    assert summary["buckets"]["64x64"] == 4
    assert summary["skipped"][0]["reason"] and "sks" in summary["example_captions"]
    unused = scan.summary(SMALL, CaptionConfig(template="art by {trigger}", trigger="sks"))
    assert any("2 caption file(s) are not used" in w for w in unused["warnings"])
    empty = scan.summary(SMALL, CaptionConfig())
    assert any("3 image(s) have no caption file" in w for w in empty["warnings"])
    report = scan.report(SMALL)
    assert "5 image(s)" in report and "e.png" in report and "64x64: 4" in report


def test_samples_have_bucket_shapes_and_range(folder):
    ds = ImageCaptionDataset.from_folder(folder, buckets=SMALL,
                                         captions=CaptionConfig(template="{caption}, {trigger}", trigger="sks"))
    assert ds.scan is not None and len(ds) == 11
    seen_captions = set()
    for i in range(len(ds)):
        s = ds[i]
        w, h = s["bucket"]
        assert s["pixel_values"].shape == (3, h, w) and s["pixel_values"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
        assert s["target_size"] == (h, w) and s["bucket"] == ds.bucket_of_index[i]
        seen_captions.add((Path(s["path"]).name, s["caption"]))
    assert ("a.png", "red, hat, sks") in seen_captions and ("b.jpg", "sks") in seen_captions
    assert ("c.png", "blue, sks") in seen_captions


def _one_image_dataset(tmp_path, size, **kwargs) -> ImageCaptionDataset:
    stripes(size).save(tmp_path / "img.png")
    return ImageCaptionDataset(scan_dataset(tmp_path).items, **kwargs)


def test_centre_crop_and_flip(tmp_path):
    # 128x64 into a 64x64 square: resized 128x64, the centre crop is the green middle half.
    ds = _one_image_dataset(tmp_path, (128, 64), buckets=BucketConfig(64, enable_bucket=False))
    s = ds[0]
    assert s["crop_top_left"] == (0, 32) and s["original_size"] == (64, 128)
    img = to_image(s["pixel_values"])
    assert img.getpixel((1, 32)) == (0, 255, 0) and img.getpixel((62, 32)) == (0, 255, 0)

    ds = _one_image_dataset(tmp_path, (160, 64), buckets=SMALL, flip_aug=True, seed=3)
    samples = [ds[(0, epoch, 0)] for epoch in range(12)]
    plain = [s for s in samples if not s["flipped"]]
    flipped = [s for s in samples if s["flipped"]]
    assert plain and flipped  # both happen
    assert torch.equal(flipped[0]["pixel_values"], torch.flip(plain[0]["pixel_values"], dims=[-1]))
    left = to_image(plain[0]["pixel_values"]).getpixel((0, 10))
    assert left[0] > 200 and left[2] < 50  # red stays on the left unflipped
    assert to_image(flipped[0]["pixel_values"]).getpixel((0, 10))[2] > 200  # blue on the left when flipped
    # The same key gives the same sample.
    assert torch.equal(ds[(0, 5, 0)]["pixel_values"], samples[5]["pixel_values"])


def test_random_crop_offsets_vary_and_are_seeded(tmp_path):
    ds = _one_image_dataset(tmp_path, (128, 64), buckets=BucketConfig(64, enable_bucket=False),
                            random_crop=True, seed=1)
    offsets = [ds.plan((0, e, 0)).crop.left for e in range(30)]
    assert all(0 <= o <= 64 for o in offsets) and len(set(offsets)) > 10
    assert offsets == [ds.plan((0, e, 0)).crop.left for e in range(30)]
    # No resize is needed (64 high already), so each sample is exactly its window of the original.
    original = stripes((128, 64))
    for epoch in range(0, 30, 5):
        left = offsets[epoch]
        got = to_image(ds[(0, epoch, 0)]["pixel_values"])
        assert list(got.getdata()) == list(original.crop((left, 0, left + 64, 64)).getdata())


def test_exif_rotated_image_gets_a_portrait_bucket(tmp_path):
    stored = Image.new("RGB", (128, 64), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "r.jpg", exif=exif)
    ds = ImageCaptionDataset(scan_dataset(tmp_path).items, buckets=SMALL)
    w, h = ds[0]["bucket"]
    assert h > w and ds[0]["pixel_values"].shape == (3, h, w)


def test_loader_batches_are_single_bucket_and_cover_the_epoch(folder):
    ds = ImageCaptionDataset.from_folder(folder, buckets=SMALL, seed=0)
    sampler = BucketBatchSampler(ds.bucket_of_index, batch_size=2, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch)
    seen = []
    for batch in loader:
        w, h = batch["bucket"]
        assert batch["pixel_values"].shape[1:] == (3, h, w)
        assert all(ds.bucket_of_index[i] == (w, h) for i in batch["indices"])
        assert batch["position"][0] == 0 and len(batch["captions"]) == len(batch["indices"])
        seen.extend(batch["indices"])
    assert sorted(seen) == list(range(len(ds)))
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["batch_index"] == 0


def test_collate_refuses_mixed_buckets(folder):
    ds = ImageCaptionDataset.from_folder(folder, buckets=SMALL)
    a = next(i for i in range(len(ds)) if ds.bucket_of_index[i] == (64, 64))
    b = next(i for i in range(len(ds)) if ds.bucket_of_index[i] != (64, 64))
    with pytest.raises(DatasetError, match="one bucket"):
        collate_batch([ds[a], ds[b]])
