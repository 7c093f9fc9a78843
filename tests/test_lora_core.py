"""LoRA injection maths and runtime controls on the tiny real-architecture models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sdlora.lora import LoraError, LoraSpec, control, get_method, inject_adapters, method_names, preset_names
from sdlora.lora.variants import AdapterMethod



def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    timestep = torch.tensor([500])
    context = torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    return latents, timestep, context, ids


@torch.no_grad()
def _run(pipe, inputs):
    latents, timestep, context, ids = inputs
    return pipe.unet(latents, timestep, context).sample, pipe.text_encoder(ids)[0]


@torch.no_grad()
def _randomize(adapter, seed: int = 2, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


SPEC = LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True, text_encoder_rank=3)


def test_fresh_adapter_is_bit_identical_and_every_preset_layer_is_adapted(tiny_pipe):
    inputs = _inputs()
    base_unet, base_te = _run(tiny_pipe, inputs)
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, SPEC)
    unet, te = _run(tiny_pipe, inputs)
    assert torch.equal(unet, base_unet)
    assert torch.equal(te, base_te)
    # tiny UNet, full preset: 4 transformer blocks x 12 + 8 resnets x 3 + 5 conv_shortcuts + 2 samplers
    assert sum(1 for _ in adapter.layers("unet")) == 4 * 12 + 8 * 3 + 5 + 2
    assert sum(1 for _ in adapter.layers("text_encoder")) == 2 * 6
    conv1 = tiny_pipe.unet.down_blocks[0].resnets[0].conv1
    assert conv1.r["default"] == 2 and conv1.lora_alpha["default"] == 1.0
    down = conv1.lora_A["default"]
    assert isinstance(down, torch.nn.Conv2d) and down.kernel_size == (3, 3)
    assert (down.stride, down.padding) == (conv1.base_layer.stride, conv1.base_layer.padding)
    assert conv1.lora_B["default"].kernel_size == (1, 1)
    assert torch.count_nonzero(conv1.lora_B["default"].weight) == 0
    shortcut = tiny_pipe.unet.down_blocks[1].resnets[0].conv_shortcut  # 1x1 conv: network rank, like kohya
    assert shortcut.r["default"] == 4
    q_proj = tiny_pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    assert q_proj.r["default"] == 3 and q_proj.lora_alpha["default"] == 2.0  # text-encoder alpha defaults to alpha


def test_scale_zero_is_base_and_merge_matches_unmerged(tiny_pipe):
    inputs = _inputs()
    base_unet, base_te = _run(tiny_pipe, inputs)
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, SPEC)
    _randomize(adapter)
    lora_unet, lora_te = _run(tiny_pipe, inputs)
    assert (lora_unet - base_unet).abs().max() > 1e-2
    assert (lora_te - base_te).abs().max() > 1e-2

    adapter.set_scale(0.0)
    unet0, te0 = _run(tiny_pipe, inputs)
    assert torch.equal(unet0, base_unet) and torch.equal(te0, base_te)

    adapter.set_scale(1.0)
    adapter.merge()
    assert control.is_merged(adapter.models)
    merged_unet, merged_te = _run(tiny_pipe, inputs)
    assert (merged_unet - lora_unet).abs().max() <= 1e-5
    assert (merged_te - lora_te).abs().max() <= 1e-5

    # Changing the scale of a merged adapter re-merges with the new scale.
    adapter.set_scale(0.5)
    half_merged, _ = _run(tiny_pipe, inputs)
    adapter.unmerge()
    half_unmerged, _ = _run(tiny_pipe, inputs)
    assert (half_merged - half_unmerged).abs().max() <= 1e-5
    assert (half_unmerged - lora_unet).abs().max() > 1e-3

    adapter.set_scale(0.0)
    back_unet, back_te = _run(tiny_pipe, inputs)
    # unmerge subtracted what merge added (up to float rounding of the base weights)
    assert (back_unet - base_unet).abs().max() <= 1e-5
    assert (back_te - base_te).abs().max() <= 1e-5


@pytest.mark.parametrize("layer_path", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"])
def test_output_is_linear_in_scale_for_one_layer(tiny_pipe, layer_path):
    adapter = inject_adapters(tiny_pipe.unet, None, dataclasses.replace(SPEC, text_encoder=False))
    _randomize(adapter)
    layer = tiny_pipe.unet.get_submodule(layer_path)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 32, generator=g) if "to_q" in layer_path else torch.randn(2, 32, 8, 8, generator=g)
    outputs = {}
    with torch.no_grad():
        for s in (0.0, 1.0, -1.5, 0.25, 3.0):
            adapter.set_scale(s)
            outputs[s] = layer(x)
        base = layer.base_layer(x)
    assert torch.equal(outputs[0.0], base)
    delta = outputs[1.0] - outputs[0.0]
    assert delta.abs().max() > 1e-3
    for s in (-1.5, 0.25, 3.0):
        assert torch.allclose(outputs[s] - outputs[0.0], s * delta, atol=1e-5, rtol=1e-5)
    # delta equals up @ down * alpha / r applied as a plain layer
    module = adapter.export().unet[layer_path]
    assert math.isclose(module.scale, layer.scaling["default"] / 3.0)  # scale was left at 3.0


def test_spec_defaults_follow_the_training_options():
    spec = LoraSpec(rank=8)
    assert (spec.linear_alpha, spec.effective_conv_rank, spec.effective_conv_alpha) == (8.0, 8, 8.0)
    spec = LoraSpec(rank=8, alpha=4, conv_rank=2, text_encoder_rank=6)
    assert (spec.effective_conv_rank, spec.effective_conv_alpha) == (2, 4.0)
    assert (spec.effective_text_encoder_rank, spec.effective_text_encoder_alpha) == (6, 4.0)
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(LoraError, match="Unknown LoRA option"):
        LoraSpec.from_dict({"rank": 4, "network_dim": 4})


def test_rslora_scale_and_export_alpha(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn", rank=4, alpha=2.0, rslora=True))
    layer = tiny_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_k
    assert math.isclose(layer.scaling["default"], 2.0 / math.sqrt(4))
    exported = adapter.export().unet["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    assert math.isclose(exported.scale, 2.0 / math.sqrt(4))  # plain alpha/r reproduces the rsLoRA scale


def test_several_adapters_with_weights_enable_disable(tiny_pipe):
    inputs = _inputs()
    base_unet, base_te = _run(tiny_pipe, inputs)
    a = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(preset="attn", rank=2, text_encoder=True), "a")
    b = inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn-mlp", rank=3), "b")
    _randomize(a, seed=3)
    _randomize(b, seed=4)
    models = [tiny_pipe.unet, tiny_pipe.text_encoder]

    control.set_adapters(models, {"a": 1.0})
    only_a, te_a = _run(tiny_pipe, inputs)
    control.set_adapters(models, {"b": 1.0})
    only_b, te_b = _run(tiny_pipe, inputs)
    assert torch.equal(te_b, base_te)  # b has no text-encoder part
    control.set_adapters(models, {"a": 0.7, "b": -0.4})
    mixed, _ = _run(tiny_pipe, inputs)
    control.set_adapters(models, {"a": 0.7})
    a07, _ = _run(tiny_pipe, inputs)
    control.set_adapters(models, {"b": -0.4})
    bm04, _ = _run(tiny_pipe, inputs)
    assert (mixed - base_unet).abs().max() > 1e-3
    # Mixed output is not the sum of single-adapter outputs (non-linear net), but each adapter shows:
    assert (mixed - a07).abs().max() > 1e-4 and (mixed - bm04).abs().max() > 1e-4
    assert control.get_scales(models)["b"] == pytest.approx(-0.4)

    control.set_adapters(models, {"a": 1.0, "b": 1.0})
    control.disable(models)
    off_unet, off_te = _run(tiny_pipe, inputs)
    assert torch.equal(off_unet, base_unet) and torch.equal(off_te, base_te)
    control.enable(models)
    control.set_adapters(models, {"a": 1.0})
    again, _ = _run(tiny_pipe, inputs)
    assert torch.equal(again, only_a)

    b.remove()
    assert control.adapter_names(models) == ["a"]
    with pytest.raises(LoraError, match="No adapter named"):
        control.set_adapters(models, {"b": 1.0})


def test_runtime_controls_keep_requires_grad(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn", rank=2))
    params = adapter.parameters()
    assert params and all(p.requires_grad for p in params)
    for p in params[::2]:
        p.requires_grad_(False)  # e.g. LoRA-FA freezes down
    flags = [p.requires_grad for p in params]
    adapter.disable()
    adapter.enable()
    adapter.activate()
    adapter.set_scale(0.5)
    assert [p.requires_grad for p in params] == flags


def test_param_groups_state_dict_and_registry(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(preset="attn", rank=2, text_encoder=True))
    groups = adapter.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 5e-5)]
    n_unet = sum(p.numel() for p in groups[0]["params"])
    assert n_unet == sum(p.numel() for _, p in adapter.named_parameters("unet")) > 0
    base_params = {id(p) for p in tiny_pipe.unet.parameters()} - {id(p) for p in adapter.parameters()}
    assert not base_params & {id(p) for g in groups for p in g["params"]}
    # Exact checkpoint round trip
    _randomize(adapter)
    state = adapter.state_dict()
    assert all(k.startswith(("unet.", "text_encoder.")) for k in state)
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
    adapter.load_state_dict(state)
    assert all(torch.equal(state[k], p) for k, p in adapter.named_parameters())
    with pytest.raises(LoraError, match="does not match"):
        adapter.load_state_dict({k: v for k, v in list(state.items())[1:]})

    assert "lora" in method_names()
    method = get_method("lora")
    assert isinstance(method, AdapterMethod) and method.name == "lora"
    assert preset_names() == ["attn", "attn-mlp", "full"]


def test_bad_settings_fail_clearly_and_leave_the_model_alone(tiny_pipe):
    with pytest.raises(LoraError) as err:
        inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="everything"))
    assert "attn, attn-mlp, full" in str(err.value)
    with pytest.raises(LoraError, match="available methods: lora"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(method="nonexistent"))
    with pytest.raises(LoraError) as err:
        inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn", rank=40))
    assert "'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'" in str(err.value)
    assert "largest useful rank is 32" in str(err.value)
    with pytest.raises(LoraError) as err:  # conv_rank alone too large: names the first 3x3 conv
        inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="full", rank=4, conv_rank=300))
    assert "'unet.down_blocks.0.resnets.0.conv1'" in str(err.value) and "Conv2d 32 -> 32, 3x3" in str(err.value)
    with pytest.raises(LoraError, match="text_encoder_rank"):
        LoraSpec(text_encoder_rank=0)
    with pytest.raises(LoraError, match="dropout"):
        LoraSpec(dropout=1.5)
    with pytest.raises(LoraError, match="has no option"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(options={"plus_ratio": 16}))
    assert control.adapter_names(tiny_pipe.unet) == []  # nothing was injected by the failed calls
    inject_adapters(tiny_pipe.unet, None, LoraSpec(rank=2), "x")
    with pytest.raises(LoraError, match="already"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(rank=2), "x")
    with pytest.raises(LoraError, match="Invalid adapter name"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(rank=2), "../evil")


def test_dropout_is_active_in_train_mode_only(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn", rank=4, dropout=0.5))
    _randomize(adapter)
    layer = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        torch.manual_seed(1)
        assert not torch.equal(first, layer(x))
