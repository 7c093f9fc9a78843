"""What the page shows about a run, read from its run directory (status, events, samples, log).

Nothing here talks to the training process: a run directory is the whole truth, which is why a
page refresh, a second tab or a restarted app all show the same live state.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

from ..train.runs import RunDir, list_runs
from .errors import esc

RUNS_HEADERS = ["run", "state", "step", "message", "updated"]
MAX_PLOT_POINTS = 1500
LOG_TAIL_BYTES = 24_000
#: Lines of the log the page shows: the newest ones, all visible without scrolling.
LOG_TAIL_LINES = 14
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"^(.*?):?\s*\d{1,3}%\|")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def runs_table(runs_dir: Path) -> list[list[Any]]:
    """One row per run, newest first: name, state, step/total, message, last update."""
    rows = []
    for st in list_runs(runs_dir):
        total = st.get("total_steps")
        step = f"{st.get('step', 0)}/{total}" if total else str(st.get("step", 0))
        updated = st.get("updated")
        when = _dt.datetime.fromtimestamp(updated).strftime("%Y-%m-%d %H:%M:%S") if updated else ""
        rows.append([st["name"], st.get("state", ""), step, st.get("message", ""), when])
    return rows


def runs_signature(runs_dir: Path) -> tuple:
    """Cheap fingerprint of all runs (status and event file times/sizes) to skip unchanged redraws."""
    sig = []
    if runs_dir.is_dir():
        for p in sorted(runs_dir.iterdir()):
            if not p.is_dir() or p.name.startswith((".", "_")):
                continue
            entry: list[Any] = [p.name]
            for f in ("config.toml", "status.json", "events.jsonl"):
                try:
                    s = os.stat(p / f)
                    entry += [s.st_mtime_ns, s.st_size]
                except OSError:
                    entry += [0, 0]
            sig.append(tuple(entry))
    return tuple(sig)


def run_signature(run: RunDir) -> tuple:
    """Fingerprint of one run's files that the live view shows."""
    out: list[Any] = []
    for f in (run.status_path, run.events_path, run.log_path, run.samples_dir):
        try:
            s = os.stat(f)
            out += [s.st_mtime_ns, s.st_size]
        except OSError:
            out += [0, 0]
    return tuple(out)


def watched_default(runs_dir: Path) -> str | None:
    """The run a fresh page shows: the one training now, else the newest."""
    runs = list_runs(runs_dir)
    for st in runs:
        if st.get("state") in ("running", "queued"):
            return st["name"]
    return runs[0]["name"] if runs else None


def running_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [st for st in list_runs(runs_dir) if st.get("state") in ("running", "queued")]


def progress_html(status: dict[str, Any] | None, last_step: dict[str, Any] | None,
                  last_message: str | None = None) -> str:
    """The progress block: a bar (step/total), state, it/s, ETA and the newest message."""
    if not status:
        return ('<div class="sdl-progress" id="sdl-progress" data-state="none" data-step="0" data-total="0">'
                '<div class="sdl-line"><span class="sdl-state">No run yet</span>'
                '<span class="sdl-msg">Upload a dataset, then press Start training.</span></div></div>')
    state = status.get("state", "")
    step = int(status.get("step") or 0)
    total = int(status.get("total_steps") or (last_step or {}).get("total_steps") or 0)
    pct = 100.0 * step / total if total else 0.0
    if state == "done":
        pct = 100.0
    parts = [f'<span class="sdl-state">{esc(status.get("name", ""))}: {esc(state)}</span>',
             f'<span class="sdl-steps">step {step}/{total or "?"}</span>']
    if last_step and state in ("running", "queued"):
        parts.append(f'<span class="sdl-speed">{last_step.get("it_per_s", 0):.2f} it/s</span>')
        parts.append(f'<span class="sdl-eta">ETA {fmt_duration(last_step.get("eta_s"))}</span>')
    if last_step and last_step.get("loss") is not None:
        parts.append(f'<span class="sdl-loss">loss {last_step["loss"]:.4f}</span>')
    msg = status.get("message") or ""
    if state in ("running", "queued") and last_message and not (last_step and msg == "training"):
        msg = last_message
    return (f'<div class="sdl-progress" id="sdl-progress" data-state="{esc(state)}" data-step="{step}" '
            f'data-total="{total}">'
            f'<div class="sdl-bar"><div class="sdl-fill {esc(state)}" style="width:{pct:.1f}%"></div></div>'
            f'<div class="sdl-line">{"".join(parts)}</div>'
            f'<div class="sdl-msg">{esc(msg)}</div></div>')


