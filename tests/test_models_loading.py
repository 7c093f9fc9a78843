"""load_base for diffusers folders, hub ids, the tiny and demo models; list_base_models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdlora.models.loading as loading
from sdlora.models.loading import BaseModel, ModelLoadError, list_base_models, load_base, save_single_file


def test_diffusers_folder(tiny_model_dir):
    from diffusers import DDPMScheduler

    from sdlora.models.tiny import build_tiny_pipeline

    base = load_base(tiny_model_dir)
    assert isinstance(base, BaseModel)
    assert (base.family, base.prediction_type, base.resolution) == ("sd1", "epsilon", 32)
    assert base.source == str(tiny_model_dir)
    assert base.unet is base.pipe.unet and base.tokenizer is base.pipe.tokenizer
    ref = build_tiny_pipeline(seed=0)  # what the fixture saved
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(base, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    sched = base.noise_scheduler
    assert isinstance(sched, DDPMScheduler) and sched is base.noise_scheduler
    assert sched.config.prediction_type == "epsilon" and sched.config.clip_sample is False
    assert sched.config.beta_schedule == base.pipe.scheduler.config.beta_schedule


def test_tiny_and_prediction_override():
    base = load_base("tiny", prediction_type="v_prediction")
    assert (base.family, base.source, base.prediction_type) == ("sd1", "tiny", "v_prediction")
    assert base.pipe.scheduler.config.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    half = load_base("tiny", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
    with pytest.raises(ModelLoadError, match="prediction_type"):
        load_base("tiny", prediction_type="sample")


def test_hub_id_from_local_cache(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id resolves through the HF cache layout (refs/main -> snapshots/<commit>/) offline."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base("someone/tiny-sd")
    assert (base.source, base.family, base.resolution) == ("someone/tiny-sd", "sd1", 32)
    ref = load_base(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(ref.unet.state_dict().values(), base.unet.state_dict().values()))


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_base("someone/some-sd-model")
    msg = str(e.value)
    assert "'someone/some-sd-model'" in msg
    assert str(cache) in msg  # where to put it
    assert "hf download someone/some-sd-model" in msg  # what to download
    assert "models--someone--some-sd-model" in msg


def test_demo_model(monkeypatch, tmp_path):
    if (loading.DEFAULT_BASE / "model_index.json").is_file():
        for spec in (None, "demo"):
            base = load_base(spec)
            assert base.source == str(loading.DEFAULT_BASE) and base.family in ("sd1", "sd2")
    monkeypatch.setattr(loading, "DEFAULT_BASE", tmp_path / "demo-model")
    with pytest.raises(ModelLoadError, match="demo model is missing") as e:
        load_base()
    assert str(tmp_path / "demo-model") in str(e.value)


def test_bad_specs(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_base(str(tmp_path / "models" / "missing.ckpt"))
    with pytest.raises(ModelLoadError, match="nor a Hugging Face model id"):
        load_base("not a model!")
    with pytest.raises(ModelLoadError, match="No base model given"):
        load_base("  ")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no readable model_index.json"):
        load_base(empty)


def test_sdxl_folder_without_part_configs_is_incomplete(tmp_path):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }))
    with pytest.raises(ModelLoadError, match="lacks unet/, vae/, text_encoder/ or text_encoder_2/ configs"):
        load_base(folder)


def test_incomplete_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="Could not load the diffusers folder") as e:
        load_base(folder)
    assert str(folder) in str(e.value)


def test_list_base_models(tiny_pipe, tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_model_dir, models / "tiny-folder")
    save_single_file(tiny_pipe, models / "tiny.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(models / "a-lora.safetensors"))
    (models / "readme.txt").write_text("not a model")
    (models / "other-folder").mkdir()

    found = {e["name"]: e for e in list_base_models(models)}
    assert set(found) == {"tiny-folder", "tiny.safetensors", "a-lora.safetensors"}
    folder, single, lora = found["tiny-folder"], found["tiny.safetensors"], found["a-lora.safetensors"]
    assert (folder["kind"], folder["family"], folder["resolution"], folder["usable"]) == ("diffusers", "sd1", 32, True)
    assert (single["kind"], single["family"], single["prediction_type"], single["usable"]) == ("safetensors", "sd1", "epsilon", True)
    assert single["size_bytes"] == (models / "tiny.safetensors").stat().st_size
    assert lora["usable"] is False and "LoRA" in lora["error"]
    # Every usable entry really loads.
    for entry in found.values():
        if entry["usable"]:
            assert load_base(entry["path"]).family == entry["family"]
    assert list_base_models(tmp_path / "no-such-dir") == []


def test_shipped_configs_are_complete():
    """The shipped folders are valid diffusers config folders for every component."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sdlora.models.single_file import CONFIGS_DIR, scheduler_from_config

    expected = {"sd1": (768, "epsilon", 512), "sd2": (1024, "epsilon", 512), "sd2_v": (1024, "v_prediction", 768)}
    for name, (width, prediction, resolution) in expected.items():
        folder = Path(CONFIGS_DIR / name)
        assert DiffusionPipeline.load_config(str(folder))["_class_name"] == "StableDiffusionPipeline"
        unet = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
        vae = AutoencoderKL.load_config(str(folder), subfolder="vae")
        text = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder")
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert unet["cross_attention_dim"] == text.hidden_size == width
        assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == resolution
        assert scheduler_from_config(sched).config.prediction_type == prediction
