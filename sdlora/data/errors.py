"""Errors raised by the data package; every message names the file, folder or option at fault."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .scan import DatasetScan


class DatasetError(ValueError):
    """A dataset folder, file or data option that cannot be used as given."""


class ImageLoadError(DatasetError):
    """An image file that cannot be used for training; ``reason`` says why in plain words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NoUsableImagesError(DatasetError):
    """A dataset folder without a single usable image. ``scan`` holds what was found and skipped."""

    def __init__(self, message: str, scan: DatasetScan) -> None:
        self.scan = scan
        super().__init__(message)
