"""SDXL base models: shipped configs, the tiny SDXL model, folder and single-file loading and
saving, v-prediction markers, refusal of other families, and the UNet name mapping on the full
SDXL tree."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.models import unet_names
from sdlora.models.loading import ModelLoadError, detect_single_file, list_base_models, load_base, save_single_file
from sdlora.models.shipped import config_dir, meta_models
from sdlora.models.tiny import build_tiny_sdxl_pipeline, save_tiny_model

PROMPT = "a red circle on a blue square"


def _image(pipe, seed: int = 0) -> np.ndarray:
    return pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", family="sdxl")


@pytest.fixture(scope="module")
def reference_image(tiny_sdxl_dir) -> np.ndarray:
    return _image(load_base(tiny_sdxl_dir).pipe)


@pytest.fixture(scope="module")
def sdxl_meta():
    return meta_models("sdxl")


# ----------------------------------------------------------------------------------------------
# Shipped configs
# ----------------------------------------------------------------------------------------------


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shipped_configs_build_the_full_sdxl_tree(sdxl_meta):
    unet, te1, te2 = sdxl_meta["unet"], sdxl_meta["text_encoder"], sdxl_meta["text_encoder_2"]
    assert set(sdxl_meta) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(p.device.type == "meta" for p in unet.parameters())
    # SDXL 1.0 base: 2.567 G UNet parameters, CLIP ViT-L (123 M) and OpenCLIP bigG with projection (695 M).
    assert _count(unet) == 2_567_463_684
    assert _count(te1) == 123_060_480
    assert _count(te2) == 694_659_840
    assert type(te2).__name__ == "CLIPTextModelWithProjection" and te2.text_projection.weight.shape == (1280, 1280)
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 2048
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + te2.config.projection_dim == 2816
    assert unet.add_embedding.linear_1.in_features == 2816
    # Transformer depth per block: 2 layers x [1, 2, 10] blocks in the down path, 10 in the middle.
    assert not hasattr(unet.down_blocks[0], "attentions")
    assert [len(a.transformer_blocks) for a in unet.down_blocks[1].attentions] == [2, 2]
    assert [len(a.transformer_blocks) for a in unet.down_blocks[2].attentions] == [10, 10]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10

    folder = config_dir("sdxl")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "leading"
    assert config_dir("sdxl", "v_prediction") == folder
    with pytest.raises(ValueError, match="no shipped configs"):
        config_dir("sd3")


# ----------------------------------------------------------------------------------------------
# UNet names (diffusers <-> SGM), checked on the full SDXL tree against names kohya writes
# ----------------------------------------------------------------------------------------------

# Module names as kohya sd-scripts writes them into SDXL LoRA files, and the diffusers layer each names.
KOHYA_SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_out_0": "up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_out.0",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_label_emb_0_0": "add_embedding.linear_1",
    "lora_unet_time_embed_2": "time_embedding.linear_2",
    "lora_unet_out_2": "conv_out",
}


def test_unet_names_on_the_full_sdxl_tree(sdxl_meta):
    unet = sdxl_meta["unet"]
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    paths = unet_names.original_module_paths(unet, layers)
    assert set(paths) == set(layers)  # every Linear/Conv2d layer has an original name
    assert len(set(paths.values())) == len(paths)  # and no two share one
    kohya = {"lora_unet_" + original.replace(".", "_"): path for path, original in paths.items()}
    for name, path in KOHYA_SDXL_NAMES.items():
        assert kohya.get(name) == path, name
    # kohya's default SDXL LoRA (the Linear layers of every Transformer2DModel) has 722 UNet modules.
    attention = [p for p in layers if ".attentions." in p and isinstance(unet.get_submodule(p), torch.nn.Linear)]
    assert len(attention) == 722
    # The first down block has no attention, so nothing is named input_blocks.1.1 / 2.1; the last up block neither.
    originals = set(paths.values())
    assert not any(o.startswith(("input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.6.1.")) for o in originals)
    assert all(re.fullmatch(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)[._].*", o) for o in originals)
    # The inverse mapping reads original names back.
    for path, original in paths.items():
        assert unet_names.to_diffusers(original, unet.config) == path


def test_unet_names_agree_with_diffusers_conversion_on_values():
    """Our diffusers -> original UNet keys, read back by diffusers' own original -> diffusers
    conversion, put every tensor where it came from (tiny SDXL: real values, distinct tensors)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_tiny_sdxl_pipeline().unet
    state = unet.state_dict()
    original = unet_names.to_original_state_dict(state, unet.config, "model.diffusion_model.")
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    with pytest.raises(ValueError, match="no place"):
        unet_names.to_original_state_dict({"down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}, unet.config)


# ----------------------------------------------------------------------------------------------
# Tiny SDXL, folders
# ----------------------------------------------------------------------------------------------


def test_tiny_sdxl_loads_and_generates():
    base = load_base("tiny-sdxl")
    assert (base.family, base.resolution, base.prediction_type, base.source) == ("sdxl", 64, "epsilon", "tiny-sdxl")
    assert type(base.pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert base.text_encoders == (base.text_encoder, base.text_encoder_2)
    assert base.tokenizers == (base.tokenizer, base.tokenizer_2)
    unet = base.unet
    assert unet.config.addition_embed_type == "text_time" and unet.config.down_block_types[0] == "DownBlock2D"
    assert unet.config.cross_attention_dim == base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == (
        6 * unet.config.addition_time_embed_dim + base.text_encoder_2.config.projection_dim
    )
    image = _image(base.pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_tokenizers_pad_like_sdxl():
    base = load_base("tiny-sdxl")
    one = base.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    two = base.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert one[:4] == two[:4] == [49406, 320, 2368, 49407]
    assert one[4:] == [49407] * 73  # CLIP ViT-L pads with <|endoftext|>
    assert two[4:] == [0] * 73 and base.tokenizer_2.pad_token == "!"  # OpenCLIP pads with "!"
    assert base.tokenizer.model_max_length == base.tokenizer_2.model_max_length == 77


def test_sd_pipelines_have_no_second_encoder():
    base = load_base("tiny")
    assert base.text_encoder_2 is None and base.tokenizer_2 is None
    assert base.text_encoders == (base.text_encoder,) and base.tokenizers == (base.tokenizer,)


def test_folder_round_trip_and_listing(tiny_sdxl_dir, reference_image, tmp_path):
    assert np.array_equal(reference_image, _image(build_tiny_sdxl_pipeline()))
    # A folder without tokenizers takes both from the package.
    import shutil

    bare = tmp_path / "no-tokenizers"
    shutil.copytree(tiny_sdxl_dir, bare)
    shutil.rmtree(bare / "tokenizer")
    shutil.rmtree(bare / "tokenizer_2")
    base = load_base(bare)
    assert base.tokenizer_2.pad_token == "!" and base.family == "sdxl"
    assert np.array_equal(reference_image, _image(base.pipe))

    entries = {e["name"]: e for e in list_base_models(tmp_path)}
    entry = entries["no-tokenizers"]
    assert (entry["family"], entry["usable"], entry["resolution"]) == ("sdxl", True, 64)
    assert "SDXL" in entry["label"]


def test_hub_id_from_local_cache(tiny_sdxl_dir, reference_image, tmp_path, monkeypatch):
    import shutil

    cache = tmp_path / "hf-cache"
    repo = cache / "models--someone--tiny-sdxl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_sdxl_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base("someone/tiny-sdxl")
    assert (base.source, base.family, base.resolution) == ("someone/tiny-sdxl", "sdxl", 64)
    assert np.array_equal(reference_image, _image(base.pipe))


def test_sdxl_cli_tiny_model(tmp_path):
    from sdlora.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--family", "sdxl"]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index


# ----------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------


def test_single_file_written_by_us_loads_in_diffusers_and_back(tiny_sdxl_dir, reference_image, tmp_path):
    pipe = load_base(tiny_sdxl_dir).pipe
    path = save_single_file(pipe, tmp_path / "tiny-sdxl.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        projection = f.get_slice("conditioner.embedders.1.model.text_projection").get_shape()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "first_stage_model.decoder.conv_out.weight" in keys
    # SGM stores the projection as [width, embed dim] (x @ text_projection); diffusers' Linear is [out, in].
    assert projection == [pipe.text_encoder_2.config.hidden_size, pipe.text_encoder_2.config.projection_dim]
    assert not any(k.startswith(("cond_stage_model.", "text_encoder")) for k in keys)

    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_dir), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert np.array_equal(reference_image, _image(theirs))

    ours = load_base(path)
    assert (ours.family, ours.resolution, ours.prediction_type) == ("sdxl", 64, "epsilon")
    assert np.array_equal(reference_image, _image(ours.pipe))

    ckpt = save_single_file(pipe, tmp_path / "tiny-sdxl.ckpt")  # read back with torch.load(weights_only=True)
    assert np.array_equal(reference_image, _image(load_base(ckpt).pipe))


def _sgm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The tiny SDXL pipeline in SGM single-file layout, converted here by a table written for this
    test (the SDXL 1.0 block layout: 2 layers per block, attention from the second block, written
    out as numbers), independent of sdlora's saver."""
    out: dict[str, torch.Tensor] = {}
    unet_cfg = pipe.unet.config
    assert unet_cfg.layers_per_block == 2 and len(unet_cfg.down_block_types) == 3
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    table = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
        "down_blocks.0.downsamplers.0.conv.": "input_blocks.3.0.op.",
        "down_blocks.1.downsamplers.0.conv.": "input_blocks.6.0.op.",
        "up_blocks.0.upsamplers.0.": "output_blocks.2.2.", "up_blocks.1.upsamplers.0.": "output_blocks.5.2.",
    }
    for j, sgm in ((0, "middle_block.0."), (1, "middle_block.2.")):
        for a, b in resnet:
            table[f"mid_block.resnets.{j}.{a}."] = f"{sgm}{b}."
    for i in range(3):
        for j in range(2):
            for a, b in resnet:
                table[f"down_blocks.{i}.resnets.{j}.{a}."] = f"input_blocks.{3 * i + j + 1}.0.{b}."
            if i > 0:
                table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        for j in range(3):
            for a, b in resnet:
                table[f"up_blocks.{i}.resnets.{j}.{a}."] = f"output_blocks.{3 * i + j}.0.{b}."
            if i < 2:
                table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
    for key, value in pipe.unet.state_dict().items():
        prefix = max((p for p in table if key.startswith(p)), key=len)
        out["model.diffusion_model." + table[prefix] + key[len(prefix):]] = value

    vae_table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    n = len(pipe.vae.config.block_out_channels)
    for part in ("encoder", "decoder"):
        vae_table[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        vae_table[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        vae_table[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        vae_table[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        vae_table[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
        for j in range(3):
            vae_table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            vae_table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    for key, value in pipe.vae.state_dict().items():
        prefix = max((p for p in vae_table if key.startswith(p)), key=len, default="")
        new = vae_table.get(prefix, "") + key[len(prefix):]
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            for a, b in attention.items():
                new = new.replace(".mid.attn_1." + a, ".mid.attn_1." + b)
            if new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value

    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            out["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    te2 = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder_2.state_dict().items()}
    g = "conditioner.embedders.1.model."
    out[g + "token_embedding.weight"] = te2.pop("embeddings.token_embedding.weight")
    out[g + "positional_embedding"] = te2.pop("embeddings.position_embedding.weight")
    out[g + "ln_final.weight"] = te2.pop("final_layer_norm.weight")
    out[g + "ln_final.bias"] = te2.pop("final_layer_norm.bias")
    out[g + "text_projection"] = te2.pop("text_projection.weight").T.contiguous()
    out[g + "logit_scale"] = torch.tensor(math.log(100.0))
    for layer in range(pipe.text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{g}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([te2.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = te2.pop(f"{src}{a}.{kind}")
    te2.pop("embeddings.position_ids", None)
    assert not te2, sorted(te2)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture()
def foreign_file(tiny_sdxl_dir, tmp_path, monkeypatch):
    """A tiny SDXL single file in SGM layout with no sdlora metadata; the tiny folder's configs
    stand in for the shipped SDXL ones (a real file would use those)."""
    import sdlora.models.single_file as single_file

    path = tmp_path / "foreign.safetensors"
    save_file(_sgm_state_dict(load_base(tiny_sdxl_dir).pipe), str(path), metadata={"format": "pt"})
    asked = []

    def config_dir(family, prediction_type):
        asked.append((family, prediction_type))
        return Path(tiny_sdxl_dir)

    monkeypatch.setattr(single_file, "shipped_config_dir", config_dir)
    return path, asked


def test_single_file_from_another_tool_generates_the_same_pixels(foreign_file, reference_image):
    path, asked = foreign_file
    info = detect_single_file(path)
    assert (info["family"], info["prediction_type"], info["resolution"], info["embedded_configs"]) == (
        "sdxl", "epsilon", 1024, False)
    base = load_base(path)
    assert asked == [("sdxl", "epsilon")]
    assert base.family == "sdxl" and base.tokenizer_2.pad_token == "!"
    assert np.array_equal(reference_image, _image(base.pipe))


def _with_tensors(path: Path, extra: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(path))
    state.update(extra)
    out = path.with_name(path.stem + "-marked.safetensors")
    save_file(state, str(out), metadata=metadata)
    return out


def test_v_prediction_markers_and_forcing(foreign_file):
    path, _ = foreign_file
    marked = _with_tensors(path, {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    info = detect_single_file(marked)
    assert info["prediction_type"] == "v_prediction" and "v_pred" in info["notes"] and "zero terminal SNR" in info["notes"]
    base = load_base(marked)
    assert base.prediction_type == "v_prediction"
    assert base.pipe.scheduler.config.prediction_type == "v_prediction"
    assert base.pipe.scheduler.config.rescale_betas_zero_snr is True
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    forced = load_base(marked, prediction_type="epsilon")
    assert forced.prediction_type == "epsilon" and forced.noise_scheduler.config.prediction_type == "epsilon"
    assert load_base(path, prediction_type="v_prediction").prediction_type == "v_prediction"
    spec = _with_tensors(path, {}, metadata={"modelspec.prediction_type": "v"})
    assert detect_single_file(spec)["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------------------------
# Other families are refused by name
# ----------------------------------------------------------------------------------------------

OTHER_FILES = {
    "Stable Diffusion 3": {
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (64,),
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (48, 16),
        "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
    },
    "FLUX": {
        "double_blocks.0.img_attn.norm.key_norm.scale": (8,),
        "single_blocks.0.linear1.weight": (16, 8),
    },
    "Stable Cascade": {"clip_txt_mapper.weight": (16, 8), "down_blocks.0.0.channelwise.0.weight": (8, 8)},
}


@pytest.mark.parametrize("family", sorted(OTHER_FILES))
def test_other_family_files_are_refused_by_name(family, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in OTHER_FILES[family].items()}, str(path))
    with pytest.raises(ModelLoadError, match=re.escape(family)) as e:
        load_base(path)
    assert "other.safetensors" in str(e.value) and "SDXL" in str(e.value)
    with pytest.raises(ModelLoadError, match=re.escape(family)):
        detect_single_file(path)
    listed = list_base_models(tmp_path)
    assert listed[0]["usable"] is False and family in listed[0]["error"]


@pytest.mark.parametrize("cls, family", [
    ("StableDiffusion3Pipeline", "Stable Diffusion 3"),
    ("FluxPipeline", "FLUX"),
    ("StableCascadeCombinedPipeline", "Stable Cascade"),
])
def test_other_family_folders_are_refused_by_name(cls, family, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, "transformer": ["diffusers", "X"]}))
    with pytest.raises(ModelLoadError, match=re.escape(family)):
        load_base(folder)
    assert family in list_base_models(tmp_path)[0]["error"]
