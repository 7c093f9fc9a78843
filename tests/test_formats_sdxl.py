"""SDXL LoRA files: names on the full-size SDXL tree (meta device), round trips on the tiny SDXL
pipeline, diffusers' own loader, files of other tools' naming styles, inspect and file export."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sdlora.lora import (
    LoraSpec,
    LoraWeights,
    ModuleLora,
    export_from,
    format_inspection,
    inject_adapters,
    inspect_file,
    load_lora,
    match_to_model,
    plan_targets,
    read_lora_file,
    save_lora,
)
from sdlora.lora.formats import kohya
from sdlora.models.shipped import meta_models
from sdlora.models.tiny import build_tiny_sdxl_pipeline

PARTS = ("unet", "text_encoder", "text_encoder_2")

# Module counts kohya sd-scripts reports for SDXL 1.0 with networks.lora: "create LoRA for U-Net:
# 722 modules" (Transformer2DModel children), text encoder 1: 72, text encoder 2: 192 (CLIPAttention +
# CLIPMLP; 264 together, kohya-ss/sd-scripts#1964), and with conv_dim 788 U-Net modules (also
# ResnetBlock2D / Downsample2D / Upsample2D; LyCORIS locon reports the same 788 there).
# "attn" (attention projections only) is this project's preset: 70 transformer blocks x 8.
KOHYA_COUNTS = {
    "attn": {"unet": 560, "text_encoder": 48, "text_encoder_2": 128},
    "attn-mlp": {"unet": 722, "text_encoder": 72, "text_encoder_2": 192},
    "full": {"unet": 788, "text_encoder": 72, "text_encoder_2": 192},
}


@pytest.fixture(scope="module")
def sdxl_meta():
    return meta_models("sdxl")


def _zero_weights(models, spec: LoraSpec, rank: int = 1) -> LoraWeights:
    """Rank-``rank`` weights of the right shapes for every layer ``spec`` targets (CPU tensors)."""
    weights = LoraWeights(info={"preset": spec.preset})
    g = torch.Generator().manual_seed(0)
    for part in PARTS:
        for t in plan_targets(models[part], part, spec).modules:
            kernel = t.kernel_size if t.kind == "conv" else ()
            down = torch.randn(rank, t.in_features, *kernel, generator=g) * 0.01
            up = torch.randn(t.out_features, rank, *((1, 1) if t.kind == "conv" else ()), generator=g) * 0.01
            weights.component(part)[t.canonical] = ModuleLora(down, up, float(rank))
    return weights


def _module_names(tensors) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors}


def _diffusers_path(key: str) -> tuple[str, str, str]:
    """(part, module path, role) of a key diffusers' kohya converter wrote."""
    part, rest = key.split(".", 1)
    for suffix, role in ((".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                         (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                         ("_lora.down.weight", "down"), ("_lora.up.weight", "up")):
        if rest.endswith(suffix):
            path = rest[: -len(suffix)].replace(".processor.", ".")
            if suffix.startswith("_lora") and part != "unet":  # attention-processor names of CLIP layers
                path = re.sub(r"to_(q|k|v)$", r"\1_proj", path).replace("to_out", "out_proj")
            elif suffix.startswith("_lora") and path.endswith("to_out"):
                path += ".0"
            return part, path, role
    raise AssertionError(f"unexpected converted key {key}")


@pytest.mark.parametrize("preset", ["attn", "attn-mlp", "full"])
def test_full_size_sdxl_names_counts_and_diffusers_reading(sdxl_meta, preset):
    spec = LoraSpec(preset=preset, rank=1, text_encoder=True)
    weights = _zero_weights(sdxl_meta, spec)
    assert weights.counts() == KOHYA_COUNTS[preset]
    tensors = kohya.to_state_dict(weights, torch.float16, "sdxl")
    names = _module_names(tensors)
    assert len(names) == sum(KOHYA_COUNTS[preset].values())
    assert len(tensors) == 3 * len(names)  # down, up, alpha
    # SGM UNet names as kohya writes them, never diffusers paths; lora_te1_/lora_te2_ with text_model_
    assert not any(re.search(r"down_blocks|mid_block|up_blocks", n) for n in names)
    unet = {n for n in names if n.startswith("lora_unet_")}
    te1 = {n for n in names if n.startswith("lora_te1_text_model_encoder_layers_")}
    te2 = {n for n in names if n.startswith("lora_te2_text_model_encoder_layers_")}
    assert (len(unet), len(te1), len(te2)) == tuple(KOHYA_COUNTS[preset].values())
    for expected in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v",
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj",
    ):
        assert expected in names
    if preset != "attn":
        assert {"lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
                "lora_te2_text_model_encoder_layers_0_mlp_fc2"} <= names
    conv = {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
            "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_8_0_skip_connection",
            "lora_unet_input_blocks_7_0_emb_layers_1"}
    if preset == "full":
        assert conv <= names
    else:
        assert not conv & names

    # Every name is a real module of the full-size SDXL tree with the tensor's shapes, read by an
    # independent reader: diffusers' own kohya/SGM conversion.
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), sdxl_meta["unet"].config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
    assert len(converted) == 2 * len(names) and len(alphas) == len(names)
    for key, tensor in converted.items():
        part, path, role = _diffusers_path(key)
        if not hasattr(sdxl_meta[part], "text_model"):  # transformers 5 CLIPTextModel (diffusers strips it too)
            path = path.removeprefix("text_model.")
        layer = sdxl_meta[part].get_submodule(path)
        weight = layer.weight.shape
        if role == "down":
            assert tensor.shape[1] == weight[1] and tuple(tensor.shape[2:]) == tuple(weight[2:]), key
        else:
            assert tensor.shape[0] == weight[0], key

    # and our reader places every key back on the same layer
    file = kohya_file(tensors)
    back, unknown = match_to_model(file, sdxl_meta["unet"], sdxl_meta["text_encoder"], sdxl_meta["text_encoder_2"])
    assert unknown == [] and back.counts() == KOHYA_COUNTS[preset]
    assert set(back.unet) == set(weights.unet) and set(back.text_encoder_2) == set(weights.text_encoder_2)


