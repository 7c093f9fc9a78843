"""sdlora merge-into: LoRAs baked into a base model give the images the unmerged LoRAs give, and the
written model loads in sdlora and in diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.generate import Previewer
from sdlora.lora import LoraSpec, save_lora
from sdlora.models.loading import load_base
from sdlora.models.tiny import save_tiny_model
from sdlora.tools import ToolError, merge_into

from tools_helpers import random_weights

PROMPT = "a red circle on a blue square"


def _models(base):
    return {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}


def _image(pipe_or_base, loras=(), size=32):
    prev = Previewer(pipe_or_base)
    if loras:
        prev.set_loras(loras)
    return prev.generate(PROMPT, seed=3, steps=2, width=size, height=size, guidance=5.0, scheduler="ddim", output="np")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_model_dir):
    """Three LoRA files on the tiny SD 1.x model: kohya LoCon with text encoder (rank 4, conv rank 2,
    alphas that differ), diffusers attention-only (rank 3), kohya DoRA (rank 2)."""
    folder = tmp_path_factory.mktemp("merge-sd1")
    base = load_base(tiny_model_dir)
    models = _models(base)
    a = random_weights(models, LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                                        text_encoder=True), seed=1)
    b = random_weights(models, LoraSpec(preset="attn", rank=3, alpha=3.0, text_encoder=True), seed=2)
    d = random_weights(models, LoraSpec(preset="attn", rank=2, alpha=1.0), seed=3, dora=True)
    files = {
        "a": save_lora(a, folder / "a.safetensors", family="sd1", dtype="fp32"),
        "b": save_lora(b, folder / "b", format="diffusers", dtype="fp32"),
        "d": save_lora(d, folder / "d.safetensors", family="sd1", dtype="fp32"),
    }
    loras = [(files["a"], 0.8), (files["b"], -0.5), (files["d"], 0.7)]
    return {"dir": tiny_model_dir, "folder": folder, "files": files, "loras": loras,
            "reference": _image(base, loras), "base_image": _image(base)}


def test_merged_single_file_generates_what_the_unmerged_loras_do(sd1):
    out = sd1["folder"] / "merged.safetensors"
    items = [f"{p}:{w}" for p, w in sd1["loras"]]
    report = merge_into(sd1["dir"], items, out, dtype="fp32")
    assert report.out == out and out.is_file() and not list(out.parent.glob(".*tmp"))
    # every adapted layer of the three files is changed once: a's UNet+TE layers cover b's and d's
    a_layers = len(load_file(sd1["files"]["a"])) // 3
    assert report.values["layers"] == a_layers and "3 LoRA(s)" in report.summary
    assert len(report.rows) == a_layers and all(r[3] > 0 for r in report.rows)

    assert np.abs(sd1["reference"] - sd1["base_image"]).max() > 0.05  # the LoRAs change the picture
    merged = load_base(out)
    assert merged.family == "sd1"
    image = _image(merged)
    assert np.abs(image - sd1["reference"]).max() < 2e-4

    # diffusers reads the file with the model's configs and gets the same weights
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_single_file(str(out), config=str(sd1["dir"]), local_files_only=True)
    for part in ("unet", "text_encoder", "vae"):
        ours_sd, theirs_sd = getattr(merged.pipe, part).state_dict(), getattr(theirs, part).state_dict()
        assert set(ours_sd) <= set(theirs_sd) | {k for k in ours_sd if k.endswith("position_ids")}
        for key, value in ours_sd.items():
            if key in theirs_sd:
                assert torch.equal(value, theirs_sd[key]), (part, key)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in set(f.keys())
    assert "a.safetensors" in meta["sdlora_merged_loras"] and meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_diffusers_folder_output_fp16(sd1):
    out = sd1["folder"] / "merged-folder"
    merge_into(sd1["dir"], sd1["loras"], out, format="diffusers")  # default dtype fp16
    te = load_file(out / "text_encoder" / "model.safetensors")
    assert te and all(k.startswith("text_model.") for k in te)  # the key layout transformers 4.x and kohya read
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.float16}
    assert not list(out.parent.glob(f".{out.name}*"))
    folder = load_base(out)
    single = load_base(sd1["folder"] / "merged.safetensors") if (sd1["folder"] / "merged.safetensors").exists() else None
    image = _image(folder)
    assert np.abs(image - sd1["reference"]).max() < 0.02  # fp16 weights
    if single is not None:
        for key, value in single.unet.state_dict().items():
            assert torch.equal(folder.unet.state_dict()[key], value.half().float()), key


def test_unknown_keys_are_an_error_unless_skipped(sd1, tmp_path):
    tensors = load_file(sd1["files"]["a"])
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    tensors["lora_unet_no_such_layer.alpha"] = torch.tensor(2.0)
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    with pytest.raises(ToolError, match=r"3 key\(s\) match no layer.*lora_unet_no_such_layer"):
        merge_into(sd1["dir"], [f"{odd}:1"], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    report = merge_into(sd1["dir"], [f"{odd}:1"], tmp_path / "x.safetensors", allow_unknown=True)
    assert "3 key(s) matched no layer" in report.summary and (tmp_path / "x.safetensors").is_file()


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("merge-sdxl") / "model", family="sdxl")


def test_sdxl_merge_both_text_encoders(tiny_sdxl_dir, tmp_path):
    base = load_base(tiny_sdxl_dir)
    weights = random_weights(_models(base), LoraSpec(preset="full", rank=4, alpha=2.0, text_encoder=True), seed=5)
    assert weights.text_encoder_2 and weights.text_encoder
    lora = save_lora(weights, tmp_path / "xl.safetensors", family="sdxl", dtype="fp32")
    assert any(k.startswith("lora_te2_") for k in load_file(lora))
    reference = _image(base, [(lora, 0.9)], size=64)
    assert np.abs(reference - _image(base, size=64)).max() > 0.05

    out = tmp_path / "merged-xl.safetensors"
    report = merge_into(tiny_sdxl_dir, [(lora, 0.9)], out, dtype="fp32")
    assert "text encoder 2" in report.summary and report.values["family"] == "sdxl"
    merged = load_base(out)
    assert merged.family == "sdxl"
    assert np.abs(_image(merged, size=64) - reference).max() < 2e-4

    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl_dir), local_files_only=True)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        theirs_sd = getattr(theirs, part).state_dict()
        for key, value in getattr(merged.pipe, part).state_dict().items():
            if key in theirs_sd:
                assert torch.equal(value, theirs_sd[key]), (part, key)


def test_cli_merge_into(sd1, tmp_path, capsys):
    a = sd1["files"]["a"]
    out = tmp_path / "cli.safetensors"
    assert main(["merge-into", str(sd1["dir"]), "--lora", f"{a}:0.8", "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and str(out) in printed and "merged 1 LoRA(s)" in printed
    # inspect says what the written file is: a model checkpoint, with the LoRA merged into it.
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "SD 1.x model checkpoint (not a LoRA)" in shown and f"{a.name} x0.8" in shown, shown
    # An embedding file, and a file that is none of LoRA / embedding / checkpoint.
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "emb.safetensors"))
    assert main(["inspect", str(tmp_path / "emb.safetensors")]) == 0
    assert "embedding (2 vector(s), 768 + 1280 wide; SDXL" in capsys.readouterr().out
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    assert main(["inspect", str(tmp_path / "unet.safetensors")]) == 1
    assert "not a LoRA, embedding or Stable Diffusion checkpoint" in capsys.readouterr().err

    assert main(["merge-into", str(sd1["dir"]), "--lora", f"{a}:strong", "--out", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "'strong' is not a weight" in err and len(err.splitlines()) == 1
    assert main(["merge-into", str(sd1["dir"]), "--lora", str(tmp_path / "missing.safetensors"), "--out",
                 str(tmp_path / "y.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["merge-into", str(sd1["dir"]), "--lora", str(out), "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "not a LoRA" in capsys.readouterr().err  # a model is not a LoRA
    assert not (tmp_path / "y.safetensors").exists()
