"""Training processes of run directories: start, stop, and the lock that keeps one trainer per run.

The app and the CLI start training as ``sdlora train --resume RUN`` in a child process of its own
session, so a page refresh or an app restart loses nothing, and stop it with SIGTERM (the loop saves a
checkpoint and exits).

One run directory is trained by one process at a time. The training process holds an OS file lock
(``flock``) on ``<run>/.train.lock`` for its whole life; the kernel releases it when the process ends,
however it ends (``kill -9`` included), so a crash never leaves a stale lock. The lock file also
says who holds it (pid, since when) for the messages of those who are refused.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import atomic_write_text

if TYPE_CHECKING:
    from .runs import RunDir

LOCK_NAME = ".train.lock"
STOP_REQUEST_NAME = ".stop-requested"


class RunBusyError(RuntimeError):
    """Another process is training this run directory; the message names it (pid, since when)."""


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = _dt.datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M:%S") if isinstance(since, (int, float)) else "?"
    return f"process {holder.get('pid', '?')} (training since {when})"


class RunLock:
    """The lock a training process holds on its run directory (see the module docstring)."""

    def __init__(self, run_path: str | os.PathLike[str]) -> None:
        self.path = Path(run_path) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunBusyError` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(f"run {self.path.parent} is being trained by {_describe(lock_holder(self.path.parent))}; "
                               "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"pid", "since"}`` of the process training ``run_path``, or None when no process holds its lock."""
    path = Path(run_path) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: read who holds it
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        try:
            data = json.loads(os.read(fd, 4096).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            data = {}
        return data if isinstance(data, dict) else {}
    finally:
        os.close(fd)


def check_not_training(run: "RunDir", what: str) -> None:
    """:class:`RunBusyError` when a process trains ``run`` (``what`` says what was refused)."""
    holder = lock_holder(run.path)
    if holder is not None:
        raise RunBusyError(f"cannot {what}: run {run.name} is being trained by {_describe(holder)}")


def is_running(run: "RunDir") -> bool:
    """Whether a process trains ``run`` now (its lock is held, or its child is still starting)."""
    if lock_holder(run.path) is not None:
        return True
    st = run.status()
    return st["state"] in ("running", "queued") and pid_alive(st.get("pid"))


def start_run(run: "RunDir") -> int:
    """Start ``sdlora train --resume RUN_DIR`` as a child process in its own session; returns its pid.

    Refused with :class:`RunBusyError` when a process trains the run already (this check is a courtesy:
    the child takes the lock itself and exits with the same message if another got there first).
    """
    check_not_training(run, "start training")
    if is_running(run):
        raise RunBusyError(f"cannot start training: run {run.name} is starting in process {run.status().get('pid')}")
    run.path.mkdir(parents=True, exist_ok=True)
    log = open(run.log_path, "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sdlora.cli", "train", "--resume", str(run.path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    log.close()
    run.write_status("queued", "starting", pid=proc.pid)
    return proc.pid


def stop_run(run: "RunDir", timeout: float = 0.0) -> bool:
    """Ask the process training ``run`` to save a checkpoint and stop (SIGTERM). True if one was signalled."""
    holder = lock_holder(run.path) or {}
    st = run.status()
    pid = holder.get("pid") or st.get("pid")
    if not holder and st["state"] not in ("running", "queued"):
        return False
    if not pid_alive(pid):
        return False
    # Said before the signal: a process stopped before it handles SIGTERM (still starting) ends without a
    # word, and the run's status then tells from this file that it was asked to stop.
    atomic_write_text(run.path / STOP_REQUEST_NAME, json.dumps({"pid": pid, "time": time.time()}))
    os.kill(pid, signal.SIGTERM)
    end = time.time() + timeout
    while timeout and time.time() < end and pid_alive(pid):
        time.sleep(0.1)
    return True
