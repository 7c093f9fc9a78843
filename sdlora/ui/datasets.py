"""Dataset folders of the web app: uploads, zip files, captions and bundled style sets.

Uploaded datasets live in ``<runs>/_datasets/<name>/`` (a leading ``_`` can never be a run name, so
they never collide with run directories, and they sit inside the folder gradio may serve). Every
name that comes from a user - dataset names, upload file names, zip entry names - goes through
:func:`sdlora.paths.safe_name`, and every path is checked to stay inside its dataset folder.

Which files are usable for training is decided by the training data loader's own check
(:func:`sdlora.data.scan_dataset`); this module only stores files, so the page shows exactly what
training will use.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from ..paths import atomic_path, atomic_write_text, inside, safe_name
from ..resources import STYLES_DIR
from .errors import UIError

DATASETS_DIRNAME = "_datasets"
CAPTION_EXTENSION = ".txt"
#: Files a dataset upload keeps: images the loader reads, formats it reports as unusable (so the
#: check can say why), and caption files.
KEPT_EXTENSIONS = frozenset(IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS | {CAPTION_EXTENSION})
#: Most files taken from one zip archive, and how many times its packed size it may unpack to
#: (a guard against zip bombs; real image zips barely compress).
MAX_ZIP_MEMBERS = 10_000
_COPY_CHUNK = 1 << 20
_REPEATS = re.compile(r"^\d+_.+")


def bundled_styles_dir() -> Path:
    return STYLES_DIR


@dataclass
class UploadReport:
    """What an upload did: files stored (safe names) and files refused, each with the reason."""

    added: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: "UploadReport") -> None:
        self.added.extend(other.added)
        self.rejected.extend(other.rejected)


def datasets_root(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / DATASETS_DIRNAME


#: Longest stored file name (the file systems' limit is 255 bytes; names stay well below it).
MAX_NAME = 128
#: A dataset folder made from a name that had to be changed records the name as typed here (hidden
#: files are not read as data), so another name that becomes the same folder is refused.
TYPED_NAME_FILE = ".typed-name"


def _ascii(text: str) -> str:
    """Accents dropped (ü -> u), so a name keeps its letters when made safe."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def dataset_name(name: str) -> str:
    """The folder name a user-given dataset name is stored under (an error when nothing usable remains)."""
    clean = safe_name(_ascii((name or "").strip()), default="").strip("-_.")
    if not clean:
        raise UIError(f"{name!r} cannot name a dataset: use letters, digits, '-', '_' or '.'.",
                      title="Dataset name")
    return clean[:MAX_NAME]


def dataset_dir(runs_dir: str | Path, name: str, *, create: bool = False) -> Path:
    """``<runs>/_datasets/<safe name>``; never a path outside the datasets folder.

    With ``create``, a name that had to be changed ("a/b/c" -> "c") may not land in a dataset made
    from another name: that is refused, naming both."""
    root = datasets_root(runs_dir)
    folder = root / dataset_name(name)
    if not inside(root, folder) or folder.resolve() == root.resolve():
        raise UIError(f"{name!r} is not a usable dataset name.", title="Dataset name")
    if create:
        typed = (name or "").strip()
        if folder.is_dir():
            owner = typed_name(folder)
            if typed != folder.name and owner != typed:
                raise UIError(f"The dataset name {typed!r} would be stored as {folder.name!r}, which is the "
                              f"dataset {owner!r} already. Choose another name, or pick {folder.name!r} in the "
                              "list to add to it.", title="Dataset name")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            if typed != folder.name:
                atomic_write_text(folder / TYPED_NAME_FILE, typed)
    return folder


def typed_name(folder: Path) -> str:
    """The name a dataset folder was made from (its folder name unless that had to be changed)."""
    try:
        return (folder / TYPED_NAME_FILE).read_text(encoding="utf-8").strip() or folder.name
    except OSError:
        return folder.name


