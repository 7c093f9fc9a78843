"""Whole training processes, sdlora's and its peers', on the same model, data and settings.

The peers are kohya sd-scripts (``train_network.py`` / ``sdxl_train_network.py``) and diffusers'
DreamBooth-LoRA example (``examples/dreambooth/train_dreambooth_lora.py``); sdlora runs as a user
runs it, ``python -m sdlora.cli train``. Each is one process, started from here one after the
other, never two at once, and timed the same way:

* a step's time is from one step's end to the next's (the peers' progress bars, first appearance
  of ``n/N``; sdlora's ``step`` events in ``events.jsonl``), so data loading, the optimizer and
  logging are in it, as they are for the user;
* the whole job: launch to exit, split into start (loading, caching: until the bar shows 0 or
  sdlora's ``start`` event), steps, and the end (saving the LoRA);
* per step, the process tree's CPU seconds and the cores other processes used meanwhile (from
  ``/proc``, 0.5 s samples), so that a run on a loaded machine shows as such;
* peak memory: ``/usr/bin/time -v``'s maximum resident set size where ``/usr/bin/time`` exists,
  else the largest sampled RSS of the process tree.

A process that brings ``MemAvailable`` under ``MIN_AVAILABLE_GB`` is ended with its process
group (the machine must stay usable).

The peers' folders (``DIR``) are set up outside the project, as ``../shared/peer-bench/setup.sh``
does: ``DIR/sd-scripts`` and ``DIR/diffusers`` (their sources as plain folders), ``DIR/venv-kohya``
and ``DIR/venv-diffusers`` (torch 2.13.0 CPU and each one's requirements), ``DIR/shim`` (a
torchvision stand-in: PyPI's torchvision does not import beside this torch), ``DIR/tokcache``
(the CLIP tokenizer kohya asks for, as a local copy), the models (``sd15-random``,
``sdxl-random``) and the data (``data/kohya``, ``data/diffusers_instance``, ``data/sdxl-*``).
Nothing of the peers is part of this project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: ``MemAvailable`` under which a benchmark subprocess is ended (the machine must stay usable)
MIN_AVAILABLE_GB = 1.0

#: The environment as it was when this module was first imported, before a benchmark sets its own
#: OpenMP waiting (``GOMP_SPINCOUNT``): every trainer's process starts from it, so each runs with
#: what its user would have (OpenMP's wait policy alone changed kohya's step by 25 % here).
BASE_ENV = dict(os.environ)


# Machine and process-tree measurements -------------------------------------------------------------


def busy_seconds() -> float | None:
    """CPU seconds used by all processes of the machine so far (Linux), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def mem_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f}"


