"""Sample images during and after training: the run's prompts with the adapter at scale 1."""

from __future__ import annotations

import re
from pathlib import Path

from ..paths import atomic_path
from .config import TrainConfig, caption_trigger
from .events import EventLog, Sample


def sample_prompts(cfg: TrainConfig) -> list[str]:
    prompts = cfg.sample_prompts or ["{caption}"]
    trigger = caption_trigger(cfg)  # the new tokens (<s0><s1>) when the run learns them
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