def stored_name(name: str) -> str:
    """The name an uploaded file is stored under: safe characters, at most :data:`MAX_NAME` long with
    its extension kept. A long stem is cut and marked with a hash of the whole stem, so an image and
    its caption ("<stem>.png", "<stem>.txt") stay a pair and two long names stay apart."""
    clean = safe_name(_ascii(name))
    if len(clean) < MAX_NAME:  # safe_name cuts at MAX_NAME: a name that long may have lost its end
        return clean
    base = Path(str(name).replace("\\", "/")).name
    stem, ext = Path(base).stem, Path(base).suffix
    ext = safe_name(ext, default="")[:16]
    ext = "." + ext.lstrip(".") if ext.strip(".") else ""
    digest = hashlib.sha1(stem.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    keep = MAX_NAME - len(ext) - len(digest) - 1
    return f"{safe_name(_ascii(stem))[:keep].rstrip('-_.')}-{digest}{ext}"


def list_datasets(runs_dir: str | Path) -> list[str]:
    """Names of the dataset folders under ``<runs>/_datasets``, newest first."""
    root = datasets_root(runs_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.name for p in dirs]


def list_style_sets() -> list[str]:
    """Names of the bundled style sets in ``sample_data/styles``."""
    root = bundled_styles_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.ext`` ... when another file of the same upload already took it."""
    if name not in taken:
        return name
    path = Path(name)
    n = 2
    while (path.parent / f"{path.stem}-{n}{path.suffix}").as_posix() in taken:
        n += 1
    return (path.parent / f"{path.stem}-{n}{path.suffix}").as_posix()


def _refusal(original: str, max_bytes: int, size: int) -> str | None:
    ext = Path(original).suffix.lower()
    if ext not in KEPT_EXTENSIONS:
        kinds = ", ".join(sorted(e for e in IMAGE_EXTENSIONS if len(e) <= 5))
        return (f"not an image or caption file (extension {ext or 'none'!r}); upload images ({kinds}), "
                f".txt captions or a .zip of them")
    if size > max_bytes:
        return f"{size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:.0f} MB"
    if size == 0:
        return "the file is empty"
    return None


def _store_stream(src, target: Path, max_bytes: int) -> int:
    """Copy a stream to ``target`` (atomically); stops and fails past ``max_bytes``."""
    written = 0
    with atomic_path(target, suffix=target.suffix) as tmp, open(tmp, "wb") as out:
        while True:
            chunk = src.read(_COPY_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                raise _TooLarge(written)
            out.write(chunk)
    return written


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def add_files(folder: Path, uploads: list[tuple[str, str | Path]], max_bytes: int) -> UploadReport:
    """Store uploaded files in ``folder``: images and captions as they are, zips unpacked.

    ``uploads`` holds ``(original file name, path of the uploaded copy)`` pairs. Names are reduced to
    safe names (``../../x.png`` -> ``x.png``); a file of the same name already in the folder is
    replaced (uploading a corrected image), two files of one upload with the same name are both kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    report = UploadReport()
    taken: set[str] = set()
    for original, path in uploads:
        display = Path(str(original).replace("\\", "/")).name or str(original)
        src = Path(path)
        if src.suffix.lower() == ".zip" or str(original).lower().endswith(".zip"):
            report.merge(_add_zip(folder, display, src, max_bytes, taken))
            continue
        try:
            size = src.stat().st_size
        except OSError:
            report.rejected.append((display, "the upload did not arrive; try again"))
            continue
        reason = _refusal(display, max_bytes, size)
        if reason:
            report.rejected.append((display, reason))
            continue
        name = _unique(stored_name(display), taken)
        target = folder / name
        if not inside(folder, target):
            report.rejected.append((display, "not a usable file name"))
            continue
        with open(src, "rb") as f:
            try:
                _store_stream(f, target, max_bytes)
            except _TooLarge as e:
                report.rejected.append((display, f"over the upload limit of {max_bytes / 2**20:.0f} MB "
                                                  f"(at least {e.size / 2**20:.1f} MB)"))
                continue
        taken.add(name)
        report.added.append(name)
    return report


def _add_zip(folder: Path, display: str, src: Path, max_bytes: int, taken: set[str]) -> UploadReport:
    """Unpack the images and captions of a zip; entries are flattened into ``folder`` under safe names."""
    report = UploadReport()
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError):
        report.rejected.append((display, "not a readable .zip archive"))
        return report
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            report.rejected.append((display, f"holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are taken"))
            return report
        budget = max(max_bytes, 1) * 4
        for m in members:
            inner = m.filename.replace("\\", "/")
            parts = [p for p in inner.split("/") if p and p not in (".", "..")]
            label = f"{display}: {inner}"
            if not parts or any(p.startswith(".") for p in parts) or parts[0] == "__MACOSX":
                continue  # hidden files and macOS resource forks
            if m.flag_bits & 0x1:
                report.rejected.append((label, "encrypted zip entries cannot be read"))
                continue
            reason = _refusal(parts[-1], max_bytes, m.file_size)
            if reason:
                report.rejected.append((label, reason))
                continue
            if m.file_size > budget:
                report.rejected.append((label, "the archive unpacks to more than allowed"))
                continue
            # Kohya repeat folders ("10_mystyle/") keep their meaning; other folders are flattened.
            sub = safe_name(parts[-2], default="") if len(parts) > 1 and _REPEATS.match(parts[-2]) else ""
            name = _unique(f"{sub}/{stored_name(parts[-1])}" if sub else stored_name(parts[-1]), taken)
            target = folder / name
            if not inside(folder, target):
                report.rejected.append((label, "not a usable file name"))
                continue
            try:
                with zf.open(m) as f:
                    size = _store_stream(f, target, max_bytes)
            except _TooLarge as e:
                report.rejected.append((label, f"unpacks to over the upload limit of {max_bytes / 2**20:.0f} MB "
                                               f"(at least {e.size / 2**20:.1f} MB)"))
                continue
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                report.rejected.append((label, f"cannot be unpacked ({type(e).__name__})"))
                continue
            budget -= size
            taken.add(name)
            report.added.append(name)
    if not report.added and not report.rejected:
        report.rejected.append((display, "the archive holds no images or captions"))
    return report


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (by extension, skipping hidden names, as the loader does), sorted."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.is_file() and not any(part.startswith(".") for part in rel) and p.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(p)
    return sorted(found)


