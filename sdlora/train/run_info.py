"""What a run directory and a dataset say, read the way training reads them.

For anything that shows runs to people (the web app, the CLI): a run's summary (state, progress,
speed, the newest word from the trainer), its loss curve, the steps one can export, the
dataset check with the trainer's own bucket and caption settings, and the settings that suit a
base model (its size, and SDXL's learning rates). Nothing here starts or stops a
process; everything is read from files, so every reader sees the same truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig
from .runs import RunDir, list_runs

#: States in which a run's process is (or is about to be) training.
ACTIVE_STATES = ("queued", "running")


@dataclass(frozen=True)
class RunSummary:
    """One run as a person sees it.

    ``message`` is the run's status message (why it stopped, what failed); ``activity`` is what the
    trainer is doing now: while a run is active and no step is reported yet (loading, caching,
    making class images) it is the newest progress message, e.g. ``"caching latents (3/10)"``;
    otherwise it is ``message``.
    """

    name: str
    state: str
    message: str
    activity: str
    step: int
    total_steps: int | None
    loss: float | None
    it_per_s: float | None
    eta_s: float | None
    checkpoint: str | None
    lora: str | None
    updated: float | None
    pid: int | None

    @property
    def active(self) -> bool:
        """True while the run is queued or training."""
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        """Share of the steps done, 0 to 1 (1 for a done run)."""
        if self.state == "done":
            return 1.0
        if not self.total_steps:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total_steps))


def _as_run(run: RunDir | str | Path) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def run_summary(run: RunDir | str | Path) -> RunSummary:
    """The summary of one run, from its status file and its events."""
    run = _as_run(run)
    status = run.status()
    events = run.events({"step", "message", "warning"})
    last_step = next((e for e in reversed(events) if e["type"] == "step"), None)
    last_message = next((e for e in reversed(events) if e["type"] in ("message", "warning")), None)
    state = str(status.get("state", ""))
    message = str(status.get("message") or "")
    activity = message
    if state in ACTIVE_STATES and last_message and not (last_step and message == "training"):
        activity = str(last_message.get("text", ""))
        if last_message.get("total"):
            activity += f" ({last_message.get('done', 0)}/{last_message['total']})"
    total = status.get("total_steps") or (last_step or {}).get("total_steps")
    return RunSummary(
        name=str(status.get("name") or run.name),
        state=state,
        message=message,
        activity=activity,
        step=int(status.get("step") or 0),
        total_steps=int(total) if total else None,
        loss=_number(last_step, "loss"),
        it_per_s=_number(last_step, "it_per_s"),
        eta_s=_number(last_step, "eta_s"),
        checkpoint=status.get("checkpoint"),
        lora=status.get("lora"),
        updated=status.get("updated"),
        pid=status.get("pid"),
    )


def _number(event: dict[str, Any] | None, key: str) -> float | None:
    value = (event or {}).get(key)
    return None if value is None else float(value)


def run_summaries(runs_dir: str | Path) -> list[RunSummary]:
    """Summaries of every run under ``runs_dir``, newest first."""
    return [run_summary(Path(runs_dir) / st["name"]) for st in list_runs(runs_dir)]


def active_run(runs_dir: str | Path) -> RunSummary | None:
    """The run that is training now (queued or running), if any."""
    return next((s for s in run_summaries(runs_dir) if s.active), None)


def loss_curve(run: RunDir | str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every step the run reported, in order."""
    return [(int(e["step"]), float(e["loss"])) for e in _as_run(run).step_events() if e.get("loss") is not None]


def export_steps(run: RunDir | str | Path) -> list[int]:
    """The steps of the run's complete checkpoints, newest first: ``export_run(run, step=N)`` exports each."""
    return [int(p.name.split("-", 1)[1]) for p in reversed(_as_run(run).checkpoints())]


def final_lora(run: RunDir | str | Path) -> Path | None:
    """The LoRA file the run wrote when it finished (kohya format, with its training metadata), if any."""
    path = _as_run(run).lora_path
    return path if path.is_file() else None


# ---- settings that suit a base model --------------------------------------------------------------
#: Learning rates of style LoRAs per model family where they differ from the config's defaults. SDXL
#: (kohya sd-scripts' SDXL LoRA guides and the common trainers' SDXL style presets): UNet 1e-4 and
#: the text encoders far lower, 5e-6 (or frozen).
FAMILY_LEARNING_RATES: dict[str, dict[str, float]] = {"sdxl": {"learning_rate": 1e-4, "text_encoder_lr": 5e-6}}


def base_settings(family: str | None, resolution: int) -> dict[str, Any]:
    """Training options that suit a base model of ``family`` ("sd1", "sd2", "sdxl") and native size
    ``resolution``: that resolution, buckets from half to twice it (step 64 where the size allows, as
    kohya's 512-2048 for SDXL at 1024), and the family's learning rates (the config's defaults for
    SD 1.x/2.x). A tiny test model gets the same treatment at its own size."""
    res = max(64, int(resolution) // 8 * 8)
    steps = 64 if res % 64 == 0 else 8
    defaults = TrainConfig()
    out: dict[str, Any] = {"resolution": res, "min_bucket_reso": max(steps, res // 2 // steps * steps),
                           "max_bucket_reso": res * 2, "bucket_reso_steps": steps,
                           "learning_rate": defaults.learning_rate, "text_encoder_lr": defaults.text_encoder_lr}
    out.update(FAMILY_LEARNING_RATES.get(family or "", {}))
    return out


# ---- the dataset check ----------------------------------------------------------------------------
@dataclass
class DatasetCheck:
    """A dataset folder as training would use it with a config's bucket and caption settings.

    ``scan`` is the loader's scan (usable items, skipped files with reasons, warnings); ``summary``
    is :meth:`DatasetScan.summary` with the trainer's buckets and captions (None when no image is
    usable). ``bucket_error`` / ``caption_error`` say why those settings cannot be used.
    """

    scan: Any
    usable: bool
    summary: dict[str, Any] | None
    bucket_error: str | None = None
    caption_error: str | None = None


def dataset_check(cfg: TrainConfig) -> DatasetCheck:
    """Check ``cfg.train_data_dir`` with the trainer's own loader, buckets and caption template.

    ``cfg`` need not be validated: only the data options are read (build it with
    ``TrainConfig.from_dict(values, validate=False)``).
    """
    from ..data import NoUsableImagesError, scan_dataset
    from .batches import bucket_config, caption_config

    try:
        scan = scan_dataset(cfg.train_data_dir, caption_extension=cfg.caption_extension)
    except NoUsableImagesError as e:
        return DatasetCheck(scan=e.scan, usable=False, summary=None)
    buckets: Any = None
    bucket_error = caption_error = None
    try:
        buckets = bucket_config(cfg)
    except ValueError as e:
        bucket_error = str(e)
    captions = None
    try:
        captions = caption_config(cfg)
    except (ValueError, ConfigError) as e:
        caption_error = str(e)
    summary = scan.summary(buckets if buckets is not None else 512, captions)
    if buckets is None:
        summary["buckets"] = {}
    return DatasetCheck(scan=scan, usable=True, summary=summary, bucket_error=bucket_error,
                        caption_error=caption_error)
