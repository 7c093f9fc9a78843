"""A synthetic world of simple captioned scenes, drawn with PIL.

Every image shows one shape (circle, square, triangle, star, cross) of one colour on a plain
background, at one of three sizes and a random position; its caption says what is drawn, e.g.
``"a small red circle on a white background"``. Everything is deterministic from a seed: the same
seed gives the same scenes and the same pixels on every machine.

The same renderer also draws the *style sets* (``sdlora/sample_data/styles/``): the same content in a look
the base model never saw (diagonal stripes inside the shape, outline-only drawing, a pastel palette
with grain), so a style LoRA has something clear to learn and :mod:`sdlora.demo.metrics` has
something clear to measure.

This renderer is the project's own code; it uses only PIL and numpy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Foreground colours (name -> RGB). Chosen to be far apart in RGB so colour can be read back.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
#: Background colours (name -> RGB); none of them is a foreground colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: Size name -> radius of the shape as a fraction of the image side. "medium" is not written in captions.
SIZES: dict[str, float] = {"small": 0.17, "medium": 0.25, "large": 0.33}
STYLES: tuple[str, ...] = ("stripes", "outline", "pastel")

#: Pastel palette of the ``pastel`` style: each colour name maps to a fixed pastel tone.
PASTEL_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (244, 164, 172),
    "green": (168, 218, 176),
    "blue": (164, 190, 236),
    "yellow": (246, 228, 150),
    "purple": (206, 176, 226),
    "orange": (248, 196, 150),
}
#: Background tones of the ``pastel`` style (keyed by the background named in the caption).
PASTEL_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (252, 244, 228),
    "black": (92, 84, 104),
    "gray": (190, 184, 196),
}

#: Colour x shape x background combinations the base model never sees in training; the
#: prompt-following measure is taken on these. Each colour, shape and background still appears
#: in training in other combinations.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "star", "white"),
    ("green", "circle", "black"),
    ("blue", "triangle", "gray"),
    ("yellow", "cross", "black"),
    ("purple", "square", "white"),
    ("orange", "circle", "gray"),
    ("red", "square", "black"),
    ("green", "triangle", "white"),
    ("blue", "cross", "white"),
    ("yellow", "star", "gray"),
    ("purple", "triangle", "black"),
    ("orange", "star", "white"),
)

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn and where (centre as a fraction of the image side)."""

    shape: str
    color: str
    background: str
    size: str = "medium"
    cx: float = 0.5
    cy: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose one of {', '.join(COLORS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}"
            )
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (colour, shape, background) combination of this scene."""
        return (self.color, self.shape, self.background)


def caption(scene: Scene) -> str:
    """The caption of a scene, e.g. ``"a small red circle on a white background"``."""
    size = "" if scene.size == "medium" else scene.size + " "
    return f"a {size}{scene.color} {scene.shape} on a {scene.background} background"


def parse_caption(text: str) -> Scene:
    """Read a caption written by :func:`caption` back into a centred :class:`Scene`.

    Extra words (a trigger word, a style word) are ignored; raises ``ValueError`` when the text
    names no known colour, shape or background.
    """
    words = text.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    size = next((w for w in words if w in ("small", "large")), "medium")
    background = None
    for i, w in enumerate(words):
        if w in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            background = w
    if color is None or shape is None or background is None:
        raise ValueError(
            f"caption {text!r} does not name a colour ({', '.join(COLORS)}), a shape "
            f"({', '.join(SHAPES)}) and a background ('on a <{'|'.join(BACKGROUNDS)}> background')"
        )
    return Scene(shape=shape, color=color, background=background, size=size)


def all_combos() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) combination of the world, in a fixed order."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]


def train_combos() -> list[tuple[str, str, str]]:
    """The combinations the base model is trained on (all but :data:`HELD_OUT`)."""
    held = set(HELD_OUT)
    return [combo for combo in all_combos() if combo not in held]


def random_scene(rng: random.Random, combos: Sequence[tuple[str, str, str]] | None = None) -> Scene:
    """Draw a random scene (combination, size, position) from ``rng``."""
    color, shape, background = rng.choice(list(combos) if combos is not None else train_combos())
    size = rng.choice(tuple(SIZES))
    radius = SIZES[size]
    margin = radius + 0.04
    cx = rng.uniform(margin, 1.0 - margin)
    cy = rng.uniform(margin, 1.0 - margin)
    return Scene(shape=shape, color=color, background=background, size=size, cx=cx, cy=cy)


def scenes(seed: int, n: int, combos: Sequence[tuple[str, str, str]] | None = None) -> list[Scene]:
    """``n`` random scenes, deterministic from ``seed``."""
    rng = random.Random(seed)
    return [random_scene(rng, combos) for _ in range(n)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred on (cx, cy) with radius r (pixels); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Pointing up, centred on its bounding box.
        h = r * 1.8
        top, bottom = cy - h / 2, cy + h / 2
        return [(cx, top), (cx + r, bottom), (cx - r, bottom)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.1))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: int | tuple[int, ...] | None, outline: int | tuple[int, ...] | None = None,
                width: int = 0) -> None:
    pts = _polygon(shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def shape_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Anti-aliased coverage (0..1, float32, ``size x size``) of the filled shape of ``scene``."""
    big = size * _SUPERSAMPLE
    m = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(m), scene.shape, scene.cx * big, scene.cy * big, SIZES[scene.size] * big, 255)
    m = m.resize((size, size), Image.Resampling.BOX)
    return np.asarray(m, dtype=np.float32) / 255.0


