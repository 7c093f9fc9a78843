"""Helpers shared by several test modules: training data and configs on the tiny model, loading an
exported file into a fresh diffusers pipeline with every complaint checked, reference formulas."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from sdlora.lora import inspect_file
from sdlora.resources import CONFIGS_DIR
from sdlora.train.config import TrainConfig

# ---- training on the tiny model ------------------------------------------------------------------
CONFIG = CONFIGS_DIR / "tiny.toml"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (200, 40, 200), (30, 200, 200)]


def make_images(folder: Path, n: int = 6, size: int = 64) -> Path:
    """Solid-colour squares on white with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["red", "green", "blue", "yellow", "magenta", "cyan"]
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        c = COLOURS[i % len(COLOURS)]
        q = size // 4
        img.paste(Image.new("RGB", (2 * q, 2 * q), c), (q, q))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {names[i % len(names)]} square")
    return folder


def tiny_cfg(tmp_path: Path, data: Path, name: str, *extra: str, model: Path | None = None) -> TrainConfig:
    sets = [f"train_data_dir={data}", f"output_dir={tmp_path / 'runs'}", f"output_name={name}"]
    if model is not None:
        sets.append(f"pretrained_model_name_or_path={model}")
    return TrainConfig.from_toml(CONFIG, sets + list(extra))


# ---- a fresh diffusers pipeline -------------------------------------------------------------------
PROMPT = "a watercolor fox in the snow"
GEN = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
_BAD = re.compile(r"not loaded|unexpected|missing|ignored|not found|incompatible|did not match|mismatch", re.I)


@contextmanager
def captured_messages():
    """Collect warnings and diffusers/peft/transformers log records (at INFO and above)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"warning: {w.message}" for w in caught)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def fresh_pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_load_checked(pipe, path: Path, adapter_name: str | None = None) -> None:
    """``load_lora_weights`` that fails on any complaint and on any module it did not place."""
    info = inspect_file(path)
    with captured_messages() as messages:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    complaints = [m for m in messages if _BAD.search(m)]
    assert not complaints, complaints
    placed = {
        "unet": sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()),
        "text_encoder": sum(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules()),
    }
    assert {k: v for k, v in placed.items() if v} == info["modules"], (placed, info["modules"])


# ---- reference formulas --------------------------------------------------------------------------
def a1111_dora_weight(weight, down, up, alpha, dora_scale, multiplier):
    """The weight A1111 (NetworkModule.finalize_updown + apply_weight_decompose) and ComfyUI
    (weight_decompose) give a layer with a kohya DoRA module, written from their documented steps:

    updown = up @ down * alpha / rank; merged = W + updown; norm of every input column of merged
    (over output and kernel axes); W + multiplier * (merged * dora_scale / norm - W).
    """
    rank = down.shape[0]
    updown = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(weight.shape) * (alpha / rank)
    merged = weight + updown
    columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)
    norm = columns.norm(dim=1).reshape(1, -1, *([1] * (weight.ndim - 2)))
    return weight + multiplier * (merged * (dora_scale.reshape(norm.shape) / norm) - weight)


def resume_from_copy(run_dir: Path, step: int, dest: Path):
    """Resume a copy of a run that holds only its config and its ``step-N`` checkpoint (in ``dest``): what a
    run stopped at step N would have. Returns the training result."""
    import shutil

    from sdlora.train import RunDir, train

    run = RunDir(run_dir)
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy2(run.config_path, dest / "config.toml")
    shutil.copytree(run.checkpoints_dir / f"step-{step}", dest / "checkpoints" / f"step-{step}")
    return train(resume=dest)