def _tree_cpu_rss(root: int) -> tuple[float, float]:
    """CPU seconds and RSS (GB) of a process and its descendants (Linux /proc)."""
    hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    kids: dict[int, list[int]] = {}
    stat: dict[int, tuple[float, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            s = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(name))
        stat[int(name)] = ((int(rest[11]) + int(rest[12])) / hz, int(rest[21]) * page / 1e9)
    cpu = rss = 0.0
    stack = [root]
    while stack:
        pid = stack.pop()
        c, r = stat.get(pid, (0.0, 0.0))
        cpu, rss = cpu + c, rss + r
        stack.extend(kids.get(pid, []))
    return cpu, rss


class Watched:
    """A subprocess (own process group) whose output is read segment by segment (``\\r`` or ``\\n``,
    as tqdm writes), stamped with the arrival time, while the machine's memory is watched: the
    process group is ended when ``MemAvailable`` falls under ``MIN_AVAILABLE_GB``."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 on_segment=None):
        self.segments: list[tuple[float, str]] = []
        self.samples: list[tuple[float, float, float, float]] = []   # time, machine busy s, tree cpu s, tree rss GB
        self.killed_for_memory = False
        self.on_segment = on_segment
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _read(self) -> None:
        fd, buf = self.proc.stdout.fileno(), b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while True:
                cut = [i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0]
                if not cut:
                    break
                seg, buf = buf[:min(cut)], buf[min(cut) + 1:]
                if seg.strip():
                    self._segment(seg.decode("utf-8", "replace"))
        if buf.strip():
            self._segment(buf.decode("utf-8", "replace"))

    def _segment(self, text: str) -> None:
        now = time.monotonic()
        self.segments.append((now, text))
        if self.on_segment:
            self.on_segment(now, text)

    def _watch(self) -> None:
        while self.proc.poll() is None:
            cpu, rss = _tree_cpu_rss(self.proc.pid)
            self.samples.append((time.monotonic(), busy_seconds() or 0.0, cpu, rss))
            avail = mem_available_gb()
            if avail is not None and avail < MIN_AVAILABLE_GB:
                self.killed_for_memory = True
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self._reader.join(5)
        self._watcher.join(5)
        return rc

    def output(self, last: int = 40) -> str:
        return "\n".join(t for _, t in self.segments[-last:])

    def own_cpu_between(self, a: float, b: float) -> float | None:
        """CPU seconds of this process tree between monotonic times a and b (0.5 s samples)."""
        if len(self.samples) < 2 or b <= a:
            return None
        ca = min(self.samples, key=lambda s: abs(s[0] - a))[2]
        cb = min(self.samples, key=lambda s: abs(s[0] - b))[2]
        return cb - ca

    def others_between(self, a: float, b: float) -> float | None:
        """Cores used by processes outside this tree between monotonic times a and b."""
        if len(self.samples) < 2 or b <= a:
            return None

        def at(t):
            best = min(self.samples, key=lambda s: abs(s[0] - t))
            return best[1], best[2]

        (ba, ca), (bb, cb) = at(a), at(b)
        return max(0.0, ((bb - ba) - (cb - ca)) / (b - a))

    def peak_rss_gb(self) -> float | None:
        return max((s[3] for s in self.samples), default=None)


def time_v_maxrss_gb(path: Path) -> float | None:
    """``/usr/bin/time -v``'s maximum resident set size (GiB) from its output file."""
    try:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    except OSError:
        return None
    return int(m.group(1)) / 2**20 if m else None


# One job, three trainers ------------------------------------------------------------------------------


@dataclass
class Job:
    """What every trainer is asked to do: the same model, images, size and LoRA."""

    family: str                 # "sd15" or "sdxl"
    size: int                   # resolution in pixels
    steps: int
    preset: str = "attn-mlp"    # attn-mlp: attention + feed-forward + proj (kohya's default); full: + conv
    rank: int = 16              # rank = alpha (and conv rank = conv alpha for full)
    gradient_checkpointing: bool = False
    precision: str = "no"       # mixed precision: no (fp32) or bf16
    threads: int = 0            # OMP/MKL threads (0: the libraries' default)

    def model(self, peers: Path) -> Path:
        return peers / ("sdxl-random" if self.family == "sdxl" else "sd15-random")

    def data(self, peers: Path) -> Path:
        return peers / "data" / (f"sdxl-{self.size}" if self.family == "sdxl" else "kohya")

    def tag(self) -> str:
        gc = "-gc" if self.gradient_checkpointing else ""
        return f"{self.family}-{self.preset}-{self.size}-{self.precision}{gc}-{self.steps}"


@dataclass
class Result:
    trainer: str
    name: str
    job: Job
    command: list[str]
    rc: int | None = None
    error: str | None = None
    wall_s: float = 0.0                                   # launch to exit
    start_s: float | None = None                          # launch to step 0 (loading, caching)
    steps_end_s: float | None = None                      # launch to the last step's end
    steps: list[dict] = field(default_factory=list)       # step, wall, cpu, others
    maxrss_gb: float | None = None

    def median_of(self, key: str, first: int = 2) -> float | None:
        """Median of ``key`` (wall, cpu, others) over steps ``first``.. (all steps when none is that late)."""
        rows = [s for s in self.steps if s["step"] >= first] or self.steps
        vals = [s[key] for s in rows if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    def median_step(self, first: int = 2) -> float | None:
        return self.median_of("wall", first)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["job"] = vars(self.job)
        return d


def _env(peers: Path | None, job: Job) -> dict[str, str]:
    env = dict(BASE_ENV)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if peers is not None:
        env["PYTHONPATH"] = str(peers / "shim")
        env.pop("VIRTUAL_ENV", None)
    if job.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(job.threads)
    return env


def _timed_prefix(peers: Path, name: str) -> list[str]:
    return ["/usr/bin/time", "-v", "-o", str(peers / "runs" / f"{name}.time")] if Path("/usr/bin/time").is_file() else []


def kohya_command(peers: Path, name: str, job: Job) -> list[str]:
    """kohya's trainer with its LoRA (``networks.lora``), UNet only, cached latents (and text-encoder
    outputs for SDXL, which its SD 1.x script does not have), SDPA, AdamW, constant LR."""
    sdxl = job.family == "sdxl"
    cmd = _timed_prefix(peers, name) + [
        str(peers / "venv-kohya" / "bin" / "python"), "sdxl_train_network.py" if sdxl else "train_network.py",
        "--pretrained_model_name_or_path", str(job.model(peers)),
        "--tokenizer_cache_dir", str(peers / "tokcache"),
        "--train_data_dir", str(job.data(peers)), "--caption_extension", ".txt",
        "--output_dir", str(peers / "runs" / f"{name}-out"), "--output_name", "lora",
        "--save_model_as", "safetensors", "--save_precision", "float",
        "--resolution", str(job.size), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--network_module", "networks.lora", "--network_dim", str(job.rank), "--network_alpha", str(job.rank),
        "--network_train_unet_only",
        "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
        "--max_train_steps", str(job.steps), "--seed", "0", "--mixed_precision", job.precision,
        "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
    ]
    if sdxl:
        cmd += ["--cache_text_encoder_outputs"]
    if job.preset == "full":
        cmd += ["--network_args", f"conv_dim={job.rank}", f"conv_alpha={job.rank}"]
    elif job.preset != "attn-mlp":
        raise ValueError(f"kohya: no preset {job.preset!r} (attn-mlp or full)")
    if job.gradient_checkpointing:
        cmd += ["--gradient_checkpointing"]
    return cmd


def diffusers_command(peers: Path, name: str, job: Job) -> list[str]:
    """diffusers' DreamBooth-LoRA example: LoRA on the UNet's attention projections (to_q/k/v/out),
    its own fixed targets; it encodes every image with the VAE and the prompt every step."""
    if job.family != "sd15":
        raise ValueError("the diffusers example is run for SD 1.x only here")
    cmd = _timed_prefix(peers, name) + [
        str(peers / "venv-diffusers" / "bin" / "python"), "train_dreambooth_lora.py",
        "--pretrained_model_name_or_path", str(job.model(peers)),
        "--instance_data_dir", str(peers / "data" / "diffusers_instance"),
        "--instance_prompt", "a painting in sks style",
        "--output_dir", str(peers / "runs" / f"{name}-out"),
        "--resolution", str(job.size), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(job.steps), "--checkpointing_steps", "100000",
        "--rank", str(job.rank), "--seed", "0", "--mixed_precision", job.precision,
        "--dataloader_num_workers", "0",
    ]
    if job.gradient_checkpointing:
        cmd += ["--gradient_checkpointing"]
    return cmd


def sdlora_settings(peers: Path, name: str, job: Job) -> list[str]:
    """sdlora's CLI options for the same job (kohya's settings where sdlora has a choice)."""
    sets = {
        "pretrained_model_name_or_path": job.model(peers), "train_data_dir": job.data(peers),
        "output_dir": peers / "runs" / f"{name}-out", "output_name": name,
        "resolution": job.size, "train_batch_size": 1, "gradient_accumulation_steps": 1,
        "network_preset": job.preset, "network_dim": job.rank, "network_alpha": job.rank,
        "conv_dim": job.rank, "conv_alpha": job.rank, "train_text_encoder": "false",
        "learning_rate": "1e-4", "optimizer_type": "AdamW", "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "max_train_steps": job.steps, "seed": 0, "mixed_precision": job.precision, "cache_latents": "true",
        "gradient_checkpointing": str(job.gradient_checkpointing).lower(), "save_every_n_steps": 0,
        "sample_every_n_steps": 0, "sample_at_end": "false", "save_precision": "float",
    }
    if job.preset != "full":
        sets.pop("conv_dim"), sets.pop("conv_alpha")
    return [f"{k}={v}" for k, v in sets.items()]


def sdlora_command(peers: Path, name: str, job: Job) -> list[str]:
    cmd = _timed_prefix(peers, name) + [sys.executable, "-m", "sdlora.cli", "train", "--no-progress"]
    for s in sdlora_settings(peers, name, job):
        cmd += ["--set", s]
    return cmd


#: Progress bars of the peers: step count n/N after a step ends
BARS = {"kohya": re.compile(r"^\s*steps:.*?\|\s*(\d+)/(\d+)\s*\["),
        "diffusers": re.compile(r"^\s*Steps:.*?\|\s*(\d+)/(\d+)\s*\[")}


def run(trainer: str, peers: Path, job: Job, *, name: str | None = None, timeout: float = 7200,
        echo=None) -> Result:
    """Run one trainer on ``job``; ``echo(text)`` is called with a line now and then."""
    name = name or f"{trainer}-{job.tag()}"
    peers = peers.resolve()
    (peers / "runs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(peers / "runs" / f"{name}-out", ignore_errors=True)
    if trainer == "kohya":
        cmd, cwd, env = kohya_command(peers, name, job), peers / "sd-scripts", _env(peers, job)
    elif trainer == "diffusers":
        cmd, cwd, env = diffusers_command(peers, name, job), peers / "diffusers" / "examples" / "dreambooth", _env(peers, job)
    elif trainer == "sdlora":
        cmd, cwd, env = sdlora_command(peers, name, job), ROOT, _env(None, job)
    else:
        raise ValueError(f"unknown trainer {trainer!r}")
    marks: dict[int, float] = {}
    log = (peers / "runs" / f"{name}.log").open("w", encoding="utf-8", buffering=1)
    t0 = time.monotonic()
    wall_offset = time.time() - t0  # sdlora's events carry wall-clock times
    bar = BARS.get(trainer)

    def on_segment(now: float, text: str) -> None:
        log.write(f"{now - t0:10.3f} {text}\n")
        m = bar.search(text) if bar else None
        if m:
            marks.setdefault(int(m.group(1)), now)

    w = Watched(cmd, env=env, cwd=cwd, on_segment=on_segment)
    rc = w.wait(timeout)
    end = time.monotonic()
    log.close()
    if trainer == "sdlora":
        events = peers / "runs" / f"{name}-out" / name / "events.jsonl"
        try:
            for line in events.read_text(encoding="utf-8").splitlines():
                e = json.loads(line)
                if e["type"] == "start":
                    marks.setdefault(0, e["time"] - wall_offset)
                elif e["type"] == "step":
                    marks.setdefault(int(e["step"]), e["time"] - wall_offset)
        except OSError:
            pass
    r = Result(trainer, name, job, cmd, rc=rc, wall_s=end - t0)
    r.maxrss_gb = time_v_maxrss_gb(peers / "runs" / f"{name}.time") or w.peak_rss_gb()
    if w.killed_for_memory:
        r.error = f"ended: MemAvailable fell under {MIN_AVAILABLE_GB} GiB"
    elif rc != 0:
        r.error = f"exit {rc}: {w.output(15)[-2000:]}"
    for n in sorted(marks):
        if n >= 1 and n - 1 in marks:
            a, b = marks[n - 1], marks[n]
            r.steps.append({"step": n, "wall": b - a, "cpu": w.own_cpu_between(a, b), "others": w.others_between(a, b)})
    r.start_s = marks[0] - t0 if 0 in marks else None
    r.steps_end_s = marks[job.steps] - t0 if job.steps in marks else None
    if echo:
        echo(describe(r))
    return r


def describe(r: Result) -> str:
    med, cpu, others = r.median_step(), r.median_of("cpu"), r.median_of("others")
    parts = [f"{r.trainer} {r.job.preset} {r.job.size} px {r.job.precision}: " + (r.error.splitlines()[0] if r.error else "done")]
    if med is not None:
        parts.append(f"step {med:.2f} s (median of steps 2..{r.job.steps}; CPU {cpu or float('nan'):.2f} s, others used "
                     f"{others or 0:.2f} cores)")
    if r.start_s is not None and r.steps_end_s is not None:
        parts.append(f"job {r.wall_s:.0f} s = start {r.start_s:.0f} + steps {r.steps_end_s - r.start_s:.0f} + end "
                     f"{r.wall_s - r.steps_end_s:.0f}")
    if r.maxrss_gb:
        parts.append(f"peak RSS {r.maxrss_gb:.2f} GiB")
    return "; ".join(parts)


def check_peers(peers: Path, family: str = "sd15", trainers=("kohya", "diffusers")) -> list[str]:
    """What is missing under ``peers`` for these trainers (empty: ready)."""
    need = {"kohya": ["sd-scripts/train_network.py", "venv-kohya/bin/python", "tokcache", "shim"],
            "diffusers": ["diffusers/examples/dreambooth/train_dreambooth_lora.py", "venv-diffusers/bin/python",
                          "data/diffusers_instance"]}
    model = "sdxl-random/model_index.json" if family == "sdxl" else "sd15-random/model_index.json"
    missing = [] if (peers / model).is_file() else [model]
    for t in trainers:
        missing += [p for p in need.get(t, []) if not (peers / p).exists()]
    return missing
