"""Measures for the demo world: does a picture show what its caption says, and how much of a style?

- :func:`read_scene` reads a picture back: background from the border, colour from the foreground
  pixels (nearest named colour), shape from a nearest-centroid classifier whose centroids are
  built from renders of :mod:`sdlora.demo.world` at start-up (no weights to ship).
- :func:`evaluate_prompt_following` samples a pipeline on the held-out colour x shape x background
  combinations and reports colour / shape / background accuracy.
- :func:`style_score` says how much of each style set's look a set of images has (higher = more).

These measures are the project's own; they use numpy and PIL only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import world

_TEMPLATE = 16


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H x W x 3), got an array of shape {arr.shape}")
    return arr


def border_color(arr: np.ndarray) -> np.ndarray:
    """Median RGB of the outermost two pixel rings (the background of a scene)."""
    b = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                        arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    return np.median(b, axis=0)


def _blur3(a: np.ndarray) -> np.ndarray:
    """3 x 3 binomial blur of a 2-D array (edges repeated)."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    k = np.array([1.0, 2.0, 1.0])
    return sum(k[i] * k[j] * p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 16.0


def foreground(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, distance)``: pixels that differ clearly from the border colour, and each pixel's distance.

    The distance is taken after a 3 x 3 median filter (and blurred a little), so film grain (the pastel style) neither makes
    holes in the shape nor specks in the background; low-contrast pairs such as pastel purple on pastel
    gray still stand out because the threshold follows the picture's own contrast.
    """
    smooth = np.asarray(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3)),
                        dtype=np.float32)
    dist = _blur3(np.linalg.norm(smooth - border_color(smooth), axis=2))
    top = float(np.percentile(dist, 99.5))
    thr = max(20.0, 0.5 * top)
    return dist > thr, dist


def _nearest(rgb: np.ndarray, *palettes: dict[str, tuple[int, int, int]]) -> str:
    """Name of the palette entry nearest to ``rgb``; with several palettes, the nearest over all of them.

    Several palettes let one name stand for several tones (the base colour and its pastel version),
    so a style that changes the tone of a colour does not change which colour is read.
    """
    names = [n for pal in palettes for n in pal]
    cols = np.asarray([pal[n] for pal in palettes for n in pal], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(cols - rgb[None], axis=1)))]


def _mask_template(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) < 6:
        return None
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    crop = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].astype(np.float32)
    img = Image.fromarray((crop * 255).astype(np.uint8), "L").resize((_TEMPLATE, _TEMPLATE), Image.Resampling.BILINEAR)
    t = np.asarray(img, dtype=np.float32).ravel() / 255.0
    return t


@lru_cache(maxsize=1)
def _shape_centroids() -> tuple[tuple[str, ...], np.ndarray]:
    """Mean bounding-box template of each shape over renders of all sizes and positions."""
    rng = random.Random(20240611)
    names = world.SHAPES
    cents = []
    for shape in names:
        temps = []
        for _ in range(24):
            scene = world.random_scene(rng, [(c, shape, b) for c in world.COLORS for b in world.BACKGROUNDS])
            mask, _ = foreground(_as_array(world.render(scene)))
            t = _mask_template(mask)
            if t is not None:
                temps.append(t)
        cents.append(np.mean(temps, axis=0))
    return names, np.stack(cents)


@dataclass(frozen=True)
class Reading:
    """What :func:`read_scene` sees in a picture (``None`` where nothing stands out)."""

    color: str | None
    shape: str | None
    background: str
    foreground_fraction: float


def read_scene(image: Image.Image | np.ndarray) -> Reading:
    """Read colour, shape and background of a picture of the demo world.

    A pastel tone reads as the colour (background) it stands for, so a style that only changes tones
    keeps the content reading: that is what "content is kept" means for the style tests.
    """
    arr = _as_array(image)
    bg = _nearest(border_color(arr), world.BACKGROUNDS, world.PASTEL_BACKGROUNDS)
    mask, dist = foreground(arr)
    frac = float(mask.mean())
    if mask.sum() < 6:
        return Reading(None, None, bg, frac)
    core = dist >= np.percentile(dist[mask], 50)
    color = _nearest(np.median(arr[mask & core], axis=0), world.COLORS, world.PASTEL_COLORS)
    t = _mask_template(mask)
    names, cents = _shape_centroids()
    shape = names[int(np.argmin(np.linalg.norm(cents - t[None], axis=1)))] if t is not None else None
    return Reading(color, shape, bg, frac)


def heldout_prompts() -> list[tuple[str, world.Scene]]:
    """``(prompt, scene)`` for each held-out combination (medium size, so no size word)."""
    out = []
    for color, shape, background in world.HELD_OUT:
        scene = world.Scene(shape=shape, color=color, background=background)
        out.append((world.caption(scene), scene))
    return out


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             batch_size: int = 16) -> list[Image.Image]:
    """Sample one image per (prompt, seed) with a diffusers pipeline, on CPU generators."""
    import torch

    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        ps = list(prompts[i:i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil")
        images.extend(out.images)
    return images


def evaluate_prompt_following(pipe, per_combo: int = 4, steps: int = 20, guidance: float = 6.0,
                              seed: int = 0, combos: int | None = None) -> dict:
    """Colour / shape / background accuracy of ``pipe`` on the held-out combinations.

    ``per_combo`` images (seeds ``seed``, ``seed+1``, ...) for each of the first ``combos`` held-out
    combinations (all by default). Returns the accuracies and the per-image readings.
    """
    items = heldout_prompts()[:combos]
    prompts, truths, seeds = [], [], []
    for k, (prompt, scene) in enumerate(items):
        for j in range(per_combo):
            prompts.append(prompt)
            truths.append(scene)
            seeds.append(seed + 1000 * k + j)
    images = generate(pipe, prompts, seeds, steps, guidance)
    readings = [read_scene(im) for im in images]
    n = len(images)
    return {
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "color_accuracy": sum(r.color == t.color for r, t in zip(readings, truths)) / n,
        "shape_accuracy": sum(r.shape == t.shape for r, t in zip(readings, truths)) / n,
        "background_accuracy": sum(r.background == t.background for r, t in zip(readings, truths)) / n,
        "readings": [dict(prompt=p, color=r.color, shape=r.shape, background=r.background)
                     for p, r in zip(prompts, readings)],
    }


def grid(images: Sequence[Image.Image], cols: int, labels: Sequence[str] | None = None,
         scale: int = 2) -> Image.Image:
    """Paste images into a grid (optionally with a small label under each), upscaled ``scale`` times."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    label_h = 12 if labels else 0
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + label_h + 4) + 4), (60, 60, 60))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = 4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + label_h + 4)
        sheet.paste(im.resize((w, h), Image.Resampling.NEAREST), (x, y))
        if labels:
            draw.text((x + 1, y + h), labels[i][: max(4, w // 6)], fill=(230, 230, 230))
    return sheet


def sample_grid(pipe, path: str | Path, steps: int = 20, guidance: float = 6.0, seed: int = 0) -> Path:
    """Save a grid of samples: each held-out combination (row pairs) and some training prompts."""
    rng = random.Random(seed)
    prompts = [p for p, _ in heldout_prompts()]
    prompts += [world.caption(s) for s in world.scenes(seed + 7, 12, world.train_combos())]
    seeds = [rng.randrange(2**31) for _ in prompts]
    images = generate(pipe, prompts, seeds, steps, guidance)
    labels = [p.replace("a ", "", 1).replace(" background", "").replace(" on a", " /") for p in prompts]
    sheet = grid(images, cols=6, labels=labels)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------- styles


def _gray(arr: np.ndarray) -> np.ndarray:
    return arr @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def stripes_score(image: Image.Image | np.ndarray) -> float:
    """Diagonal-stripe energy: contrast across 45-degree stripes minus contrast along them, relative.

    Stripes of the style run along the (1, -1) direction with a period of 1/8 of the image side;
    shifting by about half a period across them changes the pixel, along them it does not. Plain
    renders are symmetric and score about 0; the style scores well above 0.3.
    """
    g = _gray(_as_array(image))
    n = g.shape[0]
    across, along = 0.0, 0.0
    for d in (max(1, n // 32), max(1, 3 * n // 64), max(1, n // 16)):
        across += float(np.abs(g[d:, d:] - g[:-d, :-d]).mean())
        along += float(np.abs(g[d:, :-d] - g[:-d, d:]).mean())
    return (across - along) / (across + along + 1e-6)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.uint8) * 255, 1)
    img = Image.fromarray(padded, "L").copy()  # a private buffer: fromarray may share read-only memory
    ImageDraw.floodfill(img, (0, 0), 128)
    outside = np.asarray(img)[1:-1, 1:-1] == 128
    return ~outside


def outline_score(image: Image.Image | np.ndarray) -> float:
    """Share of the shape's filled area that is hollow (shows the background): about 0 for a filled shape.

    The foreground mask is closed by one pixel first, so thin or anti-aliased spots of an outline
    do not open its inside to the background.
    """
    mask, _ = foreground(_as_array(image))
    closed = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(ImageFilter.MaxFilter(3))) > 0
    filled = _fill_holes(closed)
    if filled.sum() < 6:
        return 0.0
    return float(1.0 - closed.sum() / filled.sum())


def pastel_score(image: Image.Image | np.ndarray) -> float:
    """Share of pixels (after a blur that removes grain) nearer the pastel palette than the base palette."""
    arr = np.asarray(Image.fromarray(np.clip(_as_array(image), 0, 255).astype(np.uint8)).filter(
        ImageFilter.BoxBlur(1)), dtype=np.float32)
    flat = arr.reshape(-1, 3)
    pastel = np.asarray(list(world.PASTEL_COLORS.values()) + list(world.PASTEL_BACKGROUNDS.values()), np.float32)
    base = np.asarray(list(world.COLORS.values()) + list(world.BACKGROUNDS.values()), np.float32)
    dp = np.linalg.norm(flat[:, None] - pastel[None], axis=2).min(axis=1)
    db = np.linalg.norm(flat[:, None] - base[None], axis=2).min(axis=1)
    return float(((dp < db) & (dp < 40.0)).mean())


_STYLE_SCORES = {"stripes": stripes_score, "outline": outline_score, "pastel": pastel_score}


def style_score(images: Iterable[Image.Image | np.ndarray] | Image.Image, style: str) -> float:
    """Mean score of ``style`` (one of ``world.STYLES``) over ``images``; higher = more of that style."""
    if style not in _STYLE_SCORES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(_STYLE_SCORES)}")
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    scores = [_STYLE_SCORES[style](im) for im in images]
    if not scores:
        raise ValueError("style_score needs at least one image")
    return float(np.mean(scores))
