"""Turning failures into messages a person can act on.

Every event handler of the app is wrapped by :func:`guarded`: a known problem (bad setting, bad
file, unusable dataset, a model or LoRA that does not load) becomes a ``gr.Error`` whose text names
the file or option and what to do; anything else becomes a short "unexpected error" message while
the traceback goes to the server log. The page never shows a traceback and the app keeps serving.
"""

from __future__ import annotations

import functools
import html
import logging
from typing import Any, Callable, TypeVar

import gradio as gr

log = logging.getLogger("sdlora.ui")

F = TypeVar("F", bound=Callable[..., Any])


class UIError(Exception):
    """A problem with what the user did in the page; shown as it is (plain text)."""

    def __init__(self, message: str, title: str = "Error"):
        self.title = title
        super().__init__(message)


#: Server folders and what messages call them instead (longest first), e.g. "<runs>/_datasets/x" -> "dataset x".
_HIDDEN: list[tuple[str, str]] = []


def hide_folder(folder: Any, name: str) -> None:
    """Messages name paths inside ``folder`` as ``name`` + the path below it (no server paths in the page)."""
    from pathlib import Path

    for path in {str(Path(folder)), str(Path(folder).resolve())}:
        entry = (path.rstrip("/") + "/", name)
        if entry not in _HIDDEN:
            _HIDDEN.append(entry)
    _HIDDEN.sort(key=lambda e: len(e[0]), reverse=True)


def _upload_folders() -> list[str]:
    """Where gradio keeps uploaded files (``<temp>/<hash>/<name>``)."""
    import os
    import tempfile
    from pathlib import Path

    root = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return sorted({root.rstrip("/"), str(Path(root).resolve())}, key=len, reverse=True)


def without_server_paths(text: str) -> str:
    import re

    from ..resources import PACKAGE_DIR

    for root in _upload_folders():  # an uploaded file is named by its own name
        text = re.sub(re.escape(root) + r"/[0-9a-f]{16,}/", "", text)

    for path, name in [*_HIDDEN, (str(PACKAGE_DIR) + "/", "sdlora/")]:
        text = text.replace(path, name)
    return text


def esc(text: Any) -> str:
    """HTML-escape text for gradio's message boxes and HTML components (they render HTML)."""
    return html.escape(str(text), quote=False)


def _known_errors() -> tuple[tuple[type[BaseException], str], ...]:
    """Library exception types and the title of their message box, most specific first."""
    from ..data.errors import DatasetError
    from ..lora.errors import LoraError, LoraFileError
    from ..models.loading import ModelLoadError
    from ..train import ConfigError, RunBusyError, RunExportError, TrainingError

    return ((UIError, "Error"), (ConfigError, "Invalid setting"), (DatasetError, "Dataset problem"),
            (LoraFileError, "LoRA file problem"), (LoraError, "LoRA problem"), (ModelLoadError, "Base model problem"),
            (TrainingError, "Training problem"), (RunBusyError, "Run is busy"), (RunExportError, "Export problem"))


def message_for(exc: BaseException) -> tuple[str, str]:
    """(title, plain-text message) for an exception raised by a handler."""
    from ..train import ConfigError

    for typ, title in _known_errors():
        if isinstance(exc, typ):
            if isinstance(exc, ConfigError):
                from .form import in_words, label

                return title, f"{label(exc.key)}: {in_words(str(exc).split(': ', 1)[-1])}"
            if isinstance(exc, UIError):
                return exc.title, str(exc)
            return title, str(exc)
    if isinstance(exc, FileNotFoundError):
        return "File not found", f"{exc.filename or exc}: the file or folder does not exist (any more)."
    if isinstance(exc, PermissionError):
        return "Permission denied", f"{exc.filename or exc}: the app may not read or write it."
    if isinstance(exc, MemoryError):
        return "Out of memory", "The machine ran out of memory; use a smaller size or fewer steps."
    return "Unexpected error", (f"{type(exc).__name__}: {exc}. The app is still running; details are in the "
                                "server log.")


def to_gr_error(exc: BaseException) -> gr.Error:
    title, text = message_for(exc)
    text = without_server_paths(text)
    return gr.Error(esc(text), title=title, print_exception=False)


def skip_if_empty(result: Any) -> Any:
    """A handler's result as gradio takes it: an empty dict of updates ("nothing changes") becomes
    ``gr.skip()`` (gradio reads an empty dict as one value and fails for several outputs)."""
    return gr.skip() if isinstance(result, dict) and not result else result


def updates_only(fn: F) -> F:
    """Wrap a handler that returns a dict of updates, possibly empty (see :func:`skip_if_empty`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        return skip_if_empty(fn(*args, **kwargs))

    return wrapper  # type: ignore[return-value]


def guarded(fn: F) -> F:
    """Wrap an event handler so that any failure reaches the page as a readable ``gr.Error``.

    The wrapper keeps ``fn``'s signature (gradio reads it for API parameter names).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return skip_if_empty(fn(*args, **kwargs))
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            _log(fn, e)
            raise to_gr_error(e) from None

    return wrapper  # type: ignore[return-value]


def _log(fn: Callable, exc: BaseException) -> None:
    title, _ = message_for(exc)
    if title == "Unexpected error":
        log.exception("handler %s failed", getattr(fn, "__name__", fn))
    else:
        log.info("handler %s: %s", getattr(fn, "__name__", fn), exc)
