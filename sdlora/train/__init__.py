"""Training: the public API the CLI and the app use.

Start or continue a run, read its directory (config, status, events, checkpoints, samples), stop it,
and export its LoRA::

    cfg = TrainConfig.from_toml("configs/demo_style.toml", overrides=["max_train_steps=100"])
    run = prepare_run(cfg)            # validate, check the data, write runs/<name>/config.toml
    start_run(run)                    # train in a child process (or: train(cfg) in this one)
    run.status(); run.events({"step"}); stop_run(run)
    export_run(run.path, step=50, fmt="diffusers")

Everything else in this package is internal to training.
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig, lora_spec
from .events import read_events
from .export import RunExportError, export_run, run_embedding_file
from .loop import TrainingError, TrainResult, prepare_run, train
from .run_info import (DatasetCheck, RunSummary, active_run, base_settings, dataset_check, export_steps, final_lora,
                       loss_curve, run_summaries, run_summary)
from . import process as _process
from .process import RunBusyError, lock_holder, pid_alive
from .runs import STATES, RunDir, list_runs


def start_run(run: RunDir | str) -> int:
    """Train (or continue) ``run`` in a child process of its own; returns its pid.

    :class:`RunBusyError` (naming the holder) when a process trains the run already."""
    return _process.start_run(run if isinstance(run, RunDir) else RunDir(run))


def stop_run(run: RunDir | str, timeout: float = 0.0) -> bool:
    """Ask a training process to save a checkpoint and stop; True if one was signalled."""
    return _process.stop_run(run if isinstance(run, RunDir) else RunDir(run), timeout)


def is_running(run: RunDir | str) -> bool:
    """Whether a process trains ``run`` now."""
    return _process.is_running(run if isinstance(run, RunDir) else RunDir(run))


__all__ = [
    "STATES",
    "ConfigError",
    "DatasetCheck",
    "RunDir",
    "RunBusyError",
    "RunExportError",
    "RunSummary",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "export_run",
    "run_embedding_file",
    "is_running",
    "lock_holder",
    "list_runs",
    "lora_spec",
    "pid_alive",
    "prepare_run",
    "read_events",
    "start_run",
    "stop_run",
    "train",
    "active_run",
    "base_settings",
    "dataset_check",
    "export_steps",
    "final_lora",
    "loss_curve",
    "run_summaries",
    "run_summary",
]
