"""Single-file checkpoints: our diffusers -> original converter, loading back, detection, bad files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.models.loading import ModelLoadError, detect_single_file, load_base, save_single_file
from sdlora.models.single_file import (
    CONFIGS_DIR,
    META_CONFIGS,
    family_tokenizer,
    to_original_state_dict,
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _image(pipe, seed: int = 0):
    return pipe(
        "a red circle on a blue square",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), f"{what}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


def _assert_same_outputs(ref, loaded) -> None:
    """UNet, VAE and text encoder give identical outputs, and so does a whole generation."""
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(ref, name), getattr(loaded, name), name)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    ids = ref.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, loaded.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    with torch.no_grad():
        h_ref = ref.text_encoder(ids)[0]
        h_new = loaded.text_encoder(ids)[0]
        assert torch.equal(h_ref, h_new)
        t = torch.tensor([500])
        assert torch.equal(ref.unet(latents, t, h_ref).sample, loaded.unet(latents, t, h_new).sample)
        assert torch.equal(ref.vae.decode(latents).sample, loaded.vae.decode(latents).sample)
    img_ref, img_new = _image(ref), _image(loaded)
    assert img_ref.std() > 0  # a real picture, not a constant
    assert (img_ref == img_new).all()


def _tiny_sd2_pipe(seed: int = 1):
    """A tiny model with the SD 2.x features: OpenCLIP-style GELU text encoder, linear attention
    projections, per-block head counts, v-prediction and the "!" pad token."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdlora.models.tiny import tiny_text_config, tiny_unet_config, tiny_vae_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**tiny_unet_config(), "use_linear_projection": True, "attention_head_dim": (2, 4)})
    vae = AutoencoderKL(**tiny_vae_config())
    text_config = tiny_text_config()
    text_config.hidden_act = "gelu"
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=family_tokenizer("sd2"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    obj = torch.load(path, weights_only=True, map_location="cpu")
    return {k: tuple(v.shape) for k, v in obj["state_dict"].items()}


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_sd1_roundtrip_identical(tiny_pipe, tmp_path, suffix):
    path = save_single_file(tiny_pipe, tmp_path / f"model{suffix}")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    keys = _file_keys(path)
    # The SD 1.x layout other tools read: the CLIP text model under cond_stage_model.transformer.text_model.
    te_keys = [k for k in keys if k.startswith("cond_stage_model.")]
    assert te_keys and all(k.startswith("cond_stage_model.transformer.text_model.") for k in te_keys)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"][2:] == (1, 1)
    assert "v_pred" not in keys

    base = load_base(path)
    assert (base.family, base.prediction_type, base.resolution, base.source) == ("sd1", "epsilon", 32, str(path))
    assert base.tokenizer.pad_token == "<|endoftext|>"
    _assert_same_outputs(tiny_pipe, base.pipe)


def test_tiny_sd2_v_roundtrip_identical(tmp_path):
    pipe = _tiny_sd2_pipe()
    path = save_single_file(pipe, tmp_path / "sd2v.safetensors")
    keys = _file_keys(path)
    hidden = pipe.text_encoder.config.hidden_size
    # OpenCLIP layout with fused q/k/v, as SD 2.x files store the text encoder.
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3 * hidden, hidden)
    assert keys["cond_stage_model.model.positional_embedding"] == (77, hidden)
    assert "cond_stage_model.model.text_projection" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert "v_pred" in keys
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"

    info = detect_single_file(path)
    assert (info["family"], info["prediction_type"], info["supported"]) == ("sd2", "v_prediction", True)
    base = load_base(path)
    assert (base.family, base.prediction_type) == ("sd2", "v_prediction")
    assert base.tokenizer.pad_token == "!" and base.tokenizer.pad_token_id == 0
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_same_outputs(pipe, base.pipe)


