"""The bundled demo base model: loads with plain diffusers / transformers and draws what it is told."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.demo import metrics
from sdlora.demo.model import DEFAULT_GUIDANCE, RESOLUTION
from sdlora.resources import DEMO_MODEL

MODEL_DIR = DEMO_MODEL


@pytest.fixture(scope="module")
def demo_pipe():
    from diffusers import StableDiffusionPipeline

    assert (MODEL_DIR / "model_index.json").is_file(), (
        f"{MODEL_DIR} is missing; build it with python -m sdlora.demo.train_base --out {MODEL_DIR}")
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_with_plain_diffusers_as_fp32_sd_architecture(demo_pipe):
    from diffusers import DPMSolverMultistepScheduler

    pipe = demo_pipe
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.dtype == torch.float32 for p in part.parameters())
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == RESOLUTION
    names = [n for n, _ in pipe.unet.named_modules()]
    # the module paths LoRA targets in real SD UNets
    for needed in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.resnets.0.conv1",
                   "down_blocks.0.downsamplers.0.conv", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                   "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0", "up_blocks.0.upsamplers.0.conv"):
        assert needed in names, needed
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.safety_checker is None


def test_files_are_small_and_weights_are_fp16_loaded_exactly(demo_pipe):
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    stored = load_file(str(MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    params = dict(demo_pipe.unet.state_dict())
    assert stored.keys() == params.keys()
    for key, value in stored.items():
        assert torch.equal(value.float(), params[key]), key


def test_text_encoder_file_uses_the_standard_prefixed_layout(demo_pipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    path = MODEL_DIR / "text_encoder" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys

    # transformers 5 loads the prefixed file: same outputs as the file's tensors put in by hand
    stored = load_file(str(path))
    config = CLIPTextConfig.from_pretrained(str(MODEL_DIR / "text_encoder"))
    by_hand = CLIPTextModel(config)
    missing, unexpected = by_hand.load_state_dict(
        {k.removeprefix("text_model."): v.float() for k, v in stored.items()}, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    loaded = CLIPTextModel.from_pretrained(str(MODEL_DIR / "text_encoder"))
    ids = demo_pipe.tokenizer(["a red star on a white background", ""], padding="max_length",
                              max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = by_hand.eval()(ids)[0]
        got = loaded.eval()(ids)[0]
        random_init = CLIPTextModel(config).eval()(ids)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(random_init, expected, atol=1e-2)


@pytest.fixture(scope="module")
def heldout_report(demo_pipe):
    # the same 48 images (seeds, steps, guidance) as the model card measure
    return metrics.evaluate_prompt_following(demo_pipe, per_combo=4, steps=20, guidance=DEFAULT_GUIDANCE, seed=1234)


@pytest.mark.slow  # the held-out report samples 48 images with the demo model (about 4 min on a busy 2-core machine)
def test_samples_follow_held_out_prompts_in_colour_and_background(heldout_report):
    assert heldout_report["n"] == 48
    assert heldout_report["color_accuracy"] >= 0.8, heldout_report
    assert heldout_report["background_accuracy"] >= 0.8, heldout_report


@pytest.mark.slow  # shares the held-out report
def test_samples_follow_held_out_prompts_in_shape(heldout_report):
    assert heldout_report["shape_accuracy"] >= 0.7, heldout_report


def test_model_card_and_sample_grid(demo_pipe):
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    for needed in ("python -m sdlora.demo.train_base", "64 x 64", "guidance_scale", "held out"):
        assert needed in card, needed
    from PIL import Image

    with Image.open(MODEL_DIR / "samples.png") as im:
        assert im.width >= 6 * 64
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
