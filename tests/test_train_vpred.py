"""Training on a tiny v-prediction model (as SD 2.x 768-v): the loss falls, the file exports and
loads in a fresh diffusers pipeline, and the preview with it differs from the base model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdlora.models.tiny import save_tiny_model
from sdlora.train.loop import train

from helpers import diffusers_load_checked, fresh_pipeline, make_images, tiny_cfg

PROMPT = "a red square, in tinystyle style"
pytestmark = pytest.mark.slow  # 48 s measured on a busy 2-core machine


@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    out = save_tiny_model(tmp_path_factory.mktemp("vpred") / "model", prediction_type="v_prediction")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    return out


def _image(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_v_prediction_training_learns_and_exports(tmp_path, v_model, single_thread):
    data = make_images(tmp_path / "data")
    events = []
    res = train(tiny_cfg(tmp_path, data, "vpred", "max_train_steps=30", "learning_rate=2e-3", "text_encoder_lr=1e-3",
                         "min_snr_gamma=5", "save_every_n_steps=0", "sample_every_n_steps=0", "sample_prompts=[]",
                         model=v_model), callbacks=[events.append])
    assert res.state == "done" and res.lora_path.is_file()
    losses = [e.loss for e in events if e.type == "step"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])

    base = _image(fresh_pipeline(v_model))
    pipe = fresh_pipeline(v_model)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    diffusers_load_checked(pipe, res.lora_path)
    assert np.abs(_image(pipe) - base).max() > 1e-3
