"""SDXL training on the tiny SDXL model: conditioning, time ids, both text encoders, export, fresh diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.resources import CONFIGS_DIR
from sdlora.train import TrainConfig, train
from sdlora.train.conditioning import Conditioner, time_ids

from helpers import resume_from_copy

CONFIG = CONFIGS_DIR / "tiny.toml"
PROMPT = "a red square, in sdxlstyle style"


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from sdlora.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl", family="sdxl")


def _images(folder: Path) -> Path:
    """Two wide and two tall images (so buckets resize and crop), captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (size, colour) in enumerate([((100, 60), "red"), ((96, 64), "blue"), ((60, 100), "green"),
                                        ((64, 90), "yellow")]):
        img = Image.new("RGB", size, "white")
        img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} square")
    return folder


def _cfg(tmp_path: Path, model: Path, name: str, *sets: str) -> TrainConfig:
    data = tmp_path / "data"
    if not data.is_dir():
        _images(data)
    return TrainConfig.from_toml(CONFIG, [
        f"train_data_dir={data}", f"output_dir={tmp_path / 'runs'}", f"output_name={name}",
        f"pretrained_model_name_or_path={model}", "trigger_word=sdxlstyle", "train_batch_size=1",
        "resolution=96", "min_bucket_reso=64", "max_bucket_reso=128", "bucket_reso_steps=32",
        "max_train_steps=6", "save_every_n_steps=3", "sample_prompts=[]", *sets])


def test_text_conditioning_equals_the_sdxl_pipeline_encoding():
    """Both encoders' penultimate hidden states side by side and encoder 2's pooled projection: what
    diffusers' StableDiffusionXLPipeline.encode_prompt gives the UNet at inference."""
    from sdlora.models.loading import load_base

    base = load_base("tiny-sdxl")
    captions = ["a red square, in sdxlstyle style", ""]
    with torch.no_grad():
        ours = Conditioner(base).encode(captions)
        theirs, _, pooled, _ = base.pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
    width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    assert ours.hidden.shape == (2, 77, width) == theirs.shape
    assert torch.equal(ours.hidden, theirs)
    assert ours.pooled is not None and torch.equal(ours.pooled, pooled)
    assert not torch.equal(ours.hidden[0], ours.hidden[1])


def test_time_ids_are_what_the_data_pipeline_did(tmp_path, tiny_sdxl_dir):
    """Each sample's time ids: its original size, the crop top-left of the bucket window in the resized
    image, and the bucket size, all (h, w) / (top, left), as kohya computes them."""
    from accelerate import Accelerator

    from sdlora.models.loading import load_base
    from sdlora.train import batches
    from sdlora.data.sampler import SampleKey
    from sdlora.train.events import EventLog

    cfg = _cfg(tmp_path, tiny_sdxl_dir, "ids", "train_text_encoder=false", "flip_aug=true")
    base = load_base(str(tiny_sdxl_dir))
    data = batches.build(cfg, base, [], Accelerator(cpu=True), EventLog(None), tmp_path)
    seen = set()
    for _ in range(12):
        batch = data.next_batch()
        epoch, position = batch.position
        index = data.sampler.epoch_batches(epoch)[position][0]
        plan = data.dataset.plan(SampleKey(index, epoch, position))
        w, h = plan.crop.original
        top, left = plan.crop.crop_top_left
        bw, bh = plan.crop.bucket
        assert batch.time_ids.tolist() == [[h, w, top, left, bh, bw]]
        factor = base.pipe.vae_scale_factor
        assert tuple(batch.latents.shape[2:]) == (bh // factor, bw // factor)
        seen.add((h, w, top, left, bh, bw))
    # wide and tall images were cropped differently: more than one kind of conditioning was seen
    assert len({(r[0], r[1]) for r in seen}) > 1
    assert any(r[2] or r[3] for r in seen)  # some crop is off the corner


def test_sdxl_training_exports_a_file_fresh_diffusers_loads(tmp_path, tiny_sdxl_dir):
    """Train both text encoders and the UNet; the kohya file has SGM UNet names and te1/te2 names, and a
    fresh diffusers StableDiffusionXLPipeline with it draws the preview sdlora draws at scale 1."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from sdlora.generate import Previewer
    from sdlora.lora import inspect_file

    cfg = _cfg(tmp_path, tiny_sdxl_dir, "xl", "train_text_encoder=true", "network_preset=full",
               "learning_rate=5e-3", "text_encoder_lr=1e-3", "text_encoder_2_lr=2e-3")
    result = train(cfg)
    assert result.state == "done" and result.lora_path.is_file()
    with safe_open(str(result.lora_path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    modules = {k.split(".", 1)[0] for k in keys}
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
    assert any(m.startswith("lora_unet_output_blocks_") for m in modules)
    assert not any(m.startswith("lora_unet_down_blocks_") for m in modules)
    assert meta["ss_base_model_version"].startswith("sdxl")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert inspect_file(result.lora_path)["base_family"] == "sdxl"

    gen = dict(steps=4, guidance=5.0, seed=3, scheduler="Euler", output="np")
    previewer = Previewer(str(tiny_sdxl_dir))
    base_img = previewer.generate(PROMPT, scale=0.0, **gen)
    previewer.load_lora(result.lora_path)
    ours = previewer.generate(PROMPT, scale=1.0, **gen)
    assert np.abs(ours - base_img).max() > 1e-2  # the LoRA changes the picture

    from diffusers import EulerDiscreteScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.lora_path))
    theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                  output_type="np").images
    assert np.abs(theirs - ours).max() <= 2e-3


def test_sdxl_frozen_encoders_use_the_cache_and_resume_exactly(tmp_path, tiny_sdxl_dir):
    """Frozen text encoders: their outputs (hidden + pooled) come from the cache; a run stopped at a
    checkpoint and resumed ends with the same file as one that ran straight through."""
    from safetensors.torch import load_file

    straight = train(_cfg(tmp_path, tiny_sdxl_dir, "straight", "train_text_encoder=false"))
    events = [e for e in straight.run_dir.joinpath("events.jsonl").read_text().splitlines() if "cached training images" in e]
    assert events and "captions encoded" in events[0] and "latents encoded" in events[0]

    resumed = resume_from_copy(straight.run_dir, 3, tmp_path / "resumed")
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_ids_helper_rejects_bad_shapes():
    assert time_ids([(60, 100)], [(0, 18)], [(64, 64)]).tolist() == [[60.0, 100.0, 0.0, 18.0, 64.0, 64.0]]
    with pytest.raises(ValueError, match="time ids"):
        time_ids([(60,)], [(0, 18)], [(64, 64)])
