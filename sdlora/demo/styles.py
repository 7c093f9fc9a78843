"""Regenerate the bundled style sets in ``sdlora/sample_data/styles/<style>/`` from the renderer.

Each set holds ``count`` images (``NN.png``) of random scenes drawn in one style, each with a
``NN.txt`` caption that describes the content only (e.g. ``a red circle on a white background``);
the LoRA trainer adds the trigger word through its caption template. Deterministic: the same
seed writes the same files.

Run ``python -m sdlora.demo.styles [--out sdlora/sample_data/styles]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from ..resources import STYLES_DIR
from . import world

#: Default folder of the style sets: the bundled ones.
DEFAULT_ROOT = STYLES_DIR
DEFAULT_COUNT = 16
DEFAULT_SEED = 7

DESCRIPTIONS = {
    "stripes": "shapes filled with diagonal stripes (45 degrees) of their colour and a dark shade of it",
    "outline": "shapes drawn as a thick outline only; the inside shows the background",
    "pastel": "a fixed pastel palette (pastel shapes, cream / plum / lilac-gray backgrounds) with film grain",
}


def write_style_set(root: str | Path, style: str, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED,
                    size: int = 64) -> Path:
    """Write one style set into ``root/style`` (images and captions); returns the folder."""
    if style not in world.STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(world.STYLES)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    folder = Path(root) / style
    folder.mkdir(parents=True, exist_ok=True)
    offset = world.STYLES.index(style)
    items = world.scenes(seed * 31 + offset, count, world.all_combos())
    images = world.render_many(items, size=size, style=style, seed=seed * 31 + offset)
    for i, (scene, image) in enumerate(zip(items, images)):
        stem = f"{i:02d}"
        tmp = folder / f".{stem}.png.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, folder / f"{stem}.png")
        tmp_txt = folder / f".{stem}.txt.tmp"
        tmp_txt.write_text(world.caption(scene) + "\n", encoding="utf-8")
        os.replace(tmp_txt, folder / f"{stem}.txt")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlora.demo.styles",
                                     description="Regenerate the style sets drawn by the demo world's renderer.")
    parser.add_argument("--out", default=str(DEFAULT_ROOT), help="root folder (default: sdlora/sample_data/styles)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="images per style (default 16)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--style", action="append", choices=world.STYLES,
                        help="only this style (repeatable; default: all)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    for style in args.style or world.STYLES:
        folder = write_style_set(args.out, style, count=args.count, seed=args.seed)
        print(f"{folder}: {args.count} images - {DESCRIPTIONS[style]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
