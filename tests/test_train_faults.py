"""Faults injected into training on the tiny model: a full disk, a damaged newest checkpoint, a batch the data
cannot fill, superseded steps after a kill. Each ends with a clear message and loses nothing."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_images
from sdlora.train import ConfigError, RunDir, TrainConfig, TrainingError, train
from sdlora.train.events import Checkpoint


def _cfg(tmp: Path, out: Path, name: str, *, data: Path | None = None, **kw) -> TrainConfig:
    data = data or make_images(tmp / "data", n=4)
    base = dict(pretrained_model_name_or_path="tiny", train_data_dir=str(data), output_dir=str(out), output_name=name,
                resolution=64, max_train_steps=6, save_every_n_steps=2, save_last_n_checkpoints=5, mixed_precision="no",
                train_text_encoder=False, network_preset="attn", network_dim=4, network_alpha=4.0, seed=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB tmpfs of its own, so filling it touches nothing else (needs mount rights, as root has)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip() or r.returncode}); the disk-full path "
                    "needs a file system that can be filled safely")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte (unbuffered writes, so nothing fails later)."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_with_one_line_and_the_last_checkpoint_resumes(tmp_path, small_disk):
    filler: list[Path] = []

    def fill_after_first_checkpoint(ev) -> None:
        if isinstance(ev, Checkpoint) and ev.step == 2 and not filler:
            filler.append(_fill(small_disk))

    cfg = _cfg(tmp_path, small_disk / "runs", "full")
    with pytest.raises(TrainingError) as err:
        train(cfg, callbacks=[fill_after_first_checkpoint])
    msg = str(err.value)
    assert "\n" not in msg and "the disk is full" in msg and str(cfg.run_dir) in msg
    assert "step-2" in msg and "intact" in msg and "MB" in msg
    run = RunDir(cfg.run_dir)
    assert [p.name for p in run.checkpoints()] == ["step-2"]  # nothing half-written where a loader looks
    assert not run.lora_path.exists()

    filler[0].unlink()  # space again: the run continues from step 2 and finishes
    result = train(resume=run.path)
    assert result.state == "done" and result.step == 6 and result.lora_path.is_file()


def test_cli_reports_a_full_disk_without_a_traceback(tmp_path, small_disk):
    cfg = _cfg(tmp_path, small_disk / "runs", "cli")
    RunDir(cfg.run_dir).write_config(cfg)
    filler = _fill(small_disk)
    try:
        r = subprocess.run(["python", "-m", "sdlora.cli", "train", "--resume", str(cfg.run_dir), "--no-progress"],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        filler.unlink()
    assert r.returncode == 1, r.stderr
    assert "disk is full" in r.stderr and "Traceback" not in r.stderr


def test_a_damaged_newest_checkpoint_is_named_and_the_newest_good_one_resumes(tmp_path):
    straight = train(_cfg(tmp_path, tmp_path / "runs", "straight"))
    run = RunDir(tmp_path / "runs" / "cut")
    train(_cfg(tmp_path, tmp_path / "runs", "cut", max_train_steps=4))
    # step-4 is the newest; its adapter file is cut short (a full disk or a bad copy)
    adapter = run.checkpoints_dir / "step-4" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    cfg = run.load_config().replace(max_train_steps=6)
    run.write_config(cfg)
    result = train(resume=run.path)
    assert result.state == "done" and result.step == 6
    warnings = [e["text"] for e in run.events({"warning"})]
    assert any("step-4" in w and "damaged" in w and "step-2" in w for w in warnings), warnings
    resumed = [e for e in run.events({"start"}) if e.get("resumed")]
    assert resumed and resumed[-1]["start_step"] == 2
    # resuming from step 2 is exact: the same file as the run that went straight to 6
    a, b = load_file(str(straight.lora_path)), load_file(str(result.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_superseded_steps_after_a_resume_are_dropped_for_readers(tmp_path):
    """A killed process logged steps 3-4 after checkpoint step-2; the resumed process does 3-4 again. Readers
    (loss curve, progress) see each step once, the resumed one."""
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    lines = [{"type": "start", "start_step": 0, "resumed": False}] + \
        [{"type": "step", "step": i, "loss": 1.0 * i, "total_steps": 4} for i in (1, 2, 3, 4)] + \
        [{"type": "start", "start_step": 2, "resumed": True}] + \
        [{"type": "step", "step": i, "loss": 10.0 * i, "total_steps": 4} for i in (3, 4)]
    import json

    run.events_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(e["step"], e["loss"]) for e in run.step_events()] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    from sdlora.train import loss_curve

    assert loss_curve(run) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_batch_larger_than_the_dataset_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="train_batch_size.*<= 4096"):
        _cfg(tmp_path, tmp_path / "runs", "huge", train_batch_size=100000).validate()
    with pytest.raises(ConfigError, match="train_batch_size.*4 training images"):
        train(_cfg(tmp_path, tmp_path / "runs", "big", train_batch_size=16))
    assert not (tmp_path / "runs" / "big").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="max_train_steps"):
        _cfg(tmp_path, tmp_path / "runs", "long", max_train_steps=10**12).validate()
    with pytest.raises(ConfigError, match="output_name.*300 characters"):
        _cfg(tmp_path, tmp_path / "runs", "x" * 300).validate()
