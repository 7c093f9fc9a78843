"""Helpers for the AdaLoRA / DyLoRA / LoRA-drop / Delta-LoRA tests and the run-export tests.

A method's run trains a few steps on the tiny model with the real trainer, keeping every
checkpoint; exact resume is checked by resuming a copy of the run directory that holds only the
config and one mid-run checkpoint (what a run stopped at that step leaves), which must end with the
same file as the run that went straight through.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sdlora.train.config import TrainConfig
from sdlora.train.loop import TrainResult, train
from sdlora.train.runs import RunDir

from helpers import CONFIG, GEN, PROMPT, diffusers_load_checked, fresh_pipeline, make_images

PREVIEW = dict(seed=11, steps=3, guidance=5.0, scheduler="DDIM", output="np")


def train_method(tmp: Path, model_dir: Path, method: str, *sets: str, steps: int = 4, save_every: int = 2) -> TrainResult:
    """Train ``method`` for ``steps`` steps on the tiny model (UNet 'full' preset + text encoder)."""
    data = tmp / "data"
    if not data.is_dir():
        make_images(data)
    cfg = TrainConfig.from_toml(CONFIG, [
        f"train_data_dir={data}", f"output_dir={tmp / 'runs'}", f"output_name={method}",
        f"pretrained_model_name_or_path={model_dir}", f"network_type={method}", f"max_train_steps={steps}",
        f"save_every_n_steps={save_every}", f"save_last_n_checkpoints={steps}", "sample_prompts=[]", *sets])
    result = train(cfg)
    assert result.state == "done" and result.lora_path is not None and result.lora_path.is_file()
    return result


def resume_from(run_dir: Path, step: int, dest: Path) -> Path:
    """Copy the run's config and checkpoint ``step`` to ``dest``, resume there; the final file's path."""
    run = RunDir(run_dir)
    dest.mkdir(parents=True)
    shutil.copy2(run.config_path, dest / "config.toml")
    shutil.copytree(run.checkpoints_dir / f"step-{step}", dest / "checkpoints" / f"step-{step}")
    result = train(resume=dest)
    assert result.state == "done" and result.lora_path is not None
    return result.lora_path


def assert_same_file(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def assert_step_export_is_the_final_file(result: TrainResult) -> Path:
    """`sdlora export RUN --step <last step>` and `sdlora export RUN` write the same tensors and the same
    metadata (but the date) as the file the run ended with, in the run's save precision; returns the
    step export."""
    from safetensors import safe_open

    from sdlora.train import export_run

    def metadata(path: Path) -> dict:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        meta.pop("modelspec.date", None)
        return meta

    exported = export_run(result.run_dir, step=result.step)
    whole = export_run(result.run_dir, out=result.run_dir / "exports" / "whole.safetensors")
    for path in (exported, whole):
        assert_same_file(result.lora_path, path)
        assert metadata(path) == metadata(result.lora_path)
    return exported


def native_preview(run_dir: Path, **kwargs) -> tuple[np.ndarray, object, object]:
    """The trained adapter in its own form (rebuilt from the run's last checkpoint) previewed by
    sdlora; returns (image, previewer, adapter)."""
    from sdlora.generate import Previewer
    from sdlora.train.checkpoint import load_run_adapter

    base, adapter = load_run_adapter(run_dir)
    previewer = Previewer(base)
    previewer.use_adapter(adapter.name)
    return previewer.generate(PROMPT, **{**PREVIEW, **kwargs}), previewer, adapter


def diffusers_image(model_dir: Path, lora: Path | None) -> np.ndarray:
    """A fresh diffusers pipeline, with ``lora`` loaded (failing on any key it cannot place)."""
    pipe = fresh_pipeline(model_dir)
    if lora is not None:
        diffusers_load_checked(pipe, lora)
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(PREVIEW["seed"]), **GEN).images
