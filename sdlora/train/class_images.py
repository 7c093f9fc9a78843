"""DreamBooth prior preservation: the class images of a run, generated once with the base model."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..data import DatasetError, scan_dataset
from ..data.scan import DatasetItem, DatasetScan
from ..paths import atomic_path, safe_name
from .config import ConfigError, TrainConfig
from .events import EventLog, Message


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
