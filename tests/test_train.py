"""Training on the tiny model: learning, lr=0 control, exact resume after SIGTERM, SIGKILL safety, failures."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdlora.train.config import ConfigError, TrainConfig
from sdlora.train.loop import train
from sdlora.train.runs import RunDir

from helpers import CONFIG, make_images, tiny_cfg


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def generate_with(model_dir: Path, lora: Path | None, seed: int = 0) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe("a red square, in tinystyle style", num_inference_steps=3, height=64, width=64, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_training_learns_and_lr0_is_identity(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    events = []
    res = train(tiny_cfg(tmp_path, data, "learn", "max_train_steps=30", "learning_rate=2e-3", "text_encoder_lr=1e-3",
                         "save_every_n_steps=0", model=tiny_model_dir), callbacks=[events.append])
    assert res.state == "done" and res.lora_path.is_file()
    losses = [e.loss for e in events if e.type == "step"]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    kinds = [e.type for e in events]
    assert kinds.count("start") == 1 and kinds[-1] == "done"
    step_ev = [e for e in events if e.type == "step"][-1]
    assert step_ev.it_per_s > 0 and step_ev.eta_s == 0 and step_ev.lr > 0
    # events.jsonl has the same steps
    logged = RunDir(res.run_dir).events({"step"})
    assert [round(e["loss"], 6) for e in logged] == [round(x, 6) for x in losses]

    base = generate_with(tiny_model_dir, None)
    learned = generate_with(tiny_model_dir, res.lora_path)
    assert np.abs(learned - base).max() > 1e-3

    zero = train(tiny_cfg(tmp_path, data, "lr0", "max_train_steps=5", "learning_rate=0", "text_encoder_lr=0",
                          model=tiny_model_dir))
    assert np.array_equal(generate_with(tiny_model_dir, zero.lora_path), base)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    end = time.time() + timeout
    while time.time() < end:
        last = RunDir(run).last_step_event()
        if last and last["step"] >= step:
            return last["step"]
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}\n{(run / 'train.log').read_text() if (run / 'train.log').exists() else ''}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the trainer")


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sdlora.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow  # trainer subprocesses: 40-65 s on 2 loaded cores
def test_exact_resume_after_sigterm(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    common = ["max_train_steps=24", "save_every_n_steps=0",
              "shuffle_caption=true", "caption_dropout_rate=0.3", "flip_aug=true", "network_dropout=0.1",
              f"pretrained_model_name_or_path={tiny_model_dir}", f"train_data_dir={data}", f"output_dir={tmp_path / 'runs'}"]
    straight = train(TrainConfig.from_toml(CONFIG, common + ["output_name=straight"]))

    proc = _cli("train", str(CONFIG), *sum((["--set", s] for s in common + ["output_name=resumed"]), []), "--no-progress")
    run = tmp_path / "runs" / "resumed"
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out  # stopped with a checkpoint: not the exit code of a finished run
    st = RunDir(run).status()
    assert st["state"] == "stopped", (st, out)
    stopped_at = st["step"]
    assert 3 <= stopped_at < 24
    assert RunDir(run).latest_checkpoint().name == f"step-{stopped_at}"
    assert not RunDir(run).lora_path.exists()

    proc = _cli("train", "--resume", str(run), "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert RunDir(run).status()["state"] == "done"
    a, b = lora_tensors(straight.lora_path), lora_tensors(RunDir(run).lora_path)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # trainer subprocesses: 40-65 s on 2 loaded cores
def test_sigkill_leaves_only_complete_files_and_resumes(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    sets = ["max_train_steps=40", "save_every_n_steps=3", "save_last_n_checkpoints=2", f"pretrained_model_name_or_path={tiny_model_dir}", f"train_data_dir={data}",
            f"output_dir={tmp_path / 'runs'}", "output_name=killed"]
    proc = _cli("train", str(CONFIG), *sum((["--set", s] for s in sets), []), "--no-progress")
    run = tmp_path / "runs" / "killed"
    _wait_for_step(run, random.Random(os.getpid()).randint(4, 12), proc)
    proc.kill()
    proc.wait()
    rd = RunDir(run)
    st = rd.status()  # the dead process is not reported as running: killed without a word is a failure
    assert st["state"] == "failed" and "memory" in st["message"] and "resume continues" in st["message"], st
    # Nothing half-written where a loader would look: only complete step-N folders and no final LoRA yet.
    for p in rd.checkpoints_dir.iterdir():
        if not p.name.startswith("."):
            assert (p / "state.json").is_file() and (p / "adapter.safetensors").is_file(), p
    assert not rd.lora_path.exists()
    assert [p for p in run.iterdir() if p.suffix == ".safetensors"] == []
    assert rd.latest_checkpoint() is not None
    # what a kill during a write leaves (whether this kill hit one is chance): temp names, cleaned on resume
    (rd.checkpoints_dir / ".step-99.k1ll3d.tmp").mkdir()
    (rd.checkpoints_dir / ".step-99.k1ll3d.tmp" / "adapter.safetensors").write_bytes(b"half")
    (run / ".killed.safetensors.k1ll3d.tmp").write_bytes(b"half")

    res = train(resume=run)
    assert res.state == "done" and res.lora_path.is_file()
    assert rd.status()["state"] == "done"
    assert len(rd.checkpoints()) <= 2
    assert [p.name for p in rd.checkpoints_dir.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def test_nan_loss_stops_with_clear_message(tmp_path, tiny_model_dir):
    from sdlora.train.loop import TrainingError

    data = make_images(tmp_path / "data")
    # The largest rates the config allows, unclipped: the loss diverges within a few steps.
    cfg = tiny_cfg(tmp_path, data, "nan", "max_train_steps=30", "learning_rate=1", "text_encoder_lr=1",
                   "max_grad_norm=0", "save_every_n_steps=1", model=tiny_model_dir)
    with pytest.raises(TrainingError, match="loss became") as e:
        train(cfg)
    assert "learning_rate" in str(e.value)
    rd = RunDir(cfg.run_dir)
    st = rd.status()
    assert st["state"] == "failed" and "loss became" in st["message"]
    assert rd.latest_checkpoint() is not None  # the last good checkpoint is kept


def test_no_usable_images_fails_before_loading_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    (empty / "broken.png").write_bytes(b"not an image")
    cfg = TrainConfig.from_toml(CONFIG, [f"train_data_dir={empty}", f"output_dir={tmp_path / 'runs'}",
                                         "pretrained_model_name_or_path=/nonexistent/model"])
    with pytest.raises(ConfigError) as e:
        train(cfg)
    # the data problem is reported, not the (never loaded) model
    assert e.value.key == "train_data_dir"
    assert "image" in str(e.value).lower() and "nonexistent" not in str(e.value)


def test_cli_train_bad_option_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", str(CONFIG), "--set", "network_dim=0",
                        "--set", f"train_data_dir={tmp_path}"], capture_output=True, text=True)
    assert r.returncode == 1 and "network_dim" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "--frobnicate" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trainer subprocesses: 40-65 s on 2 loaded cores
def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    """accelerate launch --multi_gpu --num_processes 2 (no GPU here: CPU processes over gloo): equal adapters on
    both ranks, same losses as 1 process x batch 2."""
    data = make_images(tmp_path / "data")
    sets = ["max_train_steps=6", "save_every_n_steps=0", f"pretrained_model_name_or_path={tiny_model_dir}",
            f"train_data_dir={data}", f"output_dir={tmp_path / 'runs'}", "train_text_encoder=false"]
    single = train(TrainConfig.from_toml(CONFIG, sets + ["output_name=single", "train_batch_size=2"]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdlora.cli", "train", str(CONFIG), "--no-progress"]
    for s in sets + ["output_name=multi", "train_batch_size=1"]:
        cmd += ["--set", s]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    multi = RunDir(tmp_path / "runs" / "multi")
    done = multi.events({"done"})
    assert len(done) == 1 and done[0]["processes"] == 2
    assert len(done[0]["adapter_digests"]) == 2 and len(set(done[0]["adapter_digests"])) == 1
    l1 = [e["loss"] for e in RunDir(single.run_dir).events({"step"})]
    l2 = [e["loss"] for e in multi.events({"step"})]
    assert len(l1) == len(l2) == 6
    assert np.allclose(l1, l2, rtol=1e-4, atol=1e-6), (l1, l2)
    a, b = lora_tensors(single.lora_path), lora_tensors(multi.lora_path)
    assert a.keys() == b.keys()
    # Same maths, other reduction order: Adam amplifies rounding on near-zero gradients, so compare
    # the whole adapter by relative norm, and each tensor within a fraction of the lr x steps.
    va = torch.cat([a[k].flatten().float() for k in sorted(a)])
    vb = torch.cat([b[k].flatten().float() for k in sorted(a)])
    assert (va - vb).norm() / va.norm() < 1e-2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3 * 6 * 0.1), k


def test_prior_preservation_generates_class_images_once(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    class_dir = tmp_path / "class"
    sets = ["with_prior_preservation=true", "class_prompt=a square", f"class_data_dir={class_dir}", "num_class_images=3",
            "max_train_steps=3", "save_every_n_steps=0", "sample_steps=2", "enable_bucket=false"]
    events = []
    train(tiny_cfg(tmp_path, data, "prior1", *sets, model=tiny_model_dir), callbacks=[events.append])
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 3
    mtimes = [p.stat().st_mtime_ns for p in made]
    steps = [e for e in events if e.type == "step"]
    assert all(e.loss_prior is not None and np.isfinite(e.loss_prior) for e in steps)
    assert any(e.type == "message" and "class images" in e.text for e in events)

    events2 = []
    train(tiny_cfg(tmp_path, data, "prior2", *sets, model=tiny_model_dir), callbacks=[events2.append])
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == mtimes  # reused, not regenerated
    assert not any(e.type == "message" and "generating" in e.text for e in events2)
    assert all(e.loss_prior is not None for e in events2 if e.type == "step")


def test_precision_choice_measures_the_cpu():
    from sdlora.train.measure import cpu_bf16_speedup
    from sdlora.train.precision import resolve_precision

    # An AVX2-only CPU: bf16 convolutions hundreds of times slower than fp32.
    assert resolve_precision("auto", "cpu", bf16_speedup=0.005) == ("no", None)
    prec, warning = resolve_precision("bf16", "cpu", bf16_speedup=0.005)
    assert prec == "bf16" and "slower" in warning and "auto" in warning
    # A CPU with native bf16 (AVX512-BF16 / AMX): auto takes it.
    assert resolve_precision("auto", "cpu", bf16_speedup=3.0) == ("bf16", None)
    assert resolve_precision("fp16", "cpu")[0] == "no"
    # This machine, measured for real: a positive speed ratio, and auto without a given ratio decides
    # as it does when given this machine's measured one.
    measured = cpu_bf16_speedup()
    assert measured > 0
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", "cpu", bf16_speedup=measured)


def test_adamw8bit_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    cfg = tiny_cfg(tmp_path, data, "8bit", "optimizer_type=AdamW8bit", "max_train_steps=2", model=tiny_model_dir)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert e.value.key == "optimizer_type" and "CUDA" in str(e.value)
    assert RunDir(cfg.run_dir).status()["state"] == "failed"


def test_prodigy_bf16_cosine_accumulation_train(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data")
    events = []
    res = train(tiny_cfg(tmp_path, data, "prodigy", "optimizer_type=Prodigy", "learning_rate=1.0", "text_encoder_lr=1.0",
                         "mixed_precision=bf16", "lr_scheduler=cosine", "lr_warmup_steps=2",
                         "gradient_accumulation_steps=2", "max_train_steps=6", "min_snr_gamma=5", "noise_offset=0.05",
                         "gradient_checkpointing=true", model=tiny_model_dir), callbacks=[events.append])
    assert res.state == "done"
    steps = [e for e in events if e.type == "step"]
    assert len(steps) == 6 and all(np.isfinite(e.loss) for e in steps)
    lrs = [e.lr for e in steps]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up then cosine decay
    assert [e for e in events if e.type == "start"][0].precision == "bf16"
