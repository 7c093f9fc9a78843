"""Safe file names and atomic writes, used wherever a user-given name or a result file touches the disk."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterator

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "file") -> str:
    """A file name that cannot leave its folder: letters, digits, ``.``, ``_`` and ``-`` only.

    Path parts are dropped (``../../x.png`` -> ``x.png``), other characters become ``_``, and
    names that would be hidden or special (``.``, ``..``) get a prefix.
    """
    name = unicodedata.normalize("NFKC", str(name)).replace("\\", "/").split("/")[-1]
    name = _UNSAFE.sub("_", name).strip("_")
    name = name.lstrip(".")
    return name[:128] or default


def inside(base: str | Path, path: str | Path) -> bool:
    """True when ``path`` resolves to ``base`` or somewhere below it."""
    base = Path(base).resolve()
    p = Path(path).resolve()
    return p == base or base in p.parents


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    On error the temporary file is removed, so a loader never sees a half-written file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