def relative_name(folder: Path, image: Path) -> str:
    """How an image of a dataset is named in the page: its path below the dataset folder."""
    return image.relative_to(folder).as_posix()


def read_caption_text(image: Path) -> str:
    cap = image.with_suffix(CAPTION_EXTENSION)
    try:
        return cap.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _member(folder: Path, image_name: str) -> Path:
    parts = [safe_name(p, default="") for p in str(image_name or "").replace("\\", "/").split("/") if p]
    target = folder.joinpath(*parts) if parts and all(parts) else folder
    if (target == folder or not inside(folder, target) or not target.is_file()
            or target.suffix.lower() not in KEPT_EXTENSIONS - {CAPTION_EXTENSION}):
        raise UIError(f"{image_name!r} is not an image of this dataset; pick one in the gallery.", title="Caption")
    return target


def write_caption(folder: Path, image_name: str, caption: str) -> Path:
    """Write ``<image stem>.txt`` next to the image (an empty caption removes the file)."""
    image = _member(folder, image_name)
    cap = image.with_suffix(CAPTION_EXTENSION)
    text = (caption or "").strip()
    if not text:
        cap.unlink(missing_ok=True)
        return cap
    return atomic_write_text(cap, text + "\n")


def remove_image(folder: Path, image_name: str) -> None:
    """Delete an image and its caption file from the dataset."""
    image = _member(folder, image_name)
    image.unlink()
    image.with_suffix(CAPTION_EXTENSION).unlink(missing_ok=True)


def copy_style_set(style: str, target: Path) -> int:
    """Copy a bundled style set into ``target`` (existing files of the same name are replaced)."""
    name = safe_name(style or "", default="")
    src = bundled_styles_dir() / name
    if not name or name not in list_style_sets():
        raise UIError(f"{style!r} is not a bundled style set; choose one of: {', '.join(list_style_sets()) or 'none'}",
                      title="Style set")
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in KEPT_EXTENSIONS:
            dest = target / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest, suffix=dest.suffix) as tmp:
                shutil.copyfile(p, tmp)
            n += 1
    return n
