"""Latent and text-embedding caching: hits skip the encoders, changed files are encoded again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from sdlora.data import (
    BucketBatchSampler,
    BucketConfig,
    CachedDataset,
    CaptionConfig,
    DatasetError,
    ImageCaptionDataset,
    collate_batch,
    scan_dataset,
)

SMALL = BucketConfig(64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=8)


class CountingImageEncoder:
    """pixels -> 8x average-pooled 'latents'; counts how many images it was asked to encode."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dim() == 4 and pixels.shape[1] == 3
        self.calls += 1
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)


class CountingTextEncoder:
    """captions -> a small embedding derived from the text; counts captions encoded."""

    def __init__(self, as_dict: bool = False) -> None:
        self.texts = 0
        self.as_dict = as_dict

    def __call__(self, captions: list[str]):
        self.texts += len(captions)
        emb = torch.tensor([[len(c), sum(map(ord, c)) % 997, c.count(",")] for c in captions], dtype=torch.float32)
        return {"hidden": emb.unsqueeze(1).repeat(1, 5, 1), "pooled": emb} if self.as_dict else emb


def make_folder(root: Path) -> Path:
    (root / "2_set").mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    sizes = [(96, 64), (64, 64), (64, 96), (128, 64)]
    for i, (size, colour) in enumerate(zip(sizes, colours)):
        img = Image.new("RGB", size, colour)
        img.paste((255, 255, 255), (0, 0, size[0] // 3, size[1]))
        img.save(root / "2_set" / f"img{i}.png")
    (root / "2_set" / "img0.txt").write_text("a red thing")
    return root


def dataset(root: Path, **kwargs) -> ImageCaptionDataset:
    kwargs.setdefault("buckets", SMALL)
    kwargs.setdefault("captions", CaptionConfig(template="{caption}, {trigger}", trigger="sks"))
    return ImageCaptionDataset(scan_dataset(root).items, **kwargs)


def test_memory_cache_encodes_each_variant_once(tmp_path):
    root = make_folder(tmp_path / "data")
    enc_img, enc_txt = CountingImageEncoder(), CountingTextEncoder()
    ds = dataset(root, flip_aug=True)
    cached = CachedDataset(ds, encode_image=enc_img, encode_text=enc_txt, batch_size=3)
    progress = []
    cached.prepare(lambda done, total: progress.append((done, total)))
    assert enc_img.images == 4 * 2  # 4 images x (plain, mirrored)
    assert enc_txt.texts == 2  # "a red thing, sks" and "sks"
    assert progress[-1] == (10, 10)
    assert enc_img.calls >= 4  # batches never mix buckets: 4 buckets here
    sampler = BucketBatchSampler(cached.bucket_of_index, 2, seed=0)
    loader = DataLoader(cached, batch_sampler=sampler, collate_fn=collate_batch)
    for _ in range(3):
        for batch in loader:
            w, h = batch["bucket"]
            assert batch["latents"].shape[1:] == (3, h // 8, w // 8)
            assert batch["text_embeddings"].shape == (len(batch["captions"]), 3)
            assert "pixel_values" not in batch
    assert enc_img.images == 8 and enc_txt.texts == 2  # only hits after prepare()
    assert cached.stats.image_hits == 3 * len(ds) and cached.stats.text_hits == 3 * len(ds)


def test_cached_latents_match_the_pixels_they_came_from(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = dataset(root, flip_aug=True, seed=1)
    cached = CachedDataset(ds, encode_image=CountingImageEncoder())
    for i in range(len(ds)):
        key = (i, 3, 0)
        assert torch.allclose(cached[key]["latents"], F.avg_pool2d(ds[key]["pixel_values"][None], 8)[0])
        assert cached[key]["flipped"] == ds[key]["flipped"]


def test_disk_cache_survives_a_new_run_and_reencodes_changed_files(tmp_path):
    root = make_folder(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first_img, first_txt = CountingImageEncoder(), CountingTextEncoder(as_dict=True)
    first = CachedDataset(dataset(root), encode_image=first_img, encode_text=first_txt,
                          cache_dir=cache_dir, encoder_key="vae-a")
    first.prepare()
    assert first_img.images == 4 and first_txt.texts == 2
    assert len(list((cache_dir / "latents").glob("*.safetensors"))) == 4
    assert not list(cache_dir.rglob("*.tmp"))
    before = {Path(first[i]["path"]).name: first[i]["latents"] for i in range(len(first))}

    # A new run (fresh objects, nothing in memory) reads everything from disk.
    enc_img, enc_txt = CountingImageEncoder(), CountingTextEncoder(as_dict=True)
    again = CachedDataset(dataset(root), encode_image=enc_img, encode_text=enc_txt, cache_dir=cache_dir,
                          encoder_key="vae-a")
    again.prepare()
    sample = again[0]
    assert enc_img.images == 0 and enc_txt.texts == 0
    assert set(sample["text_embeddings"]) == {"hidden", "pooled"}
    assert sample["text_embeddings"]["hidden"].shape == (5, 3)

    # One image changes: only it is encoded again, and its latents change.
    changed = root / "2_set" / "img1.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    enc_img = CountingImageEncoder()
    third = CachedDataset(dataset(root), encode_image=enc_img, cache_dir=cache_dir, encoder_key="vae-a")
    third.prepare()
    assert enc_img.images == 1
    after = {Path(third[i]["path"]).name: third[i]["latents"] for i in range(len(third))}
    assert not torch.equal(after["img1.png"], before["img1.png"])
    assert all(torch.equal(after[n], before[n]) for n in before if n != "img1.png")

    # Another encoder (e.g. another VAE) does not reuse those latents.
    enc_img = CountingImageEncoder()
    CachedDataset(dataset(root), encode_image=enc_img, cache_dir=cache_dir, encoder_key="vae-b").prepare()
    assert enc_img.images == 4


def test_corrupt_cache_file_is_reencoded(tmp_path):
    root = make_folder(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    CachedDataset(dataset(root), encode_image=CountingImageEncoder(), cache_dir=cache_dir).prepare()
    victim = sorted((cache_dir / "latents").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    enc = CountingImageEncoder()
    cached = CachedDataset(dataset(root), encode_image=enc, cache_dir=cache_dir)
    cached.prepare()
    assert enc.images == 1
    for i in range(len(cached)):
        cached[i]  # every entry readable again


def test_lazy_encoding_without_prepare(tmp_path):
    root = make_folder(tmp_path / "data")
    enc = CountingImageEncoder()
    cached = CachedDataset(dataset(root), encode_image=enc)
    for _ in range(2):
        for i in range(len(cached)):
            cached[i]
    assert enc.images == 4  # 8 samples (2 repeats), each image encoded on first use only


def test_caption_dropout_adds_the_empty_caption(tmp_path):
    root = make_folder(tmp_path / "data")
    enc = CountingTextEncoder()
    cfg = CaptionConfig(template="{caption}, {trigger}", trigger="sks", caption_dropout_rate=0.5)
    cached = CachedDataset(dataset(root, captions=cfg), encode_text=enc)
    cached.prepare()
    assert enc.texts == 3 and sorted(cached.required_captions()) == ["", "a red thing, sks", "sks"]
    captions = {cached[(i, e, 0)]["caption"] for e in range(10) for i in range(len(cached))}
    assert "" in captions and enc.texts == 3
    assert "pixel_values" in cached[0]  # images are not cached without encode_image


def test_refuses_random_crop_and_varying_captions(tmp_path):
    root = make_folder(tmp_path / "data")
    with pytest.raises(DatasetError, match="random_crop"):
        CachedDataset(dataset(root, random_crop=True), encode_image=CountingImageEncoder())
    CachedDataset(dataset(root, random_crop=True), encode_text=CountingTextEncoder())  # text only is fine
    with pytest.raises(DatasetError, match="shuffle_tags"):
        CachedDataset(dataset(root, captions=CaptionConfig(shuffle_tags=True)), encode_text=CountingTextEncoder())


def test_encoder_output_is_checked(tmp_path):
    root = make_folder(tmp_path / "data")
    cached = CachedDataset(dataset(root), encode_image=lambda x: x.mean())
    with pytest.raises(DatasetError, match="encode_image"):
        cached.prepare()


def test_with_the_tiny_vae_and_text_encoder(tmp_path, tiny_pipe):
    root = make_folder(tmp_path / "data")
    for name in ("img0", "img2", "img3"):  # keep two images of one bucket: one VAE call
        (root / "2_set" / f"{name}.png").unlink()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(root / "2_set" / "other.png")
    (root / "2_set" / "other.txt").write_text("blue square")
    vae, te, tok = tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer
    calls = {"image": 0, "text": 0}

    def encode_image(pixels):
        calls["image"] += pixels.shape[0]
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def encode_text(captions):
        calls["text"] += len(captions)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    ds = dataset(root)
    cached = CachedDataset(ds, encode_image=encode_image, encode_text=encode_text, cache_dir=tmp_path / "c")
    cached.prepare()
    sample = cached[(0, 0, 0)]
    with torch.no_grad():
        expected = vae.encode(ds[(0, 0, 0)]["pixel_values"][None]).latent_dist.mean[0] * vae.config.scaling_factor
    assert torch.allclose(sample["latents"], expected, atol=1e-5)
    assert sample["text_embeddings"].shape == (77, te.config.hidden_size)
    assert calls == {"image": 2, "text": 2}
    again = CachedDataset(ds, encode_image=encode_image, encode_text=encode_text, cache_dir=tmp_path / "c")
    again.prepare()
    assert torch.equal(again[(0, 0, 0)]["latents"], sample["latents"])
    assert calls == {"image": 2, "text": 2}
