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

from ..train import RunDir, RunSummary, loss_curve, run_summaries, run_summary
from .errors import esc, without_server_paths

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
    for s in run_summaries(runs_dir):
        step = f"{s.step}/{s.total_steps}" if s.total_steps else str(s.step)
        when = _dt.datetime.fromtimestamp(s.updated).strftime("%Y-%m-%d %H:%M:%S") if s.updated else ""
        rows.append([s.name, s.state, step, s.message, when])
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
    runs = run_summaries(runs_dir)
    active = [s for s in runs if s.active]
    return (active or runs)[0].name if runs else None


def progress_html(summary: RunSummary | None) -> str:
    """The progress block: a bar (step/total), state, it/s, ETA, loss and what the run is doing."""
    if summary is None:
        return ('<div class="sdl-progress" id="sdl-progress" data-state="none" data-step="0" data-total="0">'
                '<div class="sdl-line"><span class="sdl-state">No run yet</span>'
                '<span class="sdl-msg">Upload a dataset, then press Start training.</span></div></div>')
    s = summary
    state, total = s.state, s.total_steps or 0
    parts = [f'<span class="sdl-state">{esc(s.name)}: {esc(state)}</span>',
             f'<span class="sdl-steps">step {s.step}/{total or "?"}</span>']
    if s.active and s.it_per_s is not None:
        parts.append(f'<span class="sdl-speed">{s.it_per_s:.2f} it/s</span>')
        parts.append(f'<span class="sdl-eta">ETA {fmt_duration(s.eta_s)}</span>')
    if s.loss is not None:
        parts.append(f'<span class="sdl-loss">loss {s.loss:.4f}</span>')
    return (f'<div class="sdl-progress" id="sdl-progress" data-state="{esc(state)}" data-step="{s.step}" '
            f'data-total="{total}">'
            f'<div class="sdl-bar"><div class="sdl-fill {esc(state)}" style="width:{100 * s.fraction:.1f}%">'
            '</div></div>'
            f'<div class="sdl-line">{"".join(parts)}</div>'
            f'<div class="sdl-msg">{esc(s.activity)}</div></div>')


#: Series of the loss plot: every step's loss (drawn faint) and its moving average (drawn strong).
RAW, SMOOTHED = "loss per step", "smoothed"
LOSS_COLORS = {RAW: "#c7d2fe", SMOOTHED: "#4f46e5"}


def smoothed(values: list[float], weight: float | None = None) -> list[float]:
    """An exponential moving average with the start's bias corrected (as TensorBoard smooths);
    the weight grows with the number of points, so long runs get a calm line too."""
    if not values:
        return []
    if weight is None:
        weight = min(0.98, max(0.6, 1 - 10 / len(values)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_frame(points: list[tuple[int, float]]):
    """Loss per step and its smoothed line as a DataFrame for ``gr.LinePlot`` (columns step, loss,
    series), thinned to at most MAX_PLOT_POINTS a series."""
    import pandas as pd

    steps = [int(p[0]) for p in points]
    raw = [float(p[1]) for p in points]
    smooth = smoothed(raw)
    if not points:
        # No steps yet: one empty point a series. The plot takes its colours from the series it is
        # first drawn with, so both must be there from the start (the page may open on this tab).
        steps, raw, smooth = [0], [float("nan")], [float("nan")]
    if len(points) > MAX_PLOT_POINTS:
        stride = len(points) / MAX_PLOT_POINTS
        keep = sorted({int(i * stride) for i in range(MAX_PLOT_POINTS)} | {len(points) - 1})
        steps, raw, smooth = [steps[i] for i in keep], [raw[i] for i in keep], [smooth[i] for i in keep]
    # Typed columns even when empty: the plot reads its axis and colour types from them.
    return pd.DataFrame({"step": pd.Series(steps + steps, dtype="int64"),
                         "loss": pd.Series(raw + smooth, dtype="float64"),
                         "series": pd.Series([RAW] * len(steps) + [SMOOTHED] * len(steps), dtype="string")})


_SAMPLE = re.compile(r"^step-0*(\d+)-(\d+)$")


def sample_label(path: Path) -> str:
    """A sample's caption, short enough to read over a thumbnail: "step 100 #2" for step-000100-1.png."""
    m = _SAMPLE.match(path.stem)
    return f"step {m.group(1)} #{int(m.group(2)) + 1}" if m else path.stem


def newest_samples(run: RunDir, limit: int = 8) -> list[tuple[str, str]]:
    """The newest sample images with short captions (step and prompt number), newest first."""
    return [(str(p), sample_label(p)) for p in reversed(run.samples()[-limit:])]


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
        return without_server_paths("\n".join(clean_log_lines(text.splitlines())[-LOG_TAIL_LINES:]))
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


def samples_label(run: RunDir, summary: RunSummary) -> str:
    """The samples panel's title: when the next samples come (or why there are none)."""
    try:
        every = int(run.load_config().sample_every_n_steps)
    except Exception:  # noqa: BLE001 - a run without a readable config: no schedule to tell
        return "Newest samples"
    if not summary.active:
        return "Newest samples"
    if every <= 0:
        return "Samples come at the end (sample every N steps is 0)"
    nxt = (summary.step // every + 1) * every
    if summary.total_steps:
        nxt = min(nxt, summary.total_steps)
    return f"Newest samples (next at step {nxt})"


def live_view(run: RunDir) -> dict[str, Any]:
    """Everything the live panel shows for one run (``summary`` is the run's :class:`RunSummary`)."""
    summary = run_summary(run)
    return {
        "summary": summary,
        "progress": progress_html(summary),
        "loss": loss_frame(loss_curve(run)),
        "samples": newest_samples(run),
        "samples_label": samples_label(run, summary),
        "log": log_tail(run),
    }
