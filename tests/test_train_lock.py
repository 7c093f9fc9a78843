"""One trainer per run directory: an OS file lock held for the life of the training process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlora.train import RunBusyError, RunDir, TrainConfig, export_run, is_running, lock_holder, start_run, train

HOLDER = """
import sys, time
from sdlora.train.process import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    """A process that takes the run's training lock the way a trainer does, and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _run(tmp_path: Path) -> RunDir:
    from helpers import make_images  # noqa: PLC0415 - test helper module

    data = make_images(tmp_path / "data", n=2)
    cfg = TrainConfig(pretrained_model_name_or_path="tiny", train_data_dir=str(data), output_dir=str(tmp_path / "runs"),
                      output_name="locked", resolution=64, max_train_steps=1, mixed_precision="no")
    run = RunDir(cfg.run_dir)
    run.write_config(cfg)
    return run


def test_a_second_trainer_is_refused_and_kill_9_frees_the_lock(tmp_path):
    run = _run(tmp_path)
    assert lock_holder(run.path) is None and not is_running(run)
    holder = _hold(run.path)
    try:
        info = lock_holder(run.path)
        assert info is not None and info["pid"] == holder.pid and time.time() - info["since"] < 60
        assert is_running(run)
        # every entry point refuses, naming the holder
        with pytest.raises(RunBusyError, match=f"process {holder.pid}"):
            train(resume=run.path)
        with pytest.raises(RunBusyError, match=f"process {holder.pid}"):
            start_run(run)
        with pytest.raises(RunBusyError, match="--step"):
            export_run(run.path)
        cli = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--resume", str(run.path)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 1 and f"process {holder.pid}" in cli.stderr and "Traceback" not in cli.stderr
        # the refused trainer wrote nothing into the run: no status, no events
        assert not run.status_path.exists() and not run.events_path.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert lock_holder(run.path) is None  # the kernel released it with the process
    result = train(resume=run.path)
    assert result.state == "done" and lock_holder(run.path) is None


def test_two_concurrent_trainers_one_wins(tmp_path):
    """Two `sdlora train --resume` started together on one run: exactly one trains, the other is refused."""
    run = _run(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sdlora.cli", "train", "--resume", str(run.path), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    refused = [err for (out, err), p in zip(outs, procs) if p.returncode == 1][0]
    assert "is being trained by process" in refused
    steps = [e for e in run.events({"step"})]
    assert [e["step"] for e in steps] == [1]  # trained once, not twice
    assert run.status()["state"] == "done"


def test_stop_right_after_start_says_it_was_stopped(tmp_path):
    """Stop pressed while the trainer is still starting: the run says it was stopped on request, not that it
    ended without a word."""
    from sdlora.train import stop_run

    run = _run(tmp_path)
    pid = start_run(run)
    assert stop_run(run)  # at once: the child has not installed its SIGTERM handler yet
    end = time.time() + 60
    while time.time() < end and os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        time.sleep(0.1)
    st = run.status()
    assert st["state"] == "stopped" and st["message"].startswith("stopped on request"), st
    assert "without a word" not in st["message"]
    # a later training clears the request: its own end is reported as usual
    result = train(resume=run.path)
    assert result.state == "done" and not (run.path / ".stop-requested").exists()
