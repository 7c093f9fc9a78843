"""State the app shares between sessions: folders, the base-model list, locks and the loaded previewer."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..paths import inside, safe_name
from .errors import UIError
from .server import ServerOptions

DEMO_SPEC = "demo"


@dataclass
class BaseChoice:
    """One entry of the base-model dropdown."""

    label: str
    value: str
    resolution: int | None
    family: str | None = None  # "sd1", "sd2" or "sdxl"


class AppContext:
    """Per-process state of the app.

    Everything durable lives in run directories; this object only holds locks (one training start
    at a time, one preview generation at a time) and the previewer, which keeps one base model
    loaded so that moving the LoRA-scale slider does not reload anything.
    """

    def __init__(self, opts: ServerOptions):
        self.opts = opts
        self.runs_dir = Path(opts.runs_dir)
        self.models_dir = Path(opts.models_dir)
        # Messages show names inside these folders, never where they are on the server.
        from .datasets import datasets_root
        from .errors import hide_folder

        hide_folder(datasets_root(self.runs_dir), "dataset ")
        hide_folder(self.runs_dir, "run ")
        hide_folder(self.models_dir, f"{self.models_dir.name}/")
        self.train_lock = threading.Lock()
        self.preview_lock = threading.Lock()
        self._previewer: Any = None
        self._previewer_base: str | None = None

    def browser_secret(self) -> str:
        """The key the browser's saved form is encrypted with: kept in the runs folder (owner-only), so
        the saved values survive an app restart and another app's page cannot read them."""
        import secrets

        path = self.runs_dir / ".ui-secret"
        try:
            return path.read_text().strip() or _new_secret(path, secrets.token_hex(16))
        except FileNotFoundError:
            return _new_secret(path, secrets.token_hex(16))

    # ---- base models ------------------------------------------------------------------------
    def base_models(self) -> list[BaseChoice]:
        """The bundled demo model (when present) and the usable models of the models folder."""
        from ..models.loading import DEFAULT_BASE, list_base_models

        out: list[BaseChoice] = []
        for entry in list_base_models(DEFAULT_BASE.parent):
            if Path(entry["path"]).resolve() == DEFAULT_BASE.resolve() and entry["usable"]:
                out.append(BaseChoice(f"Demo model (bundled, {entry['resolution']}px)", DEMO_SPEC, entry["resolution"],
                                      entry["family"]))
        for entry in list_base_models(self.models_dir):
            if entry["usable"]:
                out.append(BaseChoice(entry["label"], str(Path(entry["path"]).resolve()), entry["resolution"],
                                      entry["family"]))
        return out

    def base_dropdown(self) -> tuple[list[tuple[str, str]], str | None]:
        """(choices, preselected value): the bundled demo model first, else the first model found."""
        models = self.base_models()
        choices = [(m.label, m.value) for m in models]
        return choices, (models[0].value if models else None)

    def base_choice(self, spec: str | None) -> BaseChoice | None:
        """The listed base model ``spec`` names, if any."""
        return next((m for m in self.base_models() if m.value == spec), None)

    def base_resolution(self, spec: str | None) -> int | None:
        choice = self.base_choice(spec)
        return choice.resolution if choice else None

    def check_base(self, spec: str | None) -> str:
        """A base-model value from the page, accepted only when it is one the app lists.

        The page may not name arbitrary paths on the server: only the bundled model and what is in
        the models folder can be loaded.
        """
        if not spec:
            raise UIError("Choose a base model. Put model folders or .safetensors files into the app's models "
                          f"folder ({self.models_dir.name}/, set by --models-dir) and reload the page to see them.",
                          title="Base model")
        for m in self.base_models():
            if m.value == spec:
                return spec
        raise UIError(f"{spec!r} is not one of the listed base models; pick one from the list.", title="Base model")

    # ---- runs -----------------------------------------------------------------------------------
    def run_path(self, name: str | None) -> Path:
        """The run directory ``<runs>/<name>`` for a run name from the page (never outside ``runs``)."""
        clean = safe_name((name or "").strip(), default="")
        path = self.runs_dir / clean
        if not clean or clean != (name or "").strip() or not inside(self.runs_dir, path) or path == self.runs_dir:
            raise UIError(f"{name!r} is not a run name; pick a run from the list.", title="Run")
        return path

    def existing_run(self, name: str | None):
        from ..train import RunDir

        run = RunDir(self.run_path(name))
        if not run.exists():
            raise UIError(f"There is no run named {name!r}; pick a run from the list.", title="Run")
        return run

    def lora_run_names(self) -> list[str]:
        """Names of the runs that have a finished LoRA file, newest first."""
        from ..train import list_runs

        return [st["name"] for st in list_runs(self.runs_dir) if st.get("lora")]

    def weighted_loras(self, lora_runs: list[str] | None, lora_files: list[str] | None,
                       weights: Any) -> list[tuple[str, float]]:
        """(path, weight) of the chosen runs' final LoRAs and of uploaded files; the weights come from
        the page's (LoRA, weight) table (1 where none is given)."""
        from . import form

        given = {str(r[0]): r[1] for r in form.table_rows(weights) if r and len(r) > 1}
        out: list[tuple[str, float]] = []
        for name in lora_runs or []:
            run = self.existing_run(name)
            if not run.lora_path.is_file():
                raise UIError(f"Run '{name}' has no finished LoRA file yet; wait until it is done or export a "
                              "checkpoint on the Export tab.", title="LoRA")
            out.append((str(run.lora_path), form.parse_weight(given.get(name, 1.0), name)))
        for f in lora_files or []:
            p = Path(str(f))
            if p.suffix.lower() != ".safetensors":
                raise UIError(f"{p.name} is not a .safetensors LoRA file.", title="LoRA")
            out.append((str(p), form.parse_weight(given.get(p.name, 1.0), p.name)))
        return out

    # ---- preview ---------------------------------------------------------------------------------
    def needs_loading(self, base: str) -> bool:
        """Whether the next preview of ``base`` loads the model first (the first one takes a while)."""
        return self._previewer is None or self._previewer_base != base

    def previewer(self, base: str, loras: list[tuple[str, float]]):
        """The previewer of ``base`` with exactly ``loras`` (path, weight) active.

        The base model is loaded once and kept (a different base replaces it); the previewer keeps
        LoRA files loaded and only changes weights, so moving the scale slider never reloads
        anything. Call with :attr:`preview_lock` held.
        """
        from ..generate import Previewer

        if self._previewer is None or self._previewer_base != base:
            self._previewer = None  # free the old model before loading the next one
            self._previewer = Previewer.from_base(base)
            self._previewer_base = base
        self._previewer.set_loras(loras)
        return self._previewer


def _new_secret(path: Path, value: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def lora_table(lora_runs: list[str] | None, lora_files: list[str] | None, lora_weights: Any) -> list[list[Any]]:
    """Rows (LoRA, weight) for the chosen runs and files, keeping weights already typed in."""
    from . import form

    given = {str(r[0]): r[1] for r in form.table_rows(lora_weights) if r and len(r) > 1}
    names = list(lora_runs or []) + [Path(str(f)).name for f in lora_files or []]
    return [[n, given.get(n, 1.0)] for n in names]