def test_save_half_precision_and_metadata(tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "half.safetensors", dtype=torch.float16, metadata={"note": "hello"})
    tensors = load_file(str(path))
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["note"] == "hello" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert json.loads(meta[META_CONFIGS])["unet"]["block_out_channels"] == [32, 64]

    base = load_base(path)  # loads as float32 by default
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(tiny_pipe, name).state_dict()
        for k, v in getattr(base.pipe, name).state_dict().items():
            assert v.dtype == torch.float32
            assert torch.equal(v, ref[k].half().float()), f"{name}.{k}"
    with pytest.raises(ValueError, match="strings"):
        save_single_file(tiny_pipe, tmp_path / "bad.safetensors", metadata={"steps": 3})
    with pytest.raises(ValueError, match=r"\.safetensors or \.ckpt"):
        save_single_file(tiny_pipe, tmp_path / "model.bin")


def test_original_lightning_ckpt_loads_without_lightning(tiny_pipe, tmp_path, monkeypatch):
    """The original SD releases name a Lightning callback class inside the .ckpt; that must not
    stop weights_only loading (nor import anything)."""
    plain = save_single_file(tiny_pipe, tmp_path / "plain.ckpt")
    content = torch.load(plain, weights_only=True, map_location="cpu")

    fake = {name: types.ModuleType(name) for name in
            ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    fake["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    original = {
        "epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2",
        "callbacks": {ModelCheckpoint: {"best_model_score": None, "best_model_path": ""}},
        "state_dict": content["state_dict"], "sdlora_metadata": content["sdlora_metadata"],
    }
    path = tmp_path / "original.ckpt"
    torch.save(original, path)
    for name in fake:
        monkeypatch.delitem(sys.modules, name)

    base = load_base(path)
    assert "pytorch_lightning" not in sys.modules
    _assert_same_weights(tiny_pipe.unet, base.unet, "unet")


def test_old_clip_layout_without_text_model_level(tiny_pipe, tmp_path):
    """Early SD 1.x files store cond_stage_model.transformer.<...> without text_model.; they load too."""
    path = save_single_file(tiny_pipe, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in tensors.items()}
    old_path = tmp_path / "old.safetensors"
    save_file(old, str(old_path), metadata=meta)
    _assert_same_weights(tiny_pipe.text_encoder, load_base(old_path).text_encoder, "text_encoder")


# ----------------------------------------------------------------------------------------------
# the saved layout is the real SD layout (SD 1.5 / SD 2.x sizes, built on the meta device)
# ----------------------------------------------------------------------------------------------


def _meta_models(folder: Path):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder"))
    assert next(unet.parameters()).device.type == "meta"
    return unet, vae, text_encoder


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("family,folder", [("sd1", "sd1"), ("sd2", "sd2_v")])
def test_original_layout_matches_diffusers_single_file_mapping(family, folder):
    """Our converter's keys/shapes, converted back by diffusers' own single-file code, give exactly
    the diffusers model's keys/shapes: the file has the key set diffusers expects of a real file."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, vae, text_encoder = _meta_models(CONFIGS_DIR / folder)
    original = to_original_state_dict(unet, vae, text_encoder, family)
    assert _shapes(convert_ldm_unet_checkpoint(original, unet.config)) == _shapes(unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(original, vae.config)) == _shapes(vae.state_dict())
    if family == "sd1":
        te = convert_ldm_clip_checkpoint(original)
    else:
        te = convert_open_clip_checkpoint(text_encoder, original, prefix="cond_stage_model.model.")
    te = {k.removeprefix("text_model."): v for k, v in te.items()}
    assert _shapes(te) == _shapes(text_encoder.state_dict())
    # Nothing in the file that diffusers' mapping does not account for, beyond the unused
    # OpenCLIP extras (layer 23, text_projection, logit_scale) of SD 2.x.
    unet_keys = [k for k in original if k.startswith("model.diffusion_model.")]
    vae_keys = [k for k in original if k.startswith("first_stage_model.")]
    assert len(unet_keys) == len(unet.state_dict()) == 686
    assert len(vae_keys) == len(vae.state_dict()) == 248


# Key names and shapes as they appear in the released v1-5-pruned-emaonly checkpoint.
SD15_ANCHORS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
SD2_ANCHORS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.text_projection": (1024, 1024),
    "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.ln_final.weight": (1024,),
}


@pytest.mark.parametrize("family,folder,anchors", [("sd1", "sd1", SD15_ANCHORS), ("sd2", "sd2_v", SD2_ANCHORS)])
def test_original_layout_has_released_key_names(family, folder, anchors):
    original = _shapes(to_original_state_dict(*_meta_models(CONFIGS_DIR / folder), family))
    for key, shape in anchors.items():
        assert original.get(key) == shape, key


# ----------------------------------------------------------------------------------------------
# detection and files that must be refused cleanly
# ----------------------------------------------------------------------------------------------


def _fake_sd2(path: Path, spread: float) -> Path:
    """Just the keys detection looks at, with SD 2.x names and shapes."""
    bias = torch.linspace(-spread, spread, 1280)
    save_file({
        "cond_stage_model.model.ln_final.weight": torch.ones(1024),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": bias,
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 128, 3, 3),
    }, str(path))
    return path


def test_detect_sd2_prediction_type_from_weights(tmp_path):
    v = detect_single_file(_fake_sd2(tmp_path / "v.safetensors", spread=0.5))
    eps = detect_single_file(_fake_sd2(tmp_path / "eps.safetensors", spread=0.05))
    assert (v["family"], v["prediction_type"], v["resolution"]) == ("sd2", "v_prediction", 768)
    assert (eps["family"], eps["prediction_type"], eps["resolution"]) == ("sd2", "epsilon", 512)
    assert "guessed" in v["notes"] and v["embedded_configs"] is False


def test_real_layout_without_stored_configs_uses_shipped_configs(tiny_pipe, tmp_path):
    """Without stored configs a file is taken as a real SD 1.x checkpoint; the tiny weights do not
    fit SD 1.5's shapes, which must give a clear error, not a crash or a half-loaded model."""
    path = save_single_file(tiny_pipe, tmp_path / "with.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # same tensors, no metadata
    info = detect_single_file(bare)
    assert (info["family"], info["prediction_type"], info["embedded_configs"]) == ("sd1", "epsilon", False)
    with pytest.raises(ModelLoadError, match=r"do not fit the SD 1\.x architecture"):
        load_base(bare)


def test_file_without_stored_configs_loads_from_config_folder(tiny_pipe, tiny_model_dir, tmp_path, monkeypatch):
    """The path real files take (no configs in the file: family from the keys, configs from a
    folder) end to end, with the tiny model's config folder standing in for the shipped SD 1.x one
    so that no multi-gigabyte file is needed."""
    import sdlora.models.single_file as single_file

    path = save_single_file(tiny_pipe, tmp_path / "with.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))
    asked = []

    def config_dir(family, prediction_type):
        asked.append((family, prediction_type))
        return Path(tiny_model_dir)

    monkeypatch.setattr(single_file, "shipped_config_dir", config_dir)
    base = load_base(bare)
    assert asked == [("sd1", "epsilon")]
    assert "stored in the file" not in base.notes
    _assert_same_outputs(tiny_pipe, base.pipe)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_base(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="not found"):
        detect_single_file(tmp_path / "nope.ckpt")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors") as e:
        load_base(path)
    assert str(path) in str(e.value)
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"\.safetensors or \.ckpt"):
        load_base(other)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tiny_pipe, tmp_path, suffix):
    full = save_single_file(tiny_pipe, tmp_path / f"full{suffix}")
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated") as e:
        load_base(cut)
    assert str(cut) in str(e.value)


def test_lora_file_is_not_a_base_model(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, str(path))
    with pytest.raises(ModelLoadError, match="LoRA file"):
        load_base(path)


def _leave_marker(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class _Payload:
    """Unpickling this calls _leave_marker: what a malicious .ckpt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def test_ckpt_with_pickled_code_is_refused_not_run(tiny_pipe, tmp_path):
    marker = tmp_path / "marker.txt"
    good = torch.load(save_single_file(tiny_pipe, tmp_path / "good.ckpt"), weights_only=True)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": good["state_dict"], "extra": _Payload(marker)}, path)

    with pytest.raises(ModelLoadError, match="Refused") as e:
        load_base(path)
    assert "_leave_marker" in str(e.value) and ".safetensors" in str(e.value)
    with pytest.raises(ModelLoadError, match="Refused"):
        detect_single_file(path)
    assert not marker.exists()
    # The file really does run code when unpickled without weights_only: the refusal mattered.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"
