"""Exporting without a loaded base: checkpoints -> plain weights, re-ranking, SD 1.x file conversion."""

from __future__ import annotations

import math

import pytest
import torch

from sdlora.lora import LoraError, LoraSpec, inject_adapters, inspect_file, plan_targets, resize_rank, save_lora
from sdlora.lora.formats import LoraFileError, export_from, format_inspection, meta_models, weights_from_checkpoint
from sdlora.lora.weights import LoraWeights, ModuleLora



@pytest.mark.parametrize("rslora", [False, True])
def test_checkpoint_state_gives_the_same_weights_as_the_adapter(tiny_pipe, rslora):
    spec = LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, text_encoder=True,
                    text_encoder_rank=3, text_encoder_alpha=1.5, rslora=rslora)
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    exported = adapter.export()
    rebuilt = weights_from_checkpoint(adapter.state_dict(), spec)
    assert set(rebuilt.unet) == set(exported.unet) and set(rebuilt.text_encoder) == set(exported.text_encoder)
    for component, path, module in exported.items():
        other = rebuilt.component(component)[path]
        assert torch.equal(module.down, other.down) and torch.equal(module.up, other.up), path
        assert math.isclose(module.alpha, other.alpha, rel_tol=1e-9), path


def test_resize_rank_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(1)
    conv = ModuleLora(torch.randn(8, 6, 3, 3, generator=g), torch.randn(10, 8, 1, 1, generator=g), alpha=4.0)
    linear = ModuleLora(torch.randn(8, 12, generator=g), torch.randn(16, 8, generator=g), alpha=8.0)
    small = ModuleLora(torch.randn(2, 12, generator=g), torch.randn(16, 2, generator=g), alpha=1.0)
    weights = LoraWeights(unet={"c": conv, "l": linear}, text_encoder={"s": small})
    same = resize_rank(weights, 8)
    assert torch.allclose(same.unet["c"].delta(), conv.delta(), atol=1e-5)
    three = resize_rank(weights, 3)
    for name, original in (("c", conv), ("l", linear)):
        module = three.unet[name]
        assert module.rank == 3 and module.scale == pytest.approx(original.scale)
        flat = original.delta().reshape(original.up.shape[0], -1)
        singular = torch.linalg.svdvals(flat.double())
        error = torch.linalg.matrix_norm((module.delta() - original.delta()).reshape(flat.shape).double())
        assert error == pytest.approx(singular[3:].norm().item(), rel=1e-4)  # Eckart-Young optimum
    assert three.unet["c"].down.shape == (3, 6, 3, 3) and three.unet["c"].up.shape == (10, 3, 1, 1)
    assert three.text_encoder["s"] is small  # already below the target rank
    with pytest.raises(ValueError, match="rank"):
        resize_rank(weights, 0)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """A small-rank LoRA shaped for SD 1.5 (UNet full preset + text encoder), random values."""
    unet, text_encoder = (meta_models("sd1")[k] for k in ("unet", "text_encoder"))
    spec = LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)
    weights = LoraWeights(info={"preset": "full"})
    g = torch.Generator().manual_seed(2)
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for t in plan_targets(model, component, spec).modules:
            down = (t.rank, t.in_features, *t.kernel_size) if t.kind == "conv" else (t.rank, t.in_features)
            up = (t.out_features, t.rank, 1, 1) if t.kind == "conv" else (t.out_features, t.rank)
            weights.component(component)[t.canonical] = ModuleLora(
                torch.randn(down, generator=g) * 0.01, torch.randn(up, generator=g) * 0.01, t.alpha)
    folder = tmp_path_factory.mktemp("sd15")
    return save_lora(weights, folder / "sd15_style.safetensors", metadata={"ss_steps": 300}), weights


def test_export_file_to_diffusers_at_lower_rank(sd15_file):
    path, weights = sd15_file
    out = export_from(path, fmt="diffusers", rank=2)
    assert out == path.parent / "exports" / "sd15_style-r2-diffusers.safetensors"
    info, source = inspect_file(out), inspect_file(path)
    assert info["format"] == "diffusers" and info["modules"] == source["modules"] == {"unet": 278, "text_encoder": 72}
    assert info["ranks"] == [2] and info["layers"] == source["layers"]
    assert info["dtypes"] == ["float16"]  # kept the source precision

    back = export_from(out, fmt="kohya", out=path.parent / "back.safetensors", dtype="fp32")
    back_info = inspect_file(back)
    assert back_info["format"] == "kohya" and back_info["modules"] == source["modules"]
    assert back_info["base_family"] == "sd1"
    # Rank-2 layers came through unchanged (up to fp16 storage); scales are the original ones.
    from sdlora.lora import read_lora_file
    from sdlora.lora.formats import match_to_model

    unet, text_encoder = (meta_models("sd1")[k] for k in ("unet", "text_encoder"))
    reread, _ = match_to_model(read_lora_file(back), unet, text_encoder)
    conv1 = "down_blocks.0.resnets.0.conv1"
    assert reread.unet[conv1].scale == pytest.approx(weights.unet[conv1].scale)
    assert torch.allclose(reread.unet[conv1].delta(), weights.unet[conv1].delta(), atol=1e-6)

    kohya_meta = inspect_file(export_from(path, out=path.parent / "copy.safetensors"))["metadata"]
    assert kohya_meta["ss_steps"] == "300" and kohya_meta["ss_network_args"] == {"conv_dim": "2", "conv_alpha": "1"}

    text = format_inspection(source)
    assert "278 unet" in text and "72 text encoder" in text and "LoCon" in text and "SD 1.x" in text


def test_export_errors(tmp_path, sd15_file):
    with pytest.raises(LoraFileError, match="not found"):
        export_from(tmp_path / "missing.safetensors")
    with pytest.raises(LoraFileError, match="kohya, diffusers"):
        export_from(sd15_file[0], fmt="ckpt", out=tmp_path / "x.safetensors")
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "config.toml").write_text("")
    with pytest.raises(LoraFileError, match="training run"):
        export_from(run)


def test_loraplus_param_groups(tiny_pipe):
    spec = LoraSpec(preset="attn", rank=2, text_encoder=True, options={"loraplus_lr_ratio": 16})
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, spec)
    groups = adapter.param_groups(unet_lr=1e-4, text_encoder_lr=1e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("unet.down", 1e-4), ("unet.up", pytest.approx(1.6e-3)), ("text_encoder.down", 1e-5), ("text_encoder.up", pytest.approx(1.6e-4))]
    up_ids = {id(layer.lora_B["default"].weight) for _, _, layer in adapter.layers()}
    assert {id(p) for p in groups[1]["params"]} | {id(p) for p in groups[3]["params"]} == up_ids
    assert sum(len(g["params"]) for g in groups) == len(adapter.parameters())
    with pytest.raises(LoraError, match="loraplus_lr_ratio"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(options={"loraplus_lr_ratio": -1}), "bad")
