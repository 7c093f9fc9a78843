"""The trainer's side of the data: config -> dataset, cached encodings, batches, samples, class images.

Glue only: images, captions, buckets, batching and caching are :mod:`sdlora.data`; sampling is
:class:`sdlora.generate.Previewer`. What lives here is how a training run wires them together.
"""

from __future__ import annotations

import hashlib
import re
import time
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
    tag_frequency,
)
from ..data.scan import DatasetItem, DatasetScan
from ..paths import atomic_path, safe_name
from .conditioning import Conditioner, TextConditioning, time_ids
from .config import ConfigError, TrainConfig
from .events import EventLog, Message, Sample, Warning_


def caption_config(cfg: TrainConfig) -> CaptionConfig:
    template = cfg.caption_template
    if "{trigger}" in template and not cfg.trigger_word.strip():
        template = "{caption}" if "{caption}" in template else template
    try:
        return CaptionConfig(template=template, trigger=cfg.trigger_word, shuffle_tags=cfg.shuffle_caption,
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
        cache_text = not cfg.train_text_encoder and not captions.varies
        key = f"{cfg.pretrained_model_name_or_path}|{base.vae.dtype}"
        self.source = self._cached(self.dataset, cache_text, key, cache_dir, log, "training images")
        self.sampler = BucketBatchSampler(self.dataset.bucket_of_index, cfg.train_batch_size * self.world, seed=cfg.seed)
        self._iter = iter(())
        self.class_source = self.class_sampler = None
        self._class_iter = iter(())
        if class_items:
            class_ds = ImageCaptionDataset(class_items, buckets=buckets, captions=CaptionConfig(template=cfg.class_prompt),
                                           seed=cfg.seed + 1)
            self.class_source = self._cached(class_ds, not cfg.train_text_encoder, key, cache_dir, log, "class images")
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
        log.emit(Message(f"caching {what}", 0, 1))
        stats = cached.prepare(progress=lambda done, total: log.emit(Message(f"caching {what}", done, total))
                               if done == total or done % 16 == 0 else None)
        log.emit(Message(f"cached {what}: {stats}"))
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
        if self.cfg.train_text_encoder:
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
    cache_dir = (run_dir / "cache") if cfg.cache_latents_to_disk else None
    return TrainData(cfg, base, scan, class_items, accelerator, log, cache_dir)


# ---- class images (DreamBooth prior preservation) --------------------------------------------
def class_images_dir(cfg: TrainConfig) -> Path:
    if cfg.class_data_dir:
        return Path(cfg.class_data_dir)
    slug = safe_name(re.sub(r"\s+", "-", cfg.class_prompt.strip().lower()))[:60]
    return Path(cfg.output_dir) / "class-images" / f"{slug}-{_base_slug(cfg)}"


def _base_slug(cfg: TrainConfig) -> str:
    return hashlib.sha1(cfg.pretrained_model_name_or_path.encode()).hexdigest()[:8]


def ensure_class_images(cfg: TrainConfig, base, log: EventLog, accelerator) -> list[DatasetItem]:
    """Use the class images in the class folder; generate the missing ones once with the base model."""
    folder = class_images_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _class_scan(folder)
    missing = cfg.num_class_images - len(existing.items) if existing else cfg.num_class_images
    if missing > 0 and accelerator.is_main_process:
        from ..generate import Previewer

        prev = Previewer(base.pipe)
        start = len(list(folder.glob("class-*.png")))
        log.emit(Message(f"generating {missing} class images for '{cfg.class_prompt}'", 0, missing))
        for i in range(missing):
            n = start + i
            img = prev.generate(cfg.class_prompt, seed=cfg.seed * 100003 + n, steps=cfg.sample_steps,
                                guidance=cfg.sample_guidance, scheduler=cfg.sample_sampler,
                                width=cfg.resolution, height=cfg.resolution)[0]
            with atomic_path(folder / f"class-{n:05d}.png", suffix=".png") as tmp:
                img.save(tmp, format="PNG")
            log.emit(Message("generating class images", i + 1, missing))
    accelerator.wait_for_everyone()
    scan = _class_scan(folder)
    if scan is None:
        raise ConfigError("class_data_dir", f"no usable class images in {folder}")
    items = scan.items[: cfg.num_class_images] if cfg.num_class_images else scan.items
    return [DatasetItem(path=it.path, repeats=1, caption=None, size=it.size, group="class", caption_path=None)
            for it in items]


def _class_scan(folder: Path) -> DatasetScan | None:
    try:
        return scan_dataset(folder)
    except DatasetError:
        return None


# ---- samples and file metadata ----------------------------------------------------------------
def sample_prompts(cfg: TrainConfig) -> list[str]:
    prompts = cfg.sample_prompts or ["{caption}"]
    trigger = cfg.trigger_word.strip()
    out = []
    for p in prompts:
        p = p.replace("{trigger}", trigger) if trigger else re.sub(r",?\s*in \{trigger\} style", "", p).replace("{trigger}", "")
        out.append(p.replace("{caption}", "a picture" if not trigger else f"a picture in {trigger} style"))
    return out


def make_samples(cfg: TrainConfig, base, run, step: int, log: EventLog) -> list[Path]:
    from ..generate import Previewer

    prev = Previewer(base.pipe)
    prev.use_adapter("default", 1.0)
    paths = []
    prompts = sample_prompts(cfg)
    for i, prompt in enumerate(prompts):
        img = prev.generate(prompt, negative_prompt=cfg.sample_negative_prompt or None, seed=cfg.sample_seed + i,
                            steps=cfg.sample_steps, guidance=cfg.sample_guidance, scheduler=cfg.sample_sampler,
                            width=cfg.resolution, height=cfg.resolution)[0]
        path = run.samples_dir / f"step-{step:06d}-{i}.png"
        with atomic_path(path, suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        paths.append(path)
    log.emit(Sample(step=step, paths=[str(p) for p in paths], prompts=prompts))
    return paths


def training_metadata(cfg: TrainConfig, data: TrainData, step: int, t_start: float) -> dict[str, str]:
    """kohya ``ss_*`` facts of the run (the file writer adds the network and model fields)."""
    import json

    return {
        "ss_num_train_images": str(data.num_items),
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.effective_unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_optimizer": cfg.optimizer_type,
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma or None),
        "ss_noise_offset": str(cfg.noise_offset or None),
        "ss_seed": str(cfg.seed),
        "ss_sd_model_name": Path(cfg.pretrained_model_name_or_path).name,
        # kohya counts the tags of the caption files (not the templated training captions).
        "ss_tag_frequency": json.dumps(tag_frequency(data.scan.items)),
        "ss_dataset_dirs": json.dumps({g: {"n_repeats": n["repeats"], "img_count": n["images"]}
                                       for g, n in data.scan.groups().items()}),
        "ss_training_started_at": str(t_start),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.output_name,
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_flip_aug": str(cfg.flip_aug),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "sdlora_trigger_word": cfg.trigger_word,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
    }