def _outline_mask(scene: Scene, size: int, thickness: float) -> np.ndarray:
    big = size * _SUPERSAMPLE
    m = Image.new("L", (big, big), 0)
    w = max(1, round(thickness * _SUPERSAMPLE))
    _draw_shape(ImageDraw.Draw(m), scene.shape, scene.cx * big, scene.cy * big, SIZES[scene.size] * big,
                None, outline=255, width=w)
    m = m.resize((size, size), Image.Resampling.BOX)
    return np.asarray(m, dtype=np.float32) / 255.0


def stripe_pattern(size: int, period: float, phase: float = 0.0, angle_deg: float = 45.0) -> np.ndarray:
    """A 0/1 float32 pattern of stripes of the given period (pixels) and direction."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    a = math.radians(angle_deg)
    t = (x * math.cos(a) + y * math.sin(a)) / period + phase
    return ((t % 1.0) < 0.5).astype(np.float32)


def _compose(mask: np.ndarray, fg: Sequence[float] | np.ndarray, bg: Sequence[float]) -> np.ndarray:
    fg_arr = np.asarray(fg, dtype=np.float32)
    if fg_arr.ndim == 1:
        fg_arr = np.broadcast_to(fg_arr, mask.shape + (3,))
    bg_arr = np.broadcast_to(np.asarray(bg, dtype=np.float32), mask.shape + (3,))
    return mask[..., None] * fg_arr + (1.0 - mask[..., None]) * bg_arr


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, size: int = 64, style: str | None = None, seed: int = 0) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size x size`` pixels.

    ``style`` is None for the base look (a flat-coloured shape) or one of :data:`STYLES`:

    - ``"stripes"``: the shape is filled with diagonal stripes (45 degrees, period ``size/8``) of
      its colour and a dark shade of it;
    - ``"outline"``: only a thick outline (16 % of the radius) of the shape in its colour, the inside
      shows the background;
    - ``"pastel"``: colours replaced by the fixed pastel palette, with film grain (``seed`` fixes it).
    """
    fg = COLORS[scene.color]
    bg = BACKGROUNDS[scene.background]
    if style is None:
        return _to_image(_compose(shape_mask(scene, size), fg, bg))
    if style == "stripes":
        mask = shape_mask(scene, size)
        stripes = stripe_pattern(size, period=size / 8.0)
        dark = tuple(0.3 * c for c in fg)
        fill = _compose(stripes, fg, dark)
        return _to_image(mask[..., None] * fill + (1.0 - mask[..., None]) * np.asarray(bg, np.float32))
    if style == "outline":
        thickness = max(1.5, 0.16 * SIZES[scene.size] * size)
        return _to_image(_compose(_outline_mask(scene, size, thickness), fg, bg))
    if style == "pastel":
        arr = _compose(shape_mask(scene, size), PASTEL_COLORS[scene.color], PASTEL_BACKGROUNDS[scene.background])
        grain = np.random.default_rng(seed).normal(0.0, 10.0, size=(size, size, 1)).astype(np.float32)
        return _to_image(arr + grain)
    raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)} (or None for the base look)")


def render_many(items: Iterable[Scene], size: int = 64, style: str | None = None, seed: int = 0) -> list[Image.Image]:
    """Render several scenes; grain (for ``pastel``) is seeded per image from ``seed``."""
    return [render(s, size=size, style=style, seed=seed * 100003 + i) for i, s in enumerate(items)]


def texture_image(rng: random.Random, size: int = 64) -> Image.Image:
    """A random image of the world with a random look, for autoencoder training.

    Mixes plain scenes with random stripes (any angle and period), outlines of any thickness, any
    colours (not only the named ones) and grain, so that the autoencoder reconstructs textures and
    colours well beyond the base scenes. The base UNet never sees these.
    """
    combo_scene = random_scene(rng, all_combos())
    scene = replace(combo_scene, size=rng.choice(tuple(SIZES)))
    def rand_color() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    fg = rand_color() if rng.random() < 0.6 else COLORS[scene.color]
    bg = rand_color() if rng.random() < 0.5 else BACKGROUNDS[scene.background]
    kind = rng.random()
    if kind < 0.3:
        mask = shape_mask(scene, size)
        arr = _compose(mask, fg, bg)
    elif kind < 0.6:
        mask = shape_mask(scene, size)
        stripes = stripe_pattern(size, period=rng.uniform(3.0, 16.0), phase=rng.random(), angle_deg=rng.uniform(0, 180))
        fill = _compose(stripes, fg, rand_color())
        arr = mask[..., None] * fill + (1.0 - mask[..., None]) * np.asarray(bg, np.float32)
    elif kind < 0.85:
        mask = _outline_mask(scene, size, rng.uniform(1.0, size / 8.0))
        arr = _compose(mask, fg, bg)
    else:
        stripes = stripe_pattern(size, period=rng.uniform(3.0, 24.0), phase=rng.random(), angle_deg=rng.uniform(0, 180))
        arr = _compose(stripes, fg, bg)
    if rng.random() < 0.3:
        seed = rng.randrange(2**31)
        arr = arr + np.random.default_rng(seed).normal(0.0, rng.uniform(2.0, 16.0), size=(size, size, 1))
    return _to_image(arr)
