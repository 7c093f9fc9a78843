"""Delta-LoRA: the base weight moves by factor x the change of BA each step (no gradient, no
optimizer state), exact resume, SVD export with a reported error, exact merged checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdlora.generate import Previewer
from sdlora.lora import LoraSpec, inject_adapters, inspect_file, save_lora
from sdlora.lora.errors import LoraError
from sdlora.lora.variants.delta_lora import base_change, export_delta
from sdlora.train.export import save_merged_checkpoint
from sdlora.models.loading import load_base
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.train.runs import RunDir
from variant_helpers import (
    PREVIEW, PROMPT, assert_same_file, assert_step_export_is_the_final_file, diffusers_image, native_preview, resume_from, train_method,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("delta")
    return tmp, train_method(tmp, tiny_model_dir, "delta_lora", "network_args={update_start = 0.25, delta_factor = 0.8}",
                             "learning_rate=5e-3")


def test_base_weight_moves_by_factor_times_the_change_of_ba():
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, None, LoraSpec(method="delta_lora", preset="attn", rank=4, alpha=2.0,
                                                        options={"delta_factor": 0.5, "update_start": 0.0}))
    method = adapter.method
    groups = adapter.param_groups(unet_lr=1e-2)
    opt = torch.optim.AdamW(groups)
    _, path, layer = next(iter(adapter.layers()))
    base_weight = layer.get_base_layer().weight
    original = base_weight.detach().clone()
    scale = 2.0 / 4
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)

    def product():
        return layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()

    moved = []
    for step in range(3):
        method.before_step(adapter, step=step, total_steps=3)
        before, ba_before = base_change(layer, "default"), product()
        pipe.unet(latents, t, encoder_hidden_states=hidden).sample.pow(2).mean().backward()
        assert base_weight.grad is None  # W gets no gradient ...
        opt.step()
        method.after_optimizer_step(adapter, step=step, total_steps=3, optimizer=opt)
        opt.zero_grad()
        after, ba_after = base_change(layer, "default"), product()
        # ... but moves by lambda * alpha / r * (B(t+1) A(t+1) - B(t) A(t))
        assert torch.allclose(after - before, 0.5 * scale * (ba_after - ba_before), atol=1e-6)
        moved.append(float((after - before).abs().max()))
    assert min(moved) > 0
    assert all(id(p) != id(base_weight) for g in groups for p in g["params"])
    assert base_weight not in opt.state
    assert torch.equal(base_weight, original)  # stored weights untouched: the change is applied exactly in forward

    # the layer computes (W + change) x + s B A x
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = F.linear(x, original + base_change(layer, "default") + scale * product(), layer.get_base_layer().bias)
        assert torch.allclose(layer(x), expected, atol=1e-5)
        adapter.set_scale(0.0)
        assert torch.allclose(layer(x), F.linear(x, original, layer.get_base_layer().bias), atol=0)
        adapter.set_scale(1.0)


def test_options_are_checked():
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(LoraError, match="dropout"):
        inject_adapters(pipe.unet, None, LoraSpec(method="delta_lora", dropout=0.1))
    with pytest.raises(LoraError, match="update_start"):
        inject_adapters(pipe.unet, None, LoraSpec(method="delta_lora", options={"update_start": 1.5}))
    with pytest.raises(LoraError, match="no option"):
        inject_adapters(pipe.unet, None, LoraSpec(method="delta_lora", options={"factor": 1}))


def test_trains_resumes_exports_with_reported_error_and_merges_exactly(run, tiny_model_dir, tmp_path):
    tmp, result = run
    assert_same_file(result.lora_path, resume_from(result.run_dir, 2, tmp_path / "resumed"))
    assert_step_export_is_the_final_file(result)

    info = inspect_file(result.lora_path)
    meta = info["metadata"]
    assert info["method"] == "delta_lora" and info["ranks"] == [4]
    assert info["network_args"]["delta_factor"] == "0.8" and meta["sdlora_delta_base_moved"] == "True"
    reported = float(meta["sdlora_delta_svd_rel_error"])
    assert 0 < reported < 0.5
    # the same error is told in the run's events (what the page and train.log show)
    told = [e["text"] for e in RunDir(result.run_dir).events({"message"}) if "delta_svd_rel_error" in e["text"]]
    assert told and meta["sdlora_delta_svd_rel_error"] in told[-1]

    ours, previewer, adapter = native_preview(result.run_dir)
    # the reported error is the file's true error against the exact total change, layer by layer
    exported = export_delta(adapter)
    assert exported.rel_error == pytest.approx(reported, rel=1e-4)
    assert exported.max_layer_error == pytest.approx(float(meta["sdlora_delta_svd_max_layer_error"]), rel=1e-4)
    err2 = norm2 = 0.0
    for comp, path, layer in adapter.layers():
        exact = layer.lora_variant[adapter.name].total_delta(layer, adapter.name).double()
        approx = exported.weights.component(comp)[path].delta().double()
        err2 += float((exact - approx).pow(2).sum())
        norm2 += float(exact.pow(2).sum())
        assert float((exact - approx).norm() / exact.norm()) == pytest.approx(exported.layer_errors[f"{comp}.{path}"], rel=1e-3, abs=1e-6)
    assert math.sqrt(err2 / norm2) == pytest.approx(reported, rel=1e-3)

    # diffusers with the rank-4 file: close to our preview, within what the SVD error allows
    base_image = previewer.generate(PROMPT, **PREVIEW, scale=0.0)
    previewer.set_scale(1.0)
    theirs = diffusers_image(tiny_model_dir, result.lora_path)
    learned = abs(ours - base_image).max()
    assert learned > 1e-2
    assert 0 < abs(theirs - ours).max() <= max(1e-4, 4 * reported * learned)
    # at rank 2r the export is exact: the same images as our preview
    exact_file = save_lora(export_delta(adapter, rank=8).weights, tmp_path / "exact.safetensors", dtype="fp32")
    assert export_delta(adapter, rank=8).rel_error < 1e-6
    assert abs(diffusers_image(tiny_model_dir, exact_file) - ours).max() <= 1e-4

    # the merged checkpoint holds the exact result (A1111 single file; loads back as a base model)
    merged = save_merged_checkpoint(result.run_dir, tmp_path / "merged.safetensors")
    merged_image = Previewer(load_base(merged)).generate(PROMPT, **PREVIEW)
    assert abs(merged_image - ours).max() <= 1e-4
    assert meta["sdlora_delta_svd_rank"] == "4"


def test_before_the_base_moves_the_export_is_the_plain_adapter():
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, None, LoraSpec(method="delta_lora", preset="attn", rank=2, alpha=1.0))
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.normal_(0, 0.1)
    exported = export_delta(adapter)
    assert exported.rel_error == 0 and exported.max_layer_error == 0
    for _, path, layer in adapter.layers():
        module = exported.weights.unet[path]
        assert torch.equal(module.down, layer.lora_A["default"].weight) and torch.equal(module.up, layer.lora_B["default"].weight)
        assert module.alpha == 1.0
    with pytest.raises(LoraError, match="export rank"):
        export_delta(adapter, rank=0)
