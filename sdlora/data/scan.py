"""Finding the training images of a dataset folder and checking each one.

Folder layout (kohya's DreamBooth convention, extended):

* Images directly in the folder train once per epoch.
* Each subfolder named ``N_name`` (e.g. ``10_mystyle``) repeats its images ``N`` times per epoch;
  other subfolders count once. Folders nested deeper belong to their top-level subfolder.
  ``0_name`` folders are skipped (0 repeats). The dataset folder's own name is never parsed.
* A caption is the same-name ``.txt`` file next to the image (``cat.png`` -> ``cat.txt``).
* Files and folders whose names start with ``.`` are ignored (macOS ``._*`` files, cache folders),
  and so is every file that is not an image (captions, JSON, ...). Files of image formats that
  cannot be read here (HEIC, PSD, RAW, ...) are listed as skipped with what to do.

Every image is decoded once (JPEGs at reduced scale) so truncated or corrupt files are caught here
and not in the middle of training.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .buckets import BucketConfig, bucket_histogram
from .captions import CaptionConfig, read_caption, split_tags
from .errors import ImageLoadError, NoUsableImagesError, DatasetError
from .images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, image_size, read_image

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetItem:
    """One usable image: where it is, how often it repeats, its caption text and size.

    ``size`` is (width, height) after EXIF orientation. ``caption`` is the caption file's text
    (``None`` without one). ``group`` is the top-level folder it belongs to (the dataset folder's
    own name for images directly in it), the key of kohya's ``ss_tag_frequency``.
    """

    path: Path
    repeats: int
    caption: str | None
    size: tuple[int, int]
    group: str
    caption_path: Path | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file that looked like an image but cannot be used, and why."""

    path: Path
    reason: str


@dataclass
class DatasetScan:
    """The result of :func:`scan_dataset`: usable images, skipped files and warnings."""

    folder: Path
    items: list[DatasetItem]
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Number of usable images."""
        return len(self.items)

    @property
    def num_with_repeats(self) -> int:
        """Samples per epoch: each image counted ``repeats`` times."""
        return sum(item.repeats for item in self.items)

    @property
    def num_captioned(self) -> int:
        """Images that have a caption file."""
        return sum(item.caption is not None for item in self.items)

    def groups(self) -> dict[str, dict[str, int]]:
        """Per top-level folder: ``{"repeats": N, "images": count}``."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = out.setdefault(item.group, {"repeats": item.repeats, "images": 0})
            entry["images"] += 1
        return out

    def bucket_histogram(
        self, buckets: BucketConfig | int = 512, *, with_repeats: bool = True
    ) -> dict[tuple[int, int], int]:
        """Images per bucket (width, height) for a bucket config or a plain resolution."""
        config = buckets if isinstance(buckets, BucketConfig) else BucketConfig(resolution=buckets)
        return bucket_histogram(((i.size, i.repeats if with_repeats else 1) for i in self.items), config)

    def summary(self, buckets: BucketConfig | int = 512, captions: CaptionConfig | None = None) -> dict[str, Any]:
        """A JSON-ready summary for the UI's dataset check and the CLI."""
        histogram = self.bucket_histogram(buckets)
        out: dict[str, Any] = {
            "folder": str(self.folder),
            "images": self.num_images,
            "images_with_repeats": self.num_with_repeats,
            "captioned": self.num_captioned,
            "uncaptioned": self.num_images - self.num_captioned,
            "groups": self.groups(),
            "buckets": {f"{w}x{h}": n for (w, h), n in histogram.items()},
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "warnings": list(self.warnings),
        }
        if captions is not None:
            out["example_captions"] = [captions.base_caption(i.caption) for i in self.items[:5]]
            if not captions.uses_caption and out["captioned"]:
                out["warnings"].append(
                    f"the caption template {captions.template!r} has no {{caption}}: the {out['captioned']} "
                    "caption file(s) are not used"
                )
            if not captions.trigger and captions.uses_caption and out["uncaptioned"]:
                out["warnings"].append(
                    f"{out['uncaptioned']} image(s) have no caption file and no trigger word is set: "
                    "they train with an empty caption"
                )
        return out

    def report(self, buckets: BucketConfig | int = 512, captions: CaptionConfig | None = None) -> str:
        """The summary as plain text, one fact a line."""
        s = self.summary(buckets, captions)
        lines = [
            f"{s['folder']}: {s['images']} image(s), {s['images_with_repeats']} per epoch with repeats, "
            f"{s['captioned']} with a caption file",
        ]
        for name, g in s["groups"].items():
            lines.append(f"  {name}: {g['images']} image(s) x {g['repeats']} repeat(s)")
        lines.append("buckets (width x height: samples): " + ", ".join(f"{k}: {v}" for k, v in s["buckets"].items()))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {sk['path']}: {sk['reason']}" for sk in s["skipped"])
        if s["warnings"]:
            lines.append("warnings:")
            lines.extend(f"  {w}" for w in s["warnings"])
        return "\n".join(lines)


