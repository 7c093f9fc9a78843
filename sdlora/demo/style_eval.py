"""Measure what a style LoRA does on the demo model: style metric by LoRA scale, content kept.

Used by the style-learning test and ``benchmarks/bench_demo.py``; the same numbers a person sees
when sliding the scale in the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics


@dataclass
class StyleReport:
    style: str
    scales: list[float]
    style_scores: list[float]            # per scale
    color_accuracy: list[float]          # per scale
    shape_accuracy: list[float]          # per scale
    images: dict[float, list] = field(default_factory=dict, repr=False)


def eval_prompts(trigger: str, n: int = 8) -> list[tuple[str, object]]:
    """Held-out content prompts with the trigger phrase the style set was trained with."""
    items = metrics.heldout_prompts()[:n]
    return [(f"{prompt}, in {trigger} style", scene) for prompt, scene in items]


def evaluate_style(previewer, style: str, trigger: str, scales: Sequence[float] = (0.0, 0.5, 1.0), *, n: int = 8,
                   steps: int = 20, guidance: float = 6.0, seed: int = 0) -> StyleReport:
    """Generate the held-out prompts at each LoRA scale (same seeds) and score style and content."""
    items = eval_prompts(trigger, n)
    prompts = [p for p, _ in items]
    truths = [s for _, s in items]
    report = StyleReport(style=style, scales=list(scales), style_scores=[], color_accuracy=[], shape_accuracy=[])
    for scale in scales:
        images = []
        for i, prompt in enumerate(prompts):
            images += previewer.generate(prompt, seed=seed + i, steps=steps, guidance=guidance, scale=scale,
                                         scheduler="dpmpp_2m")
        readings = [metrics.read_scene(im) for im in images]
        report.images[float(scale)] = images
        report.style_scores.append(metrics.style_score(images, style))
        report.color_accuracy.append(float(np.mean([r.color == t.color for r, t in zip(readings, truths)])))
        report.shape_accuracy.append(float(np.mean([r.shape == t.shape for r, t in zip(readings, truths)])))
    return report


def save_scale_grid(report: StyleReport, path: str | Path) -> Path:
    """One row per scale, one column per prompt."""
    rows = [report.images[s] for s in report.scales]
    flat = [im for row in rows for im in row]
    labels = [f"scale {s:g}" if j == 0 else "" for s in report.scales for j in range(len(rows[0]))]
    img = metrics.grid(flat, cols=len(rows[0]), labels=labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
