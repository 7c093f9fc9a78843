"""Exported names on the real SD 1.5 architecture (UNet + CLIP ViT-L text encoder, meta device)."""

from __future__ import annotations

import re

import pytest
import torch

from sdlora.lora import LoraShapeMismatchError, LoraSpec, LoraWeights, ModuleLora, match_to_model, plan_targets
from sdlora.lora.formats import LoraFile, kohya

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# openai/clip-vit-large-patch14 text model, as in SD 1.5's text_encoder/config.json
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def sd15():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    assert unet.conv_in.weight.device.type == "meta"
    return unet, text_encoder


def _weights_for(unet, text_encoder, spec: LoraSpec) -> LoraWeights:
    """Small real tensors of the shapes the plan gives each layer."""
    weights = LoraWeights(info={"preset": spec.preset})
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for t in plan_targets(model, component, spec).modules:
            down_shape = (t.rank, t.in_features, *t.kernel_size) if t.kind == "conv" else (t.rank, t.in_features)
            up_shape = (t.out_features, t.rank, 1, 1) if t.kind == "conv" else (t.out_features, t.rank)
            weights.component(component)[t.canonical] = ModuleLora(torch.zeros(down_shape), torch.zeros(up_shape), t.alpha)
    return weights


def _reference_names(unet, text_encoder) -> dict[str, torch.nn.Module]:
    """kohya-style module names built here from the module tree (``text_model_`` included)."""
    names: dict[str, torch.nn.Module] = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names["lora_unet_" + path.replace(".", "_")] = module
    for path, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            full = path if path.startswith("text_model.") else "text_model." + path
            names["lora_te_" + full.replace(".", "_")] = module
    return names


# kohya's own module counts for SD 1.5: LoRA 192 UNet + 72 text encoder; LoCon (conv_dim) 278 UNet.
@pytest.mark.parametrize("preset,n_unet,n_te", [("attn", 128, 48), ("attn-mlp", 192, 72), ("full", 278, 72)])
def test_every_exported_key_maps_to_a_real_sd15_module(sd15, preset, n_unet, n_te):
    unet, text_encoder = sd15
    spec = LoraSpec(preset=preset, rank=8, alpha=4.0, conv_rank=4, conv_alpha=2.0, text_encoder=True)
    weights = _weights_for(unet, text_encoder, spec)
    tensors = kohya.to_state_dict(weights, torch.float16)
    reference = _reference_names(unet, text_encoder)
    modules = {}
    for key, tensor in tensors.items():
        name, suffix = key.split(".", 1)
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha"), key
        assert name in reference, f"{key} names no SD 1.5 module"
        module = reference[name]
        modules[name] = module
        if suffix == "alpha":
            assert tensor.ndim == 0
            continue
        if isinstance(module, torch.nn.Linear):
            expected = (8, module.in_features) if suffix.startswith("lora_down") else (module.out_features, 8)
        else:
            rank = 8 if module.kernel_size == (1, 1) else 4
            expected = (rank, module.in_channels, *module.kernel_size) if suffix.startswith("lora_down") else (module.out_channels, rank, 1, 1)
        assert tuple(tensor.shape) == expected, key
    unet_names = [n for n in modules if n.startswith("lora_unet_")]
    te_names = [n for n in modules if n.startswith("lora_te_")]
    assert (len(unet_names), len(te_names)) == (n_unet, n_te)
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in te_names)
    # A few names A1111/ComfyUI users know by heart.
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in modules
    if preset == "full":
        assert "lora_unet_up_blocks_3_resnets_2_conv_shortcut" in modules
        assert "lora_unet_down_blocks_2_downsamplers_0_conv" in modules
        assert "lora_unet_up_blocks_1_resnets_0_time_emb_proj" in modules
    # The reader places every key back on the same layer of the meta model.
    file = LoraFile(path="sd15.safetensors", format="kohya", tensors=tensors, metadata={})  # type: ignore[arg-type]
    back, unknown = match_to_model(file, unet, text_encoder)
    assert unknown == []
    assert set(back.unet) == set(weights.unet) and set(back.text_encoder) == set(weights.text_encoder)
    for component, path, module in back.items():
        original = weights.component(component)[path]
        assert module.down.shape == original.down.shape and module.up.shape == original.up.shape, path
        assert module.alpha == original.alpha


# Original-layout (LDM) names of SD 1.5, written out by hand from the original UNet code.
LDM_NAMES = {
    "lora_unet_input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
    "lora_unet_input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
    "lora_unet_middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "lora_unet_output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_3_1_proj_out": "up_blocks.1.attentions.0.proj_out",
    "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_11_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
}


def test_original_layout_names_are_read(sd15):
    unet, _ = sd15
    tensors = {}
    for name, path in LDM_NAMES.items():
        layer = unet.get_submodule(path)
        if isinstance(layer, torch.nn.Linear):
            down, up = torch.ones(2, layer.in_features), torch.ones(layer.out_features, 2)
        else:
            down, up = torch.ones(2, layer.in_channels, *layer.kernel_size), torch.ones(layer.out_channels, 2, 1, 1)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})
    # Older exports name the text encoder without `text_model_` or as `lora_te1_`; both are read.
    tensors["lora_te1_encoder_layers_3_mlp_fc1.lora_down.weight"] = torch.ones(2, 768)
    tensors["lora_te1_encoder_layers_3_mlp_fc1.lora_up.weight"] = torch.ones(3072, 2)
    file = LoraFile(path="ldm.safetensors", format="kohya", tensors=tensors, metadata={})  # type: ignore[arg-type]
    weights, unknown = match_to_model(file, unet, sd15[1])
    assert unknown == []
    assert set(weights.unet) == set(LDM_NAMES.values())
    assert set(weights.text_encoder) == {"encoder.layers.3.mlp.fc1"}
    assert weights.text_encoder["encoder.layers.3.mlp.fc1"].alpha == 2.0  # no alpha key: alpha = rank
    # Every adaptable SD 1.5 layer has exactly one LDM name (no two layers share one).
    from sdlora.models.unet_names import original_module_paths

    ldm = original_module_paths(unet)
    assert len(set(ldm.values())) == len(ldm)
    planned = plan_targets(unet, "unet", LoraSpec(preset="full", rank=4))
    assert all(t.canonical in ldm for t in planned.modules)


def test_sdxl_lora_on_sd15_names_first_mismatching_key(sd15):
    unet, text_encoder = sd15
    r = 4
    tensors = {
        # SDXL's first text encoder is CLIP ViT-L too: these keys fit.
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(r, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, r),
        # The second (OpenCLIP bigG) encoder does not exist in SD 1.5.
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(r, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, r),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.ones(r, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.ones(640, r),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(r, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(640, r),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v.lora_down.weight": torch.ones(r, 2048),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v.lora_up.weight": torch.ones(1280, r),
    }
    metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    file = LoraFile(path="sdxl_style.safetensors", format="kohya", tensors=tensors, metadata=metadata)  # type: ignore[arg-type]
    with pytest.raises(LoraShapeMismatchError) as err:
        match_to_model(file, unet, text_encoder)
    message = str(err.value)
    assert "'lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight'" in message
    assert "[4, 2048]" in message and "[4, 768]" in message
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in message
    assert "SDXL" in message and "SD 1.x" in message
    assert "sdxl_style.safetensors" in message
    assert "output_blocks_3" not in message
    assert re.search(r"second text encoder", message)
