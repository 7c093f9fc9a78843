"""Killing ``app.py`` during training loses nothing: a restarted app shows the run's true state,
stops it (checkpoint) and resumes it from that checkpoint."""

from __future__ import annotations

import json
import os
import signal

from app_testing import QUICK, AppProcess, copy_tiny_model, make_images, stop_all_training, wait_for
from gradio_client import Client, handle_file

from sdlora.train import RunDir, pid_alive


def test_restart_during_training_then_stop_and_resume(tmp_path, tiny_model_dir):
    models = tmp_path / "models"
    spec = str(copy_tiny_model(tiny_model_dir, models).resolve())
    runs = tmp_path / "runs"
    make_images(tmp_path / "imgs", 4)
    app = AppProcess.start(runs, models)
    try:
        client = Client(app.url, verbose=False)
        client.predict(dataset_name="set", files=[handle_file(str(p)) for p in sorted((tmp_path / "imgs").iterdir())],
                       trigger_word="zq", api_name="/upload_dataset")
        # Many steps: the run must still be going when the new app is up; the test stops it itself.
        settings = dict(QUICK, max_train_steps=5000, save_every_n_steps=2, sample_prompts="")
        client.predict(pretrained_model_name_or_path=spec, output_name="long", dataset="set", trigger_word="zq",
                       **settings, api_name="/start_training")
        run = RunDir(runs / "long")
        wait_for(lambda: run.latest_checkpoint(), 240, "the first checkpoint")
        trainer_pid = run.status()["pid"]

        app.kill()  # SIGKILL: no chance to clean up
        assert pid_alive(trainer_pid), "the training process must survive the app"
        app = AppProcess.start(runs, models)
        client = Client(app.url, verbose=False)

        st = client.predict(run="long", api_name="/run_status")
        assert st["state"] == "running" and st["pid"] == trainer_pid, st
        step_before = st["step"]
        wait_for(lambda: client.predict(run="long", api_name="/run_status")["step"] > step_before, 120,
                 "steps to continue while the new app watches")

        msg, _ = client.predict(run="long", api_name="/stop_training")
        assert "Stopping" in msg
        st = wait_for(lambda: (s := client.predict(run="long", api_name="/run_status"))["state"] == "stopped" and s,
                      120, "the run to stop")
        wait_for(lambda: not pid_alive(trainer_pid), 60, "the stopped process to exit")
        stopped_at = st["step"]
        checkpoint = st["checkpoint"]
        assert checkpoint == f"step-{stopped_at}", st  # SIGTERM saved a checkpoint at the current step

        client.predict(run="long", api_name="/resume_training")
        starts = wait_for(lambda: [e for e in run.events({"start"}) if e.get("resumed")], 240, "the resumed start")
        assert starts[-1]["start_step"] == stopped_at
        wait_for(lambda: client.predict(run="long", api_name="/run_status")["step"] > stopped_at, 120,
                 "steps after the resume")
        st = client.predict(run="long", api_name="/run_status")
        assert st["state"] == "running" and st["pid"] != trainer_pid

        # A training process killed outright is reported as failed (not running), with the memory advice, and
        # resumable.
        os.kill(st["pid"], signal.SIGKILL)
        st = wait_for(lambda: (s := client.predict(run="long", api_name="/run_status"))["state"] != "running" and s,
                      60, "the killed run to be noticed")
        assert st["state"] == "failed" and "memory" in st["message"] and "resume" in st["message"], st
        status_file = json.loads((runs / "long" / "status.json").read_text())
        assert status_file["state"] == "running"  # the file still says running; the app checks the process
    finally:
        app.stop()
        stop_all_training(runs)
