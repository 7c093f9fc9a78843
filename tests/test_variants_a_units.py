"""Defining properties of DoRA, LoRA-FA, VeRA, QLoRA and LoRA+ on the tiny real-architecture models."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sdlora.lora import LoraError, LoraFileError, LoraSpec, control, inject_adapters, inspect_file, load_lora, save_lora
from sdlora.lora.formats.inspect import format_inspection
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.resources import CONFIGS_DIR
from sdlora.train.config import TrainConfig
from sdlora.train.config import lora_spec

from helpers import a1111_dora_weight

FULL = dict(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g), torch.randint(0, 49407, (1, 77), generator=g)


@torch.no_grad()
def _run(pipe, inputs):
    latents, context, ids = inputs
    return pipe.unet(latents, torch.tensor([500]), context).sample, pipe.text_encoder(ids)[0]


@torch.no_grad()
def _randomize(adapter, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter.named_parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)


def _layer(pipe, path: str):
    return pipe.unet.get_submodule(path)


LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # 32 -> 32 cross-attention (context 32)
CONV = "down_blocks.0.resnets.0.conv1"  # 3x3 conv
CONV_SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"  # 1x1 conv, in != out


def _layer_input(layer: nn.Module, seed: int = 5) -> torch.Tensor:
    base = layer.get_base_layer()
    g = torch.Generator().manual_seed(seed)
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 8, 8, generator=g)
    return torch.randn(2, 7, base.in_features, generator=g)


def _apply_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding)
    return F.linear(x, weight, base.bias)


# DoRA ---------------------------------------------------------------------------------------------


def test_dora_with_b_zero_is_the_base_and_magnitude_is_the_column_norm(tiny_pipe):
    inputs = _inputs()
    base = _run(tiny_pipe, inputs)
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(method="dora", **FULL))
    fresh = _run(tiny_pipe, inputs)
    assert torch.equal(fresh[0], base[0]) and torch.equal(fresh[1], base[1])
    layers = list(adapter.layers())
    assert len(layers) == 4 * 12 + 8 * 3 + 5 + 2 + 2 * 6
    kinds = set()
    for _, _, layer in layers:
        weight = layer.get_base_layer().weight.detach()
        magnitude = layer.dora_scale["default"]
        columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        assert list(magnitude.shape) == [1, weight.shape[1]] + [1] * (weight.ndim - 2)
        assert torch.allclose(magnitude.detach().flatten(), columns, rtol=1e-6, atol=0)
        assert magnitude.requires_grad
        kinds.add(weight.ndim)
    assert kinds == {2, 4}
    names = {n.rsplit(".", 1)[-1] if "dora" in n else n.split(".")[-2] for n, _ in adapter.named_parameters()}
    assert names == {"lora_A", "lora_B", "dora_scale"}


@pytest.mark.parametrize("path", [LINEAR, CONV, CONV_SHORTCUT])
def test_dora_layer_equals_the_a1111_comfyui_weight_at_any_multiplier(tiny_pipe, path):
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(method="dora", preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0))
    _randomize(adapter)
    layer = _layer(tiny_pipe, path)
    x = _layer_input(layer)
    module = adapter.export().unet[path]
    weight = layer.get_base_layer().weight.detach()
    with torch.no_grad():
        for w in (1.0, 0.5, -0.7, 0.0):
            adapter.set_scale(w)
            expected = _apply_weight(layer, x, a1111_dora_weight(weight, module.down, module.up, module.alpha, module.dora_scale, w))
            got = layer(x)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (w, (got - expected).abs().max())
            if w == 0.0:
                assert torch.equal(got, _apply_weight(layer, x, weight))
        adapter.set_scale(0.5)
        unmerged = layer(x)
        control.merge(adapter.models)
        assert torch.allclose(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        control.unmerge(adapter.models)
        assert torch.allclose(layer.get_base_layer().weight, weight, atol=1e-6)
        assert torch.allclose(layer(x), unmerged, rtol=1e-5, atol=1e-6)


def test_dora_norm_is_detached_and_magnitude_trains(tiny_pipe):
    """Sec. 4.3 of the paper: ||W + sBA||_c is a constant for the backward pass."""
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(method="dora", preset="attn", rank=4, alpha=4.0))
    _randomize(adapter, std=0.3)
    layer = _layer(tiny_pipe, LINEAR)
    x = _layer_input(layer)
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.dora_scale["default"]
    for p in (a, b, m):
        p.grad = None
    layer(x).square().sum().backward()
    weight = layer.get_base_layer().weight.detach()
    norm = (weight + b.detach() @ a.detach()).norm(dim=0, keepdim=True)  # constant, as the paper prescribes
    a2, b2, m2 = (t.detach().clone().requires_grad_(True) for t in (a, b, m))
    g = m2 / norm
    (F.linear(x, weight * g, layer.get_base_layer().bias) + F.linear(F.linear(x, a2 * g), b2)).square().sum().backward()
    for ours, ref in ((a, a2), (b, b2), (m, m2)):
        assert ours.grad is not None and torch.allclose(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_dora_file_layout_round_trip_and_clear_errors(tmp_path, tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(method="dora", **FULL))
    _randomize(adapter)
    inputs = _inputs()
    ours = _run(tiny_pipe, inputs)
    path = save_lora(adapter, tmp_path / "dora.safetensors", dtype="fp32")
    tensors = load_file(str(path))
    scale_keys = [k for k in tensors if k.endswith(".dora_scale")]
    assert len(scale_keys) == sum(1 for _ in adapter.layers())
    assert list(tensors["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape) == [1, 32, 1, 1]
    assert list(tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"].shape) == [1, 32]
    info = inspect_file(path)
    assert info["method"] == "dora" and info["network_type"] == "DoRA"
    assert info["network_module"] == "lycoris.kohya"
    assert info["network_args"]["dora_wd"] == "True" and info["network_args"]["wd_on_output"] == "False"
    assert "method:       dora" in format_inspection(info)

    # Read back into a fresh copy of the base: same outputs, and it exports the same file contents.
    again = build_tiny_pipeline(seed=0)
    loaded, report = load_lora(path, again.unet, again.text_encoder)
    assert report.unknown_keys == [] and loaded.method.name == "dora"
    theirs = _run(again, inputs)
    assert torch.allclose(theirs[0], ours[0], atol=1e-5) and torch.allclose(theirs[1], ours[1], atol=1e-5)
    for comp, p, module in adapter.export().items():
        other = loaded.export().component(comp)[p]
        assert torch.equal(module.dora_scale, other.dora_scale) and torch.equal(module.up, other.up)
    loaded.set_scale(0.0)
    assert torch.equal(_run(again, inputs)[0], _run(build_tiny_pipeline(seed=0), inputs)[0])

    # Per-output magnitudes (LyCORIS wd_on_output=True), mixed files, and the diffusers layout are refused.
    key = "lora_unet_down_blocks_1_resnets_0_conv_shortcut.dora_scale"  # 32 -> 64
    per_output = dict(tensors)
    per_output[key] = torch.ones(64, 1, 1, 1)
    save_file(per_output, str(tmp_path / "per_output.safetensors"))
    fresh = build_tiny_pipeline(seed=0)
    with pytest.raises(LoraFileError, match="per output channel"):
        load_lora(tmp_path / "per_output.safetensors", fresh.unet, fresh.text_encoder)
    mixed = {k: v for k, v in tensors.items() if k != key}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraFileError, match="mixes DoRA modules"):
        load_lora(tmp_path / "mixed.safetensors", fresh.unet, fresh.text_encoder)
    assert control.adapter_names([fresh.unet, fresh.text_encoder]) == []
    with pytest.raises(LoraFileError, match="cannot be written in the diffusers"):
        save_lora(adapter, tmp_path / "diffusers", format="diffusers")


# LoRA+ ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "lora_fa"])
def test_loraplus_b_group_lr_is_ratio_times_a(method, tiny_pipe, tmp_path):
    cfg = TrainConfig.from_toml(CONFIGS_DIR / "tiny.toml", [f"train_data_dir={tmp_path}", f"network_type={method}", "loraplus_lr_ratio=16",
                                                                  "learning_rate=1e-4", "text_encoder_lr=5e-5"])
    spec = lora_spec(cfg)
    assert spec.options == {"loraplus_lr_ratio": 16.0}
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, spec)
    groups = adapter.param_groups(unet_lr=cfg.effective_unet_lr, text_encoder_lr=cfg.text_encoder_lr)
    by_name = {g["name"]: g for g in groups}
    up_params = {component: {id(p) for n, p in adapter.named_parameters(component) if ".lora_B." in n}
                 for component in ("unet", "text_encoder")}
    for component, lr in (("unet", 1e-4), ("text_encoder", 5e-5)):
        up = by_name[f"{component}.up"]
        assert up["lr"] == pytest.approx(16 * lr) and {id(p) for p in up["params"]} == up_params[component]
        if method == "lora_fa":
            assert f"{component}.down" not in by_name  # A is frozen: nothing trains at A's rate
        else:
            down = by_name[f"{component}.down"]
            assert down["lr"] == pytest.approx(lr) and up["lr"] == pytest.approx(16 * down["lr"])
            others = {id(p) for _, p in adapter.named_parameters(component)} - up_params[component]
            assert {id(p) for p in down["params"]} == others
    optimizer = torch.optim.AdamW(groups)
    assert sorted(g["lr"] for g in optimizer.param_groups)[-1] == pytest.approx(16e-4)


# LoRA-FA -------------------------------------------------------------------------------------------

def test_lora_fa_a_stays_frozen_and_has_no_optimizer_state(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(method="lora_fa", **FULL))
    groups = adapter.param_groups(unet_lr=1e-2, text_encoder_lr=1e-2)
    a_params = {n: p for n, p in adapter.named_parameters() if ".lora_A." in n}
    b_params = {n: p for n, p in adapter.named_parameters() if ".lora_B." in n}
    assert a_params and len(a_params) == len(b_params)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in b_params.values()}
    assert not any(p.requires_grad for p in a_params.values())
    a_before = {n: p.detach().clone() for n, p in a_params.items()}
    assert all(p.abs().sum() > 0 for p in a_before.values())  # random init, not zero
    optimizer = torch.optim.AdamW(groups)
    latents, context, ids = _inputs()
    for _ in range(2):
        hidden = tiny_pipe.text_encoder(ids)[0]
        loss = tiny_pipe.unet(latents, torch.tensor([500]), hidden + context).sample.square().mean()
        loss.backward()
        assert all(p.grad is None for p in a_params.values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(p, a_before[n]) for n, p in a_params.items())
    assert all(p.abs().sum() > 0 for p in b_params.values())  # B left zero and trained
    state_ids = {id(p) for p in optimizer.state}
    assert state_ids == {id(p) for p in b_params.values()}
    assert adapter.export().unet[CONV].down.shape == (2, 32, 3, 3)


# VeRA ----------------------------------------------------------------------------------------------

def test_vera_shares_frozen_projections_and_trains_only_vectors(tiny_pipe):
    inputs = _inputs()
    base = _run(tiny_pipe, inputs)
    spec = LoraSpec(method="vera", options={"projection_seed": 7, "d_initial": 0.1}, **FULL)
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, spec)
    fresh = _run(tiny_pipe, inputs)
    assert torch.equal(fresh[0], base[0]) and torch.equal(fresh[1], base[1])  # b starts at zero

    by_shape: dict[tuple, list] = defaultdict(list)
    for component, path, layer in adapter.layers():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter)
        assert not a.requires_grad and not b.requires_grad
        assert torch.equal(layer.vera_lambda_d["default"], torch.full_like(layer.vera_lambda_d["default"], 0.1))
        by_shape[(component, layer.r["default"], *layer.get_base_layer().weight.shape)].append((a, b))
    assert any(len(v) > 1 for v in by_shape.values())
    for pairs in by_shape.values():
        assert all(a is pairs[0][0] and b is pairs[0][1] for a, b in pairs)  # one pair per shape
    firsts = [pairs[0][0] for pairs in by_shape.values()]
    assert len({id(a) for a in firsts}) == len(firsts)

    names = [n for n, _ in adapter.named_parameters()]
    assert names and all(n.endswith((".vera_lambda_d", ".vera_lambda_b")) for n, _ in adapter.named_parameters())
    expected = sum(layer.r["default"] + layer.out_features for _, _, layer in adapter.layers())
    assert adapter.num_parameters() == expected
    assert set(adapter.state_dict()) == set(names)
    groups = adapter.param_groups(unet_lr=1e-2)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in adapter.parameters()}

    frozen = {id(a): a.clone() for pairs in by_shape.values() for a, b in pairs[:1]}
    optimizer = torch.optim.AdamW(groups)
    latents, context, ids = inputs
    for _ in range(2):
        loss = tiny_pipe.unet(latents, torch.tensor([500]), tiny_pipe.text_encoder(ids)[0] + context).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(a, frozen[id(a)]) for pairs in by_shape.values() for a, _ in pairs[:1])
    layer = _layer(tiny_pipe, CONV)
    assert layer.vera_lambda_b["default"].abs().sum() > 0

    # The exported plain LoRA is diag(b) B diag(d) A * alpha / r, and the layer computes exactly that.
    with torch.no_grad():
        for path in (LINEAR, CONV):
            layer = _layer(tiny_pipe, path)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            d, bv = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
            r = layer.r["default"]
            delta = ((bv[:, None] * b.reshape(b.shape[0], r)) @ (d[:, None] * a.reshape(r, -1))).reshape(layer.get_base_layer().weight.shape)
            delta = delta * layer.lora_alpha["default"] / r
            module = adapter.export().unet[path]
            assert torch.allclose(module.delta(), delta, atol=1e-7)
            x = _layer_input(layer)
            assert torch.allclose(layer(x), _apply_weight(layer, x, layer.get_base_layer().weight + delta), atol=1e-5)


def test_vera_checkpoint_holds_vectors_only_and_resumes_exactly(tiny_pipe):
    spec = LoraSpec(method="vera", preset="attn", rank=4, text_encoder=True, options={"projection_seed": 3})
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, spec)
    _randomize(adapter)
    inputs = _inputs()
    ours = _run(tiny_pipe, inputs)
    state = adapter.state_dict()
    torch.manual_seed(12345)  # a different global RNG state must not matter: the projections come from the seed
    other = build_tiny_pipeline(seed=0)
    torch.rand(100)
    again = inject_adapters(other.unet, other.text_encoder, spec)
    again.load_state_dict(state)
    theirs = _run(other, inputs)
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[1], ours[1])
    reseeded = build_tiny_pipeline(seed=0)
    inject_adapters(reseeded.unet, None, LoraSpec(method="vera", preset="attn", rank=4, options={"projection_seed": 4}))
    assert torch.equal(_layer(other, LINEAR).lora_A["default"].weight, _layer(tiny_pipe, LINEAR).lora_A["default"].weight)
    assert not torch.equal(_layer(reseeded, LINEAR).lora_A["default"].weight, _layer(tiny_pipe, LINEAR).lora_A["default"].weight)


def test_method_options_fail_clearly(tiny_pipe):
    cases = [
        (LoraSpec(method="vera", options={"loraplus_lr_ratio": 16}), "does not apply to VeRA"),
        (LoraSpec(method="vera", options={"projection_seed": -1}), "projection_seed"),
        (LoraSpec(method="vera", options={"d_initial": 0}), "d_initial"),
        (LoraSpec(method="dora", options={"target_rank": 4}), "has no option"),
        (LoraSpec(method="lora_fa", options={"loraplus_lr_ratio": "x"}), "loraplus_lr_ratio"),
    ]
    for spec, message in cases:
        with pytest.raises(LoraError, match=message):
            inject_adapters(tiny_pipe.unet, None, spec)
    assert control.adapter_names(tiny_pipe.unet) == []


# QLoRA ---------------------------------------------------------------------------------------------

def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_bitsandbytes(), reason="bitsandbytes is installed here; the missing-package error cannot be shown")
def test_qlora_without_bitsandbytes_says_so(tiny_pipe):
    linear_before = sum(type(m) is nn.Linear for m in tiny_pipe.unet.modules())
    with pytest.raises(LoraError, match=r"needs bitsandbytes.*pip install bitsandbytes"):
        inject_adapters(tiny_pipe.unet, None, LoraSpec(method="qlora"))
    assert sum(type(m) is nn.Linear for m in tiny_pipe.unet.modules()) == linear_before
    assert control.adapter_names(tiny_pipe.unet) == []


def _qlora_device() -> str | None:
    """A device bitsandbytes runs 4-bit layers on (CUDA first), or None."""
    if not _has_bitsandbytes():
        return None
    from sdlora.lora.variants.qlora import check_support

    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        try:
            check_support(device, 32, 32)  # the tiny model's narrowest Linear layers
            return device
        except LoraError:
            continue
    return None


@pytest.mark.skipif(_qlora_device() is None, reason="needs bitsandbytes with a working 4-bit NF4 path (a CUDA GPU); "
                    "not installed or not supported on this machine")
def test_qlora_base_is_nf4_and_only_lora_trains(tmp_path, tiny_model_dir):
    from sdlora.lora.variants.qlora import is_nf4

    device = _qlora_device()
    pipe = build_tiny_pipeline(seed=0).to(device)
    latents, context, ids = (t.to(device) for t in _inputs())
    full = pipe.unet(latents, torch.tensor([500], device=device), context).sample.detach()
    adapter = inject_adapters(pipe.unet, None, LoraSpec(method="qlora", preset="full", rank=4, alpha=4.0))
    base_linear = [m for name, m in pipe.unet.named_modules()
                   if isinstance(m, nn.Linear) and ".lora_A." not in f"{name}." and ".lora_B." not in f"{name}."]
    assert base_linear and all(is_nf4(m) for m in base_linear)  # every base Linear, targeted or not
    targets = [layer for _, _, layer in adapter.layers()]
    assert any(is_nf4(layer.get_base_layer()) for layer in targets)
    quantized = pipe.unet(latents, torch.tensor([500], device=device), context).sample.detach()
    assert 0 < (quantized - full).abs().max() < 0.5 * full.abs().max()  # NF4 rounding, not a broken model
    groups = adapter.param_groups(unet_lr=1e-2)
    optimizer = torch.optim.AdamW(groups)
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if not p.requires_grad}
    loss = pipe.unet(latents, torch.tensor([500], device=device), context).sample.square().mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters() if n in frozen)
    exported = adapter.export()
    assert any(m.up.abs().sum() > 0 for m in exported.unet.values())
    path = save_lora(adapter, tmp_path / "q.safetensors", dtype="fp32")
    assert inspect_file(path)["method"] == "qlora"
    fp = build_tiny_pipeline(seed=0)
    loaded, report = load_lora(path, fp.unet, None)
    assert report.unknown_keys == [] and len(list(loaded.layers())) == len(targets)