def loss_frame(steps: list[dict[str, Any]]):
    """Loss per step as a DataFrame for ``gr.LinePlot`` (thinned to at most MAX_PLOT_POINTS)."""
    import pandas as pd

    if len(steps) > MAX_PLOT_POINTS:
        stride = len(steps) / MAX_PLOT_POINTS
        steps = [steps[int(i * stride)] for i in range(MAX_PLOT_POINTS)] + [steps[-1]]
    return pd.DataFrame({"step": [int(e["step"]) for e in steps], "loss": [float(e["loss"]) for e in steps]})


def newest_samples(run: RunDir, limit: int = 8) -> list[tuple[str, str]]:
    """The newest sample images with their file names as captions, newest first."""
    return [(str(p), p.stem) for p in reversed(run.samples()[-limit:])]


def log_tail(run: RunDir, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The end of the run's log (train.log); events are the fallback when there is no log."""
    try:
        size = run.log_path.stat().st_size
        with open(run.log_path, "rb") as f:
            if size > max_bytes:
                f.seek(size - max_bytes)
            text = f.read().decode("utf-8", errors="replace")
        if size > max_bytes:
            text = text.split("\n", 1)[-1]
        return "\n".join(clean_log_lines(text.splitlines())[-LOG_TAIL_LINES:])
    except OSError:
        lines = []
        for ev in run.events({"message", "warning", "failed", "done", "stopped"}):
            lines.append(f"{ev['type']}: {ev.get('text') or ev.get('error') or ev.get('lora_path') or ''}")
        return "\n".join(lines[-LOG_TAIL_LINES:])


def clean_log_lines(lines: list[str]) -> list[str]:
    """Log lines as a person reads them: no terminal escape codes, a progress bar only in its last
    state (bars redraw with carriage returns, or on new lines when the output is not a terminal),
    and a Python traceback folded to its last line (the whole text stays in train.log)."""
    out: list[str] = []
    last_bar: str | None = None
    in_traceback = False
    for raw in lines:
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).rstrip()
        if not line:
            continue
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            continue
        if line.startswith(("During handling of the above exception", "The above exception was the direct cause")):
            continue
        if in_traceback:
            if line.startswith((" ", "\t")):
                continue
            in_traceback = False
            out.append(f"{line}  (details in train.log)")
            last_bar = None
            continue
        m = _BAR.match(line)
        bar = m.group(1) if m else None
        if bar is not None and bar == last_bar and out:
            out[-1] = line
        else:
            out.append(line)
        last_bar = bar
    return out


def live_view(run: RunDir) -> dict[str, Any]:
    """Everything the live panel shows for one run."""
    status = run.status()
    events = run.events({"step", "message", "warning"})
    steps = [e for e in events if e["type"] == "step"]
    messages = [e for e in events if e["type"] in ("message", "warning")]
    last_message = None
    if messages:
        m = messages[-1]
        last_message = m["text"] + (f" ({m['done']}/{m['total']})" if m.get("total") else "")
    return {
        "status": status,
        "progress": progress_html(status, steps[-1] if steps else None, last_message),
        "loss": loss_frame(steps),
        "samples": newest_samples(run),
        "log": log_tail(run),
    }