def _repeats_of(top_folder: str) -> int | None:
    m = _REPEATS_FOLDER.match(top_folder)
    return int(m.group(1)) if m else None


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _check_image(path: Path, min_side: int) -> tuple[int, int]:
    """Size of a usable image, or ImageLoadError. Decodes fully (JPEG at 1/8 scale) to catch corruption."""
    w, h = image_size(path)
    if min(w, h) < min_side:
        raise ImageLoadError(path, f"too small: {w}x{h} pixels, the short side is under {min_side} px")
    _, size = read_image(path, min_decode_size=(1, 1))
    return size


def scan_dataset(
    folder: str | Path,
    min_side: int = 64,
    *,
    caption_extension: str = ".txt",
    workers: int | None = None,
) -> DatasetScan:
    """Find and check every training image under ``folder`` (layout in the module docstring).

    Unusable files (unreadable, truncated, empty, not really images, smaller than ``min_side`` on
    the short side) are listed in ``.skipped`` with the reason; nothing is raised for them.

    Raises :class:`DatasetError` when ``folder`` is not a folder, and :class:`NoUsableImagesError`
    (carrying the scan) when it holds no usable image.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a folder; give the folder that holds the images")
    if min_side < 1:
        raise ValueError(f"min_side must be at least 1, got {min_side}")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension

    candidates: list[tuple[Path, int, str]] = []
    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    for path in _walk(root):
        ext = path.suffix.lower()
        if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(path, f"{ext} images cannot be read here; convert the file to PNG or JPEG"))
            continue
        if ext not in IMAGE_EXTENSIONS:
            continue
        parts = path.relative_to(root).parts
        if len(parts) == 1:
            group, repeats = root.name, 1
        else:
            group = parts[0]
            parsed = _repeats_of(group)
            repeats = 1 if parsed is None else parsed
        if repeats == 0:
            skipped.append(SkippedFile(path, f"folder {group!r} asks for 0 repeats"))
            continue
        candidates.append((path, repeats, group))

    def check(candidate: tuple[Path, int, str]) -> tuple[int, int] | ImageLoadError:
        try:
            return _check_image(candidate[0], min_side)
        except ImageLoadError as e:
            return e

    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if n_workers > 1 and len(candidates) > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(pool.map(check, candidates))
    else:
        results = [check(c) for c in candidates]

    items: list[DatasetItem] = []
    for (path, repeats, group), result in zip(candidates, results):
        if isinstance(result, ImageLoadError):
            skipped.append(SkippedFile(path, result.reason))
            continue
        caption_path = path.with_suffix(caption_extension)
        caption = None
        if caption_path.is_file():
            caption, warning = read_caption(caption_path)
            if warning:
                warnings.append(warning)
        else:
            caption_path = None
        items.append(DatasetItem(path, repeats, caption, result, group, caption_path))

    skipped.sort(key=lambda s: str(s.path))
    scan = DatasetScan(root, items, skipped, warnings)
    if not items:
        if skipped:
            detail = f"; {len(skipped)} file(s) were skipped, e.g. {skipped[0].path.name}: {skipped[0].reason}"
        else:
            detail = f"; no files with an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}) were found"
        raise NoUsableImagesError(f"no usable training image in {root}{detail}", scan)
    return scan


def tag_frequency(
    items: Iterable[DatasetItem], captions: CaptionConfig | None = None
) -> dict[str, dict[str, int]]:
    """Tag counts per folder in the shape of kohya's ``ss_tag_frequency``: ``{group: {tag: count}}``.

    Each image counts once (repeats do not multiply). Without ``captions`` the caption files' tags
    are counted (images without one add nothing); with it, the caption each image trains with
    (template and trigger applied, no shuffle or dropout).
    """
    out: dict[str, Counter[str]] = {}
    for item in items:
        counter = out.setdefault(item.group, Counter())
        text = captions.base_caption(item.caption) if captions is not None else item.caption
        if text:
            counter.update(split_tags(text, captions.separator if captions else ","))
    return {group: dict(counter) for group, counter in out.items()}
