"""The trainer's batches: config -> dataset, cached latents and text outputs, batches with their conditioning.

Glue only: images, captions, buckets, batching and caching are :mod:`sdlora.data`; what the UNet is
conditioned on is :mod:`sdlora.train.conditioning`. What lives here is how a training run wires them together.
Class images (prior preservation) are :mod:`.class_images`, samples :mod:`.samples`, the file's training
facts :func:`sdlora.train.export.training_facts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import (
    BucketBatchSampler,
    BucketConfig,
    CachedDataset,
    CaptionConfig,
    DatasetError,
    ImageCaptionDataset,
    collate_batch,
    scan_dataset,
)
from ..data.scan import DatasetItem, DatasetScan
from .conditioning import Conditioner, TextConditioning, time_ids
from .config import ConfigError, TrainConfig, caption_trigger
from .events import EventLog, Message, Warning_


def caption_config(cfg: TrainConfig) -> CaptionConfig:
    template = cfg.caption_template
    trigger = caption_trigger(cfg)  # the new tokens (<s0><s1>) when the run learns them
    if "{trigger}" in template and not trigger:
        template = "{caption}" if "{caption}" in template else template
    try:
        return CaptionConfig(template=template, trigger=trigger, shuffle_tags=cfg.shuffle_caption,
                             keep_tokens=cfg.keep_tokens, caption_dropout_rate=cfg.caption_dropout_rate)
    except DatasetError as e:
        raise ConfigError("caption_template", str(e)) from None


def bucket_config(cfg: TrainConfig) -> BucketConfig:
    return BucketConfig(resolution=cfg.resolution, min_bucket_reso=min(cfg.min_bucket_reso, cfg.resolution),
                        max_bucket_reso=max(cfg.max_bucket_reso, cfg.resolution), bucket_reso_steps=cfg.bucket_reso_steps,
                        bucket_no_upscale=cfg.bucket_no_upscale, enable_bucket=cfg.enable_bucket)


def preflight(cfg: TrainConfig) -> DatasetScan:
    """Everything that can be checked before a model is loaded: the images and the caption settings."""
    try:
        scan = scan_dataset(cfg.train_data_dir, caption_extension=cfg.caption_extension)
    except DatasetError as e:
        raise ConfigError("train_data_dir", str(e)) from None
    caption_config(cfg)
    items = sum(item.repeats for item in scan.items)
    if cfg.train_batch_size > items:
        raise ConfigError("train_batch_size", f"is {cfg.train_batch_size}, but the dataset has {items} training images "
                          f"(with repeats); use at most {items}")
    if cfg.random_crop and cfg.cache_latents:
        raise ConfigError("random_crop", "cannot be used with cache_latents (a cached latent is one fixed crop); "
                          "turn one of them off")
    return scan


@dataclass
class Batch:
    latents: torch.Tensor
    captions: list[str]
    text: TextConditioning | None    # cached text-encoder outputs (frozen encoders), else None
    is_prior: torch.Tensor | None
    position: tuple[int, int] | None
    sample_ids: list[int]
    time_ids: torch.Tensor           # B x 6: original size, crop top-left, target size of each sample (SDXL)


class TrainData:
    """Batches for the loop: cached latents (and text embeddings when the text encoder is frozen),
    prior-preservation class images appended, a resumable position, and sharding across processes."""

    def __init__(self, cfg: TrainConfig, base, scan: DatasetScan, class_items: list[DatasetItem], accelerator,
                 log: EventLog, cache_dir: Path | None):
        self.cfg = cfg
        self.base = base
        self.conditioner = Conditioner(base)
        self.scan = scan
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        captions = caption_config(cfg)
        buckets = bucket_config(cfg)
        self.dataset = ImageCaptionDataset(scan.items, buckets=buckets, captions=captions, random_crop=cfg.random_crop,
                                           flip_aug=cfg.flip_aug, seed=cfg.seed)
        # Captions are encoded every step while the text encoder or new token embeddings train.
        cache_text = not cfg.train_text_encoder and not cfg.embedding_tokens and not captions.varies
        #: Whether the steps never call the text encoders / the VAE (their outputs are all cached).
        self.text_cached = cache_text
        self.latents_cached = bool(cfg.cache_latents)
        key = f"{cfg.pretrained_model_name_or_path}|{base.vae.dtype}"
        self.source = self._cached(self.dataset, cache_text, key, cache_dir, log, "training images")
        self.sampler = BucketBatchSampler(self.dataset.bucket_of_index, cfg.train_batch_size * self.world, seed=cfg.seed)
        self._iter = iter(())
        self.class_source = self.class_sampler = None
        self._class_iter = iter(())
        if class_items:
            class_ds = ImageCaptionDataset(class_items, buckets=buckets, captions=CaptionConfig(template=cfg.class_prompt),
                                           seed=cfg.seed + 1)
            self.class_source = self._cached(class_ds, not cfg.train_text_encoder and not cfg.embedding_tokens, key, cache_dir, log, "class images")
            self.class_buckets = class_ds.bucket_of_index
        self.position: tuple[int, int] | None = None
        self.class_position = 0
        self.drawn = 0  # global batches drawn so far: numbers every sample for its noise

    def _cached(self, dataset, cache_text: bool, key: str, cache_dir: Path | None, log: EventLog, what: str):
        encode_image = _vae_encoder(self.base) if self.cfg.cache_latents else None
        encode_text = _text_encoder(self.conditioner) if cache_text else None
        if encode_image is None and encode_text is None:
            return dataset
        cached = CachedDataset(dataset, encode_image=encode_image, encode_text=encode_text, cache_dir=cache_dir,
                               encoder_key=key)
        stats = cached.prepare(progress=lambda done, total: log.emit(Message(f"caching {what}", done, total))
                               if done == total or done % 16 == 0 else None)
        parts = []
        if encode_image is not None:
            parts.append(f"{stats.images_encoded} latents encoded, {stats.image_hits} from the cache")
        if encode_text is not None:
            parts.append(f"{stats.texts_encoded} captions encoded, {stats.text_hits} from the cache")
        log.emit(Message(f"cached {what}: {'; '.join(parts)}"))
        return cached

    # ---- facts ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.scan.num_images

    @property
    def num_items(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    # ---- batches ----------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        keys = next(self._iter, None)
        if keys is None:
            self._iter = iter(self.sampler)
            keys = next(self._iter)
        want = self.cfg.train_batch_size * self.world
        keys = [keys[i % len(keys)] for i in range(want)]  # pad a short last batch so every process gets one
        lo, hi = self.rank * self.cfg.train_batch_size, (self.rank + 1) * self.cfg.train_batch_size
        mine = keys[lo:hi]
        sample_ids = [2 * (self.drawn * want + i) for i in range(lo, hi)]
        self.drawn += 1
        batch = collate_batch([self.source[k] for k in mine])
        self.position = (mine[0].epoch, mine[0].batch)
        latents = batch["latents"] if "latents" in batch else self._encode_pixels(batch["pixel_values"])
        captions = list(batch["captions"])
        text = _cached_text(batch.get("text_embeddings"))
        ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
        is_prior = None
        if self.class_source is not None:
            c_latents, c_captions, c_text, c_ids = self._class_batch(latents.shape, len(mine))
            latents = torch.cat([latents, c_latents])
            captions += c_captions
            ids = torch.cat([ids, c_ids])
            if text is not None and c_text is not None:
                pooled = None if text.pooled is None else torch.cat([text.pooled, c_text.pooled])
                text = TextConditioning(torch.cat([text.hidden, c_text.hidden]), pooled)
            else:
                text = None
            is_prior = torch.tensor([False] * len(mine) + [True] * len(c_captions), device=self.device)
            sample_ids += [i + 1 for i in sample_ids]  # odd ids: the class images
        return Batch(latents.to(self.device), captions, text.to(self.device) if text is not None else None, is_prior,
                     self.position, sample_ids, ids.to(self.device))

    def _class_batch(self, shape, n: int):
        """``n`` class images in the same bucket as the instance batch (cycled in a fixed order)."""
        latents, caps, texts, sizes = [], [], [], []
        candidates = list(range(len(self.class_buckets)))
        tried = 0
        while len(latents) < n and tried < len(candidates) * 2:
            idx = candidates[self.class_position % len(candidates)]
            self.class_position += 1
            tried += 1
            s = self.class_source[(idx, 0)]
            lat = s["latents"] if "latents" in s else self._encode_pixels(s["pixel_values"][None])[0]
            if tuple(lat.shape) != tuple(shape[1:]):
                continue
            latents.append(lat)
            caps.append(s["caption"])
            texts.append(s.get("text_embeddings"))
            sizes.append((s["original_size"], s["crop_top_left"], s["target_size"]))
        if len(latents) < n:
            raise ConfigError("class_data_dir", f"no class image fits the training bucket {tuple(shape[2:])} latents; "
                              "use images of the same aspect ratio or enable_bucket=false")
        text = None
        if texts and texts[0] is not None:
            parts = [TextConditioning.from_cache(t) for t in texts]
            text = TextConditioning(torch.stack([p.hidden for p in parts]),
                                    None if parts[0].pooled is None else torch.stack([p.pooled for p in parts]))
        ids = time_ids(*zip(*sizes))
        return torch.stack(latents), caps, text, ids

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _vae_encoder(self.base)(pixels)

    def encode_prompts(self, batch: Batch, text_encoders) -> TextConditioning:
        """The batch's text conditioning: cached, or encoded now by ``text_encoders`` (trained or not)."""
        if batch.text is not None:
            return batch.text
        if self.cfg.train_text_encoder or self.cfg.embedding_tokens:
            return self.conditioner.encode(batch.captions, text_encoders)
        with torch.no_grad():
            return self.conditioner.encode(batch.captions, text_encoders)

    def unet_kwargs(self, batch: Batch, text: TextConditioning) -> dict[str, Any]:
        """The UNet's conditioning arguments for ``batch`` (SDXL adds the pooled embedding and time ids)."""
        return self.conditioner.unet_kwargs(text, batch.time_ids)

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(after=self.position), "class_position": self.class_position,
                "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ConfigError("train_data_dir", f"the training images changed since the checkpoint: {e}") from None
        self.class_position = int(state.get("class_position", 0))
        self.drawn = int(state.get("drawn", 0))
        self.position = None
        self._iter = iter(())


def _vae_encoder(base):
    vae = base.vae
    factor = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(vae.device, vae.dtype)
        # The distribution's mean: deterministic, so cached and uncached runs see the same latents.
        return ((vae.encode(pixels).latent_dist.mode() - shift) * factor).float().cpu()

    return encode


def _text_encoder(conditioner: Conditioner):
    """The text cache's encoder: frozen encoders' outputs in fp32 on the CPU (a dict for SDXL)."""

    @torch.no_grad()
    def encode(captions: list[str]):
        out = conditioner.encode(captions).to("cpu", torch.float32)
        return out.as_cache()

    return encode


def _cached_text(value) -> TextConditioning | None:
    return None if value is None else TextConditioning.from_cache(value)


def build(cfg: TrainConfig, base, class_items: list[DatasetItem], accelerator, log: EventLog, run_dir: Path) -> TrainData:
    scan = preflight(cfg)
    for s in scan.skipped:
        log.emit(Warning_(f"skipped {s.path}: {s.reason}"))
    for text in scan.warnings:
        log.emit(Warning_(text))
    cache_dir = (run_dir / "cache") if cfg.cache_latents_to_disk else None
    return TrainData(cfg, base, scan, class_items, accelerator, log, cache_dir)
