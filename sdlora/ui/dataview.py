"""The dataset check of the Dataset tab: the training loader's own scan, rendered for people.

Which files are usable, and how many images land in which bucket, come from the training API's
:func:`sdlora.train.dataset_check` (the loader's scan with the trainer's own bucket and caption
settings), so the page shows exactly what training will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import form
from .errors import esc

#: Training options the check depends on (bucketing and captions).
CHECK_FIELDS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale", "caption_template", "caption_extension")


@dataclass
class DatasetView:
    """What the dataset tab shows: usable images (path, label), their names, the check as HTML, the
    problems worth a message box, and the unusable files (relative names)."""

    gallery: list[tuple[str, str]]
    names: list[str]
    html: str
    problems: list[str]
    skipped: list[str] = field(default_factory=list)


def dataset_view(folder: Path, trigger_word: str, check: dict[str, Any], refused: Sequence[str] = ()) -> DatasetView:
    """Scan the dataset with the training loader's own check and render gallery and report."""
    from ..train import TrainConfig, dataset_check

    parts = ['<div class="sdl-check" id="sdl-check">']
    problems = list(refused)
    if refused:
        parts.append(f'<div class="bad"><b>{len(refused)} upload(s) were not added:</b></div><ul>')
        parts.extend(f"<li>{esc(r)}</li>" for r in refused)
        parts.append("</ul>")
    if not folder.is_dir() or not any(not p.name.startswith(".") for p in folder.iterdir()):
        parts.append('<div><b class="bad">The dataset is empty.</b> Upload images (or a .zip of them) to '
                     "train on.</div></div>")
        return DatasetView([], [], "".join(parts), problems + ["The dataset is empty: upload images first."])
    values = {k: form.parse_value(form.field(k), v) for k, v in check.items() if k in CHECK_FIELDS}
    # Buckets and captions exactly as the trainer builds them from these settings.
    result = dataset_check(TrainConfig.from_dict(dict(values, trigger_word=(trigger_word or "").strip(),
                                                      train_data_dir=str(folder)), validate=False))
    scan = result.scan
    gallery, names = [], []
    for item in scan.items:
        name = _rel(folder, item.path)
        cap = short((item.caption or "").strip())
        gallery.append((str(item.path), f"{name}: {cap}" if cap else f"{name} (no caption)"))
        names.append(name)
    warnings = list(scan.warnings)
    summary = result.summary
    if summary is not None:
        if result.caption_error:
            problems.append(result.caption_error)
        warnings = summary.get("warnings", warnings)
        if result.bucket_error:
            bucket_text = f'<span class="bad">The bucket settings are invalid: {esc(result.bucket_error)}</span>'
        else:
            hist = summary["buckets"]
            bucket_text = (f"{len(hist)} bucket(s): "
                           + ", ".join(f"{esc(k)} px &times; {v}" for k, v in hist.items()))
        parts.append(f'<div><b>{summary["images"]} image(s) will be used</b> '
                     f'({summary["images_with_repeats"]} per epoch with repeats, '
                     f'{summary["captioned"]} with a caption file). {bucket_text}</div>')
        if summary.get("example_captions"):
            parts.append('<div class="sdl-hint">Training captions, e.g.: '
                         + " | ".join(f"<code>{esc(short(c))}</code>" if c else "<i>(empty)</i>"
                                      for c in summary["example_captions"][:3])
                         + "</div>")
    else:
        parts.append('<div><b class="bad">No usable image: training cannot start.</b> Upload images '
                     "(PNG, JPEG, WebP, ...).</div>")
        problems.append("No usable image in the dataset.")
    if scan.skipped:
        parts.append(f'<div class="bad"><b>{len(scan.skipped)} file(s) cannot be used and will be skipped:</b>'
                     "</div><ul>")
        for sk in scan.skipped:
            rel = _rel(folder, sk.path)
            parts.append(f"<li><code>{esc(short(rel))}</code>: {esc(short(sk.reason))}</li>")
            problems.append(f"{short(rel)}: {short(sk.reason)}")
        parts.append("</ul>")
    for w in warnings:
        parts.append(f'<div class="sdl-hint">Note: {esc(short(w))}</div>')
        problems.append(short(w))
    parts.append("</div>")
    return DatasetView(gallery, names, "".join(parts), problems, [_rel(folder, sk.path) for sk in scan.skipped])


#: Longest caption (or other text from a file) the check and the gallery show; the whole text stays in the file.
MAX_SHOWN = 200


def short(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, saying how much more there is."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}... ({len(text) - limit:,} more characters)"


def _rel(folder: Path, path: Path) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).name
