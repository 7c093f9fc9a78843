"""Test helpers: the web app in a child process, and small datasets, for the end-to-end tests.

``AppProcess.start(runs_dir, models_dir)`` launches ``python app.py`` on a free port and waits until
it answers; ``stop()`` ends it and every training process it started (they run in their own
sessions, so they would otherwise outlive the app). ``make_images`` / ``make_zip`` write small
striped images with captions; ``QUICK`` holds training settings that finish in seconds on the tiny
model.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, ImageDraw

from sdlora.train.runs import RunDir, pid_alive

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers (any HTTP status); fail early if ``proc`` exits."""
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before serving {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class AppProcess:
    """A running ``python app.py``."""

    proc: subprocess.Popen
    url: str
    runs_dir: Path
    models_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, runs_dir: str | Path, models_dir: str | Path, *, extra_args: Sequence[str] = (),
              port: int | None = None, log_path: str | Path | None = None, timeout: float = 120.0,
              env: dict[str, str] | None = None) -> "AppProcess":
        runs_dir, models_dir = Path(runs_dir).resolve(), Path(models_dir).resolve()
        port = port or free_port()
        log_path = Path(log_path) if log_path else runs_dir.parent / f"app-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        args = ["--host", "127.0.0.1", "--port", str(port), "--runs-dir", str(runs_dir),
                "--models-dir", str(models_dir), *extra_args]
        full_env = dict(os.environ)
        full_env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
                         "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), *args], cwd=str(REPO_ROOT),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
        log.close()
        app = cls(proc, f"http://127.0.0.1:{port}/", runs_dir, models_dir, log_path, args)
        try:
            wait_http(app.url + "gradio_api/info", timeout, proc)
        except BaseException:
            app.stop()
            raise
        return app

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """End the app the hard way (SIGKILL), leaving its training processes running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, *, stop_training: bool = True, timeout: float = 30.0) -> None:
        """End the app, and (by default) every training it started: SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if stop_training:
            stop_all_training(self.runs_dir, timeout=timeout)


def stop_all_training(runs_dir: str | Path, timeout: float = 30.0) -> None:
    """Stop every training process recorded in the run directories under ``runs_dir``."""
    base = Path(runs_dir)
    if not base.is_dir():
        return
    for p in base.iterdir():
        if not (p / "status.json").is_file():
            continue
        try:
            pid = RunDir(p).status().get("pid")
        except Exception:  # noqa: BLE001 - a broken status file has no process to stop
            continue
        if not pid or pid == os.getpid() or not pid_alive(pid):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        end = time.time() + timeout
        while time.time() < end and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---- small datasets and helpers -------------------------------------------------------------
#: Training settings that finish in seconds with the tiny model (64 px, a few steps, fp32). They name the
#: schedule and the text encoder too: the page's defaults (and so the API's) follow the chosen base's preset.
QUICK = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64, network_preset="full",
             network_dim=4, conv_dim=4, network_alpha=4.0, conv_alpha=4.0, train_batch_size=2,
             learning_rate=1e-3, text_encoder_lr=1e-3, train_text_encoder=True, lr_scheduler="constant",
             lr_warmup_steps=0,
             mixed_precision="no", save_every_n_steps=2,
             sample_every_n_steps=0, sample_steps=2, sample_prompts="a red square, in {trigger} style",
             caption_template="{caption}, in {trigger} style")


def striped(color: tuple[int, int, int], size: int = 64, period: int = 8, seed: int = 0) -> Image.Image:
    """A small image with diagonal stripes of ``color`` (the "style" the tests train)."""
    im = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(im)
    for k in range(-size, 2 * size, period):
        d.line([(k + seed, 0), (k + seed - size, size)], fill=color, width=period // 2)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_images(folder: Path, n: int = 4, prefix: str = "img") -> list[Path]:
    """``n`` striped PNGs with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (200, 160, 30), (120, 40, 160), (30, 150, 150)]
    out = []
    for i in range(n):
        p = folder / f"{prefix}{i}.png"
        striped(colors[i % len(colors)], seed=i).save(p)
        (folder / f"{prefix}{i}.txt").write_text(f"stripes number {i}")
        out.append(p)
    return out


def make_zip(path: Path, n: int = 2) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            zf.writestr(f"set/z{i}.png", png_bytes(striped((90, 90, 200 - 50 * i), seed=3 * i)))
            zf.writestr(f"set/z{i}.txt", f"zipped stripes {i}")
    return path


def copy_tiny_model(src: Path, models_dir: Path, name: str = "tiny") -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    dst = models_dir / name
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def broken_model(src: Path, models_dir: Path, name: str = "broken") -> Path:
    """A model folder whose configs are fine (it is listed) but whose UNet weights are garbage."""
    dst = copy_tiny_model(src, models_dir, name)
    for f in (dst / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    return dst


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
