"""Export -> load in a fresh diffusers pipeline -> same images as our preview; import back; inspect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sdlora.generate import Previewer
from sdlora.lora import LoraSpec, inject_adapters, inspect_file, load_lora, save_lora
from sdlora.models.tiny import build_tiny_pipeline

from helpers import GEN, PROMPT, diffusers_load_checked, fresh_pipeline



def tokens(pipe):
    return pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def trained_pipe(spec: LoraSpec, seed: int = 7):
    """Tiny pipeline (same weights as the saved tiny model) with a non-zero adapter."""
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return pipe, adapter


CASES = {
    # text-encoder rank and alpha differ from the UNet's (diffusers reads alphas per component)
    "kohya-attn-mlp": ("kohya", LoraSpec(preset="attn-mlp", rank=4, alpha=2.0, text_encoder=True, text_encoder_rank=2,
                                         text_encoder_alpha=1.0)),
    "diffusers-attn-mlp": ("diffusers", LoraSpec(preset="attn-mlp", rank=4, alpha=2.0, text_encoder=True,
                                                 text_encoder_rank=2, text_encoder_alpha=1.0)),
    "kohya-full": ("kohya", LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)),
    "diffusers-full": ("diffusers", LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_file_loads_in_fresh_diffusers_pipeline_with_identical_result(case, tmp_path, tiny_model_dir):
    fmt, spec = CASES[case]
    pipe, adapter = trained_pipe(spec)
    path = save_lora(adapter, tmp_path / ("style.safetensors" if fmt == "kohya" else "style"), format=fmt, dtype="fp32")
    assert path.is_file() and not list(tmp_path.rglob("*.tmp"))

    previewer = Previewer(pipe)
    previewer.use_adapter("default")
    ours = previewer.generate(PROMPT, seed=11, steps=3, guidance=5.0, scheduler="DDIM", output="np")
    ours_base = previewer.generate(PROMPT, seed=11, steps=3, guidance=5.0, scheduler="DDIM", output="np", scale=0.0)

    fresh = fresh_pipeline(tiny_model_dir)
    ids = tokens(fresh)
    with torch.no_grad():
        base_te = fresh.text_encoder(ids)[0]
    base_image = fresh(PROMPT, generator=torch.Generator("cpu").manual_seed(11), **GEN).images
    assert abs(base_image - ours_base).max() <= 1e-5  # same base weights, same sampler

    diffusers_load_checked(fresh, path)
    theirs = fresh(PROMPT, generator=torch.Generator("cpu").manual_seed(11), **GEN).images
    assert abs(theirs - ours).max() <= 1e-4
    assert abs(theirs - base_image).max() > 1e-2

    # The text-encoder LoRA really acts in diffusers (transformers 5 CLIP without `text_model.`).
    with torch.no_grad():
        their_te = fresh.text_encoder(ids)[0]
        our_te = pipe.text_encoder(ids)[0]
    assert (their_te - base_te).abs().max() > 1e-2
    assert (their_te - our_te).abs().max() <= 1e-5

    # Our own loader reads the file back into a fresh copy of the base model.
    again = build_tiny_pipeline(seed=0)
    loaded, report = load_lora(path, again.unet, again.text_encoder)
    assert report.unknown_keys == [] and report.format == fmt
    exported, reloaded = adapter.export(), loaded.export()
    for comp, p, module in exported.items():
        other = reloaded.component(comp)[p]
        assert torch.equal(module.down, other.down) and torch.equal(module.up, other.up)
        assert module.alpha == pytest.approx(other.alpha)
    assert len(reloaded) == len(exported)
    re_previewer = Previewer(again)
    re_previewer.use_adapter(loaded.name)
    again_image = re_previewer.generate(PROMPT, seed=11, steps=3, guidance=5.0, scheduler="DDIM", output="np")
    assert abs(again_image - ours).max() <= 1e-6

    # inspect shows the right counts and the method.
    info = inspect_file(path)
    layers = list(adapter.layers())
    conv = [lay for _, _, lay in layers if isinstance(lay.base_layer, torch.nn.Conv2d)]
    conv3 = [lay for lay in conv if lay.base_layer.kernel_size != (1, 1)]
    assert info["format"] == fmt and info["method"] == "lora"
    assert info["modules"] == {"unet": sum(1 for _ in adapter.layers("unet")), "text_encoder": sum(1 for _ in adapter.layers("text_encoder"))}
    assert info["layers"] == {"linear": len(layers) - len(conv), "conv2d": len(conv), "conv2d_3x3": len(conv3)}
    assert info["rank"] == 4 and info["alpha"] == 2.0
    if spec.preset == "full":
        assert info["network_type"].startswith("LoCon") and 2 in info["ranks"]
        if fmt == "kohya":
            assert info["network_args"] == {"conv_dim": "2", "conv_alpha": "1"}
    else:
        assert info["network_type"] == "LoRA" and info["layers"]["conv2d_3x3"] == 0
    assert info["metadata"]["sdlora_method"] == "lora"


def test_kohya_names_and_metadata(tmp_path):
    pipe, adapter = trained_pipe(LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True))
    extra = {"ss_steps": 120, "ss_num_train_images": 12, "ss_resolution": "(512, 512)", "ss_tag_frequency": {"img": {"fox": 12}}}
    path = save_lora(adapter, tmp_path / "fox.safetensors", metadata=extra)  # default dtype fp16
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        up = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")
    name_rule = re.compile(
        r"^(lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+"
        r"|lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))"
        r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    assert keys and all(name_rule.match(k) for k in keys), [k for k in keys if not name_rule.match(k)]
    assert len(keys) == 3 * sum(1 for _ in adapter.layers())
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 1.0
    assert down.dtype == torch.float16 and list(down.shape) == [2, 32, 3, 3] and list(up.shape) == [32, 2, 1, 1]
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1"}'
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "120" and meta["ss_num_train_images"] == "12"
    assert meta["ss_tag_frequency"] == '{"img": {"fox": 12}}'
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "fox" and meta["modelspec.prediction_type"] == "epsilon"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", meta["modelspec.date"])
    assert re.match(r"^[0-9a-f]{64}$", meta["sshs_model_hash"]) and len(meta["sshs_legacy_hash"]) == 8
    assert meta["sdlora_preset"] == "full"

    v_path = save_lora(adapter, tmp_path / "v.safetensors", family="sd2", prediction_type="v_prediction")
    v_meta = inspect_file(v_path)["metadata"]
    assert v_meta["ss_base_model_version"] == "sd_v2_v" and v_meta["ss_v2"] == "True"
    assert v_meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_unplaced_keys_are_detected_by_the_check(tmp_path, tiny_model_dir):
    """The diffusers check above would notice a module diffusers drops without a word."""
    from safetensors.torch import load_file, save_file

    pipe, adapter = trained_pipe(LoraSpec(preset="attn", rank=2))
    path = save_lora(adapter, tmp_path / "a.safetensors", dtype="fp32")
    tensors = load_file(str(path))
    bogus = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_zz"
    tensors.update({f"{bogus}.lora_down.weight": torch.ones(2, 32), f"{bogus}.lora_up.weight": torch.ones(32, 2),
                    f"{bogus}.alpha": torch.tensor(2.0)})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(AssertionError):
        diffusers_load_checked(fresh_pipeline(tiny_model_dir), bad)
    # Our loader reports the key instead of dropping it silently.
    from sdlora.lora import LoraFileError, UnknownKeysWarning

    again = build_tiny_pipeline(seed=0)
    with pytest.warns(UnknownKeysWarning, match="to_zz"):
        _, report = load_lora(bad, again.unet, None)
    assert sorted(report.unknown_keys) == sorted(k for k in tensors if k.startswith(bogus))
    with pytest.raises(LoraFileError, match="match no layer"):
        load_lora(bad, build_tiny_pipeline(seed=0).unet, None, strict=True)
