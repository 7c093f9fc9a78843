"""Run directories: the unit of persistence of a training run.

``runs/<name>/`` holds ``config.toml`` (resolved), ``events.jsonl``, ``status.json``,
``checkpoints/step-N/``, ``samples/`` and the final ``<name>.safetensors``. A web page or a CLI only
reads this folder and sends stop/resume (:mod:`.process`), so a page refresh or an app restart loses nothing.
This module is the layout and the status; starting and stopping training processes is :mod:`.process`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..paths import atomic_write_text
from .events import read_events
from .process import STOP_REQUEST_NAME, pid_alive

STATES = ("queued", "running", "stopped", "done", "failed")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- files ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def parked_dir(self) -> Path:
        """Where frozen models wait on disk while the steps run (``train.parking``); a ``.tmp``
        name, so what a killed process leaves is removed like its other partial files."""
        return self.path / ".parked.tmp"

    @property
    def lora_path(self) -> Path:
        return self.path / f"{self.name}.safetensors"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self):
        from .config import TrainConfig

        return TrainConfig.from_toml(self.config_path, validate=False)

    def write_config(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, cfg.to_toml())

    # ---- status -----------------------------------------------------------------------------
    def write_status(self, state: str, message: str = "", **extra: Any) -> None:
        assert state in STATES, state
        data = dict(state=state, message=message, pid=extra.pop("pid", os.getpid()), updated=time.time(), **extra)
        atomic_write_text(self.status_path, json.dumps(data, indent=1))

    def status(self) -> dict[str, Any]:
        """The run's state. A 'running' run whose process is gone is reported as stopped when a stop was
        asked for, and as failed otherwise (killed or crashed; resumable from its newest checkpoint)."""
        try:
            st = json.loads(self.status_path.read_text())
        except (OSError, json.JSONDecodeError):
            st = {"state": "queued" if self.exists() else "failed", "message": "" if self.exists() else "no config.toml"}
        if st.get("state") in ("running", "queued") and st.get("pid") and not pid_alive(st["pid"]):
            resume = ("resume continues from the newest checkpoint" if self.latest_checkpoint()
                      else "resume starts it again from step 0")
            if (self.path / STOP_REQUEST_NAME).is_file():
                st["state"] = "stopped"
                st["message"] = ("stopped on request" + (f"; {resume}" if self.latest_checkpoint()
                                                         else " before training began; resume to start it"))
            else:
                # Killed outright (kill -9, the kernel's out-of-memory killer) or crashed without a word:
                # a failure, whose usual cause is memory; the checkpoints it left are intact.
                st["state"] = "failed"
                st["message"] = ("the training process ended without a word (killed or crashed; the system kills "
                                 "it when memory runs out: then lower train_batch_size or resolution, or turn on "
                                 f"gradient_checkpointing); {resume}")
        last = self.last_step_event()
        st.setdefault("step", last["step"] if last else 0)
        if last:
            st["step"] = max(st.get("step", 0), last["step"])
            st["total_steps"] = last["total_steps"]
        st["name"] = self.name
        st["checkpoint"] = self.latest_checkpoint().name if self.latest_checkpoint() else None
        st["lora"] = str(self.lora_path) if self.lora_path.is_file() else None
        return st

    def events(self, types: set[str] | None = None) -> list[dict[str, Any]]:
        return list(read_events(self.events_path, types))

    def step_events(self) -> list[dict[str, Any]]:
        """The step events of the training that counts: after a resume from step N (a ``start`` event with
        ``start_step`` N), the steps above N that a stopped or killed process logged before are dropped,
        since the resumed process did them again."""
        steps: list[dict[str, Any]] = []
        for ev in read_events(self.events_path, {"step", "start"}):
            if ev.get("type") == "start":
                start = int(ev.get("start_step") or 0)
                steps = [e for e in steps if int(e.get("step", 0)) <= start]
            else:
                steps.append(ev)
        return steps

    def last_step_event(self) -> dict[str, Any] | None:
        steps = self.step_events()
        return steps[-1] if steps else None

    def samples(self) -> list[Path]:
        if not self.samples_dir.is_dir():
            return []
        return sorted((p for p in self.samples_dir.glob("*.png") if not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (incomplete ones only ever exist under temp names)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def remove_partial_files(self) -> list[Path]:
        """Delete what a killed training process left half-written: the temporary ``.<name>.*.tmp``
        files and folders that complete files are written under before their rename (run folder and
        checkpoints folder). Returns what was removed. Only for a run no process is training."""
        removed = []
        for folder in (self.path, self.checkpoints_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Status of every run directory under ``runs_dir``, newest first."""
    base = Path(runs_dir)
    if not base.is_dir():
        return []
    runs = [RunDir(p) for p in base.iterdir() if p.is_dir() and (p / "config.toml").is_file()]
    runs.sort(key=lambda r: r.config_path.stat().st_mtime, reverse=True)
    return [r.status() for r in runs]
