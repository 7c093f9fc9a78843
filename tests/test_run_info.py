"""What the training API reports about run directories and datasets, without any UI: a run's
summary (state, progress, the trainer's newest word), its loss curve, the steps one can export and
the dataset check with the trainer's settings. Run folders are written here as a trainer leaves
them (config.toml, status.json, events.jsonl, checkpoints/step-N/state.json)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image

from sdlora.train import (RunDir, TrainConfig, active_run, base_settings, dataset_check, export_steps, final_lora,
                          loss_curve, run_summaries, run_summary)


def _run(root: Path, name: str, *, state: str, message: str = "", pid: int | None = None,
         events: list[dict] = (), checkpoints: list[int] = (), final: bool = False, **status) -> RunDir:
    run = RunDir(root / name)
    run.write_config(TrainConfig(output_name=name, output_dir=str(root)))
    data = dict(state=state, message=message, pid=pid if pid is not None else 0, updated=time.time(), **status)
    run.status_path.write_text(json.dumps(data))
    with open(run.events_path, "w") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")
    for step in checkpoints:
        d = run.checkpoints_dir / f"step-{step}"
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    if final:
        run.lora_path.write_bytes(b"x")
    return run


def _step(step: int, total: int, loss: float) -> dict:
    return {"type": "step", "step": step, "total_steps": total, "loss": loss, "lr": 1e-4, "it_per_s": 2.5,
            "eta_s": (total - step) / 2.5}


def test_running_run_shows_progress_speed_and_the_newest_step(tmp_path):
    run = _run(tmp_path, "live", state="running", message="training", pid=os.getpid(),
               events=[{"type": "message", "text": "caching latents", "done": 4, "total": 4},
                       _step(1, 10, 0.5), _step(2, 10, 0.25)], checkpoints=[2])
    s = run_summary(run)
    assert (s.name, s.state, s.active) == ("live", "running", True)
    assert (s.step, s.total_steps, s.loss, s.it_per_s, s.eta_s) == (2, 10, 0.25, 2.5, 3.2)
    assert s.fraction == 0.2
    assert s.checkpoint == "step-2" and s.lora is None
    assert s.activity == "training"  # steps are coming: the progress line says so, not "caching"


def test_preparing_run_shows_what_it_is_preparing(tmp_path):
    run = _run(tmp_path, "prep", state="running", message="loading", pid=os.getpid(),
               events=[{"type": "message", "text": "caching latents", "done": 3, "total": 10}])
    s = run_summary(run)
    assert s.activity == "caching latents (3/10)"
    assert s.step == 0 and s.total_steps is None and s.fraction == 0.0 and s.loss is None


def test_a_run_whose_process_is_gone_is_failed_and_says_resume(tmp_path):
    run = _run(tmp_path, "killed", state="running", message="training", pid=2**22 + 12345,
               events=[_step(3, 10, 0.3)], checkpoints=[2])
    s = run_summary(run)
    assert s.state == "failed" and not s.active  # killed without a word (no stop asked): a failure
    assert "memory" in s.message and "resume continues" in s.message
    assert s.activity == s.message  # no stale "caching" or "training" line


def test_done_and_failed_runs(tmp_path):
    done = _run(tmp_path, "done", state="done", message="finished", events=[_step(9, 10, 0.1)], checkpoints=[5, 10],
                final=True, step=10)
    s = run_summary(done)
    assert s.fraction == 1.0 and s.step == 10 and s.lora == str(done.lora_path)
    failed = _run(tmp_path, "failed", state="failed", message="CUDA out of memory",
                  events=[{"type": "message", "text": "loading the base model"}])
    s = run_summary(failed)
    assert s.state == "failed" and s.activity == "CUDA out of memory"


def test_runs_are_listed_newest_first_and_the_active_one_is_found(tmp_path):
    _run(tmp_path, "old", state="done")
    time.sleep(0.02)
    _run(tmp_path, "training", state="running", pid=os.getpid())
    time.sleep(0.02)
    _run(tmp_path, "new", state="stopped")
    (tmp_path / "_datasets").mkdir()  # not a run
    assert [s.name for s in run_summaries(tmp_path)] == ["new", "training", "old"]
    assert active_run(tmp_path).name == "training"
    assert active_run(tmp_path / "nothing-here") is None


def test_loss_curve_is_every_reported_step(tmp_path):
    run = _run(tmp_path, "r", state="done", events=[_step(1, 3, 0.5), {"type": "message", "text": "x"},
                                                    _step(2, 3, 0.4), _step(3, 3, 0.3)])
    assert loss_curve(run) == [(1, 0.5), (2, 0.4), (3, 0.3)]
    with open(run.events_path, "a") as f:
        f.write('{"type": "step", "step": 4')  # a line being written right now
    assert loss_curve(run.path) == [(1, 0.5), (2, 0.4), (3, 0.3)]


def test_export_steps_are_the_complete_checkpoints_newest_first(tmp_path):
    run = _run(tmp_path, "r", state="done", checkpoints=[10, 2, 30], final=True)
    (run.checkpoints_dir / "step-40").mkdir()  # incomplete: no state.json yet
    (run.checkpoints_dir / ".step-50.tmp").mkdir()
    assert export_steps(run) == [30, 10, 2]
    assert final_lora(run) == run.lora_path
    bare = _run(tmp_path, "bare", state="stopped")
    assert export_steps(bare) == [] and final_lora(bare) is None


def _image(path: Path, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def test_dataset_check_uses_the_trainers_buckets_and_captions(tmp_path):
    data = tmp_path / "data"
    _image(data / "wide.png", (256, 128))
    _image(data / "square.png", (128, 128))
    (data / "wide.txt").write_text("red bar")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    values = dict(train_data_dir=str(data), resolution=128, min_bucket_reso=64, max_bucket_reso=256,
                  bucket_reso_steps=64, trigger_word="zq", caption_template="{caption}, in {trigger} style")
    check = dataset_check(TrainConfig.from_dict(values, validate=False))
    assert check.usable and check.bucket_error is None and check.caption_error is None
    assert check.summary["images"] == 2 and check.summary["captioned"] == 1
    assert check.summary["buckets"] == {"128x128": 1, "192x64": 1}  # the wide image keeps a wide shape
    assert "red bar, in zq style" in check.summary["example_captions"]
    assert [Path(s.path).name for s in check.scan.skipped] == ["broken.png"]
    # Without bucketing every image is cropped to the square training size.
    square = dataset_check(TrainConfig.from_dict(dict(values, enable_bucket=False), validate=False))
    assert square.summary["buckets"] == {"128x128": 2}


def test_dataset_check_reports_unusable_data_and_settings(tmp_path):
    data = tmp_path / "data"
    (data / "broken.png").parent.mkdir()
    (data / "broken.png").write_bytes(b"junk")
    check = dataset_check(TrainConfig.from_dict(dict(train_data_dir=str(data)), validate=False))
    assert not check.usable and check.summary is None and len(check.scan.skipped) == 1

    _image(data / "ok.png")
    bad = TrainConfig.from_dict(dict(train_data_dir=str(data), resolution=64, bucket_reso_steps=0,
                                     caption_template="no placeholders {nope}"), validate=False)
    check = dataset_check(bad)
    assert check.usable and check.bucket_error and check.summary["buckets"] == {}
    assert check.caption_error


def test_base_settings_follow_the_base_models_size_and_family():
    # SDXL at 1024: kohya's SDXL buckets and the rates SDXL style LoRAs train with.
    assert base_settings("sdxl", 1024) == {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048,
                                           "bucket_reso_steps": 64, "learning_rate": 1e-4, "text_encoder_lr": 5e-6}
    # A tiny SDXL test model: its own size, SDXL rates.
    tiny = base_settings("sdxl", 64)
    assert (tiny["resolution"], tiny["min_bucket_reso"], tiny["max_bucket_reso"]) == (64, 64, 128)
    assert tiny["text_encoder_lr"] == 5e-6
    # SD 1.x / 2.x: the config's own rates; odd sizes get 8 px bucket steps.
    defaults = TrainConfig()
    sd = base_settings("sd1", 512)
    assert (sd["learning_rate"], sd["text_encoder_lr"]) == (defaults.learning_rate, defaults.text_encoder_lr)
    assert (sd["min_bucket_reso"], sd["max_bucket_reso"]) == (256, 1024)
    assert base_settings("sd2", 100)["resolution"] == 96 and base_settings("sd2", 100)["bucket_reso_steps"] == 8
    # Every value is one the config accepts.
    TrainConfig.from_dict(dict(base_settings("sdxl", 1024), output_name="x", train_data_dir="."), validate=True)