def kohya_file(tensors, metadata=None, path="mem.safetensors"):
    from sdlora.lora.formats import LoraFile

    return LoraFile(path=path, format="kohya", tensors=tensors, metadata=metadata or {})  # type: ignore[arg-type]


def test_sdxl_metadata(tmp_path, sdxl_meta):
    weights = _zero_weights(sdxl_meta, LoraSpec(preset="attn", rank=1, text_encoder=True))
    path = save_lora(weights, tmp_path / "xl.safetensors", family="sdxl", resolution=(832, 1216),
                     metadata={"ss_steps": 10})
    meta = read_lora_file(path).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "832x1216"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_v_parameterization"] == "False"
    assert meta["ss_v2"] == "False" and meta["ss_network_train_unet_only"] == "False" and meta["ss_steps"] == "10"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # v-prediction SDXL: kohya keeps the version name and says so in the prediction-type entries
    vpred = save_lora(weights, tmp_path / "xl_v.safetensors", family="sdxl", prediction_type="v_prediction",
                      metadata={"ss_resolution": "(768, 768)"})
    meta_v = read_lora_file(vpred).metadata
    assert meta_v["ss_base_model_version"] == "sdxl_base_v1-0" and meta_v["modelspec.prediction_type"] == "v"
    assert meta_v["ss_v_parameterization"] == "True" and meta_v["modelspec.resolution"] == "768x768"
    # SD 1.x names are unchanged, and SDXL weights cannot be written as an SD 1.x file
    from sdlora.lora import LoraFileError

    with pytest.raises(LoraFileError, match="family='sdxl'"):
        save_lora(weights, tmp_path / "bad.safetensors", family="sd1")


# Tiny SDXL pipeline ------------------------------------------------------------------------------

def _trained_adapter(pipe, preset="full", rank=4, alpha=2.0, method="lora", seed=1):
    spec = LoraSpec(method=method, preset=preset, rank=rank, alpha=alpha, text_encoder=True)
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec, text_encoder_2=pipe.text_encoder_2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter


def _image(pipe, seed=0):
    out = pipe(prompt="a red cube on a table", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(out.images[0])


@pytest.fixture()
def tiny_pair():
    torch.set_num_threads(1)
    return build_tiny_sdxl_pipeline(seed=3), build_tiny_sdxl_pipeline(seed=3)


def _unet_out(pipe, seed=0):
    unet = pipe.unet
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sample = torch.randn(1, 4, 16, 16, generator=g)
    hidden = torch.randn(1, 77, cross, generator=g)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        return unet(sample, 10, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def _te_out(pipe):
    ids = pipe.tokenizer("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        one = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        two = pipe.text_encoder_2(ids2, output_hidden_states=True)
    return one, two.hidden_states[-2], two.text_embeds


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_tiny_sdxl_round_trip(tmp_path, tiny_pair, fmt):
    pipe, fresh = tiny_pair
    adapter = _trained_adapter(pipe)
    exported = adapter.export()
    assert set(exported.counts()) == set(PARTS)
    path = save_lora(adapter, tmp_path / f"xl_{fmt}.safetensors", format=fmt, family="sdxl", dtype="fp32")
    keys = list(read_lora_file(path).tensors)
    if fmt == "kohya":
        assert any(k.startswith("lora_te2_text_model_encoder_layers_1_") for k in keys)
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)
    else:
        assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys)
        assert any(k.startswith("text_encoder.text_model.") for k in keys)
        assert any(k.startswith("unet.down_blocks.") for k in keys)
    loaded, report = load_lora(path, fresh.unet, fresh.text_encoder, "xl", text_encoder_2=fresh.text_encoder_2)
    assert report.modules == exported.counts() and report.unknown_keys == []
    assert report.base_family_guess == "sdxl"
    back = loaded.export()
    for part, name, module in exported.items():
        other = back.component(part)[name]
        assert torch.allclose(module.delta(), other.delta(), atol=1e-6), (part, name)
    assert torch.allclose(_unet_out(pipe), _unet_out(fresh), atol=1e-5)
    for a, b in zip(_te_out(pipe), _te_out(fresh)):
        assert torch.allclose(a, b, atol=1e-5)


def test_kohya_sdxl_file_in_fresh_diffusers_pipeline_same_images(tmp_path, tiny_pair):
    pipe, fresh = tiny_pair
    base = _image(pipe)
    adapter = _trained_adapter(pipe, preset="full", rank=4, alpha=2.0)
    ours = _image(pipe)
    assert np.abs(ours - base).max() > 0.02  # the adapter changes the picture
    path = save_lora(adapter, tmp_path / "xl.safetensors", family="sdxl", dtype="fp32")
    fresh.load_lora_weights(str(path))
    theirs = _image(fresh)
    assert np.abs(theirs - ours).max() < 2e-3


# Files written by other tools ----------------------------------------------------------------------

def _renamed(tensors, rename):
    return {rename(k): v for k, v in tensors.items()}


def test_other_naming_styles_match_the_same_layers(tmp_path, tiny_pair):
    from safetensors.torch import save_file

    pipe, fresh = tiny_pair
    adapter = _trained_adapter(pipe, preset="attn-mlp")
    weights = adapter.export()
    ours = kohya.to_state_dict(weights, torch.float32, "sdxl")
    layout = weights.info["unet_layout"]
    sgm_to_diffusers = {
        kohya.module_name("unet", p, "sdxl", layout): kohya.module_name("unet", p, "sd1") for p in weights.unet
    }

    def diffusers_style_unet(key):  # kohya files that name UNet layers by diffusers paths
        name, _, suffix = key.partition(".")
        return f"{sgm_to_diffusers.get(name, name)}.{suffix}"

    def no_text_model(key):  # lora_te1_encoder_layers_… (diffusers' convert_state_dict_to_kohya on transformers 5)
        return key.replace("_text_model_", "_")

    def peft_style(key):  # diffusers/PEFT names: unet.…, text_encoder.…, text_encoder_2.…
        name, _, suffix = key.partition(".")
        for part in PARTS:
            for path in weights.component(part):
                if kohya.module_name(part, path, "sdxl", layout) == name:
                    role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix)
                    return f"{part}.{path}.{role}" if role else None
        raise AssertionError(name)

    styles = {
        "kohya_diffusers_unet": _renamed(ours, diffusers_style_unet),
        "kohya_no_text_model": _renamed(ours, no_text_model),
        "peft": {k: v for k, v in _renamed(ours, peft_style).items() if k is not None},
    }
    meta = {"lora_adapter_metadata": json.dumps({f"{p}.lora_alpha": 2.0 for p in PARTS} | {f"{p}.r": 4 for p in PARTS})}
    for style, tensors in styles.items():
        path = tmp_path / f"{style}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta if style == "peft" else None)
        file = read_lora_file(path)
        got, unknown = match_to_model(file, fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
        assert unknown == [], style
        assert got.counts() == weights.counts(), style
        for part, name, module in weights.items():
            assert torch.allclose(got.component(part)[name].delta(), module.delta(), atol=1e-6), (style, part, name)
        # without the second encoder its keys are reported, not applied
        partial, unknown = match_to_model(file, fresh.unet, fresh.text_encoder)
        assert "text_encoder_2" not in partial.counts() and len(unknown) >= 2 * len(weights.text_encoder_2)


# inspect and file export -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size_file(tmp_path_factory, sdxl_meta):
    weights = _zero_weights(sdxl_meta, LoraSpec(preset="attn-mlp", rank=2, text_encoder=True), rank=2)
    return save_lora(weights, tmp_path_factory.mktemp("xl") / "style_xl.safetensors", family="sdxl",
                     resolution=1024, metadata={"ss_steps": 100})


def test_inspect_reports_sdxl_parts_in_numeric_order(full_size_file):
    info = inspect_file(full_size_file)
    assert info["base_family"] == "sdxl"
    assert info["modules"] == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
    assert list(info["modules"]) == ["unet", "text_encoder", "text_encoder_2"]
    blocks = list(info["blocks"])
    te1 = [b for b in blocks if b.startswith("text_encoder.layers.")]
    te2 = [b for b in blocks if b.startswith("text_encoder_2.layers.")]
    assert te1 == [f"text_encoder.layers.{i}" for i in range(12)]
    assert te2 == [f"text_encoder_2.layers.{i}" for i in range(32)]
    assert blocks.index("unet.output_blocks.5") < blocks.index(te1[0]) < blocks.index(te2[0])
    assert [b for b in blocks if b.startswith("unet.input_blocks.")] == [f"unet.input_blocks.{i}" for i in (4, 5, 7, 8)]
    text = format_inspection(info)
    assert "SDXL" in text and "192 text encoder 2" in text
    assert text.index("text_encoder.layers.2 ") < text.index("text_encoder.layers.10 ")


def test_inspect_guesses_sdxl_from_text_encoder_width_alone(tmp_path, full_size_file):
    from safetensors.torch import save_file

    tensors = {k: v for k, v in read_lora_file(full_size_file).tensors.items() if k.startswith("lora_te2_")}
    renamed = {k.replace("lora_te2_", "lora_te_"): v for k, v in tensors.items()}  # a lone 1280-wide encoder
    save_file(renamed, str(tmp_path / "te_only.safetensors"))
    info = inspect_file(tmp_path / "te_only.safetensors")
    assert info["base_family"] == "sdxl" and "1280" in info["base_family_reason"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_sdxl_file(tmp_path, full_size_file, fmt):
    out = export_from(full_size_file, fmt=fmt, out=tmp_path / f"out_{fmt}.safetensors", rank=1)
    file = read_lora_file(out)
    source = read_lora_file(full_size_file)
    if fmt == "kohya":
        assert _module_names(file.tensors) == _module_names(source.tensors)
        assert file.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert file.metadata["modelspec.resolution"] == "1024x1024" and file.metadata["ss_steps"] == "100"
        assert file.metadata["ss_network_dim"] == "1"
    else:
        assert sum(k.startswith("text_encoder_2.text_model.") for k in file.tensors) == 2 * 192
    assert {tuple(t.shape)[0] for k, t in file.tensors.items() if k.endswith(("lora_down.weight", "lora_A.weight"))} == {1}


def test_export_small_sdxl_architecture_file_with_its_base(tmp_path, tiny_pair):
    """A file of an SDXL-architecture model with other widths is named through the given base."""
    pipe, _ = tiny_pair
    adapter = _trained_adapter(pipe, preset="attn-mlp")
    path = save_lora(adapter, tmp_path / "tiny_xl.safetensors", family="sdxl", dtype="fp32", resolution=64)
    from sdlora.lora import LoraShapeMismatchError

    with pytest.raises(LoraShapeMismatchError, match="SDXL"):
        export_from(path, out=tmp_path / "no_base.safetensors")
    out = export_from(path, fmt="diffusers", out=tmp_path / "tiny_xl_diffusers.safetensors", base="tiny-sdxl")
    file = read_lora_file(out)
    assert any(k.startswith("text_encoder_2.text_model.") for k in file.tensors)
    again = export_from(out, out=tmp_path / "tiny_xl_again.safetensors", base="tiny-sdxl")
    assert _module_names(read_lora_file(again).tensors) == _module_names(read_lora_file(path).tensors)
