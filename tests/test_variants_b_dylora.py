"""DyLoRA: nested ranks (any leading k components are the rank-k adapter), frozen-mode updates,
training with exact resume, export at any rank, preview rank switching."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.generate import Previewer
from sdlora.lora import LoraSpec, export_from, inject_adapters, inspect_file
from sdlora.lora.errors import LoraError
from sdlora.lora.variants.dylora import rank_for_step, set_active_rank, truncate_rank
from sdlora.models.tiny import build_tiny_pipeline
from variant_helpers import (
    PREVIEW, PROMPT, assert_same_file, assert_step_export_is_the_final_file, diffusers_image, native_preview, resume_from, train_method,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dylora")
    return tmp, train_method(tmp, tiny_model_dir, "dylora", "learning_rate=1e-2", "text_encoder_lr=1e-2")


def _random_adapter(spec: LoraSpec, seed: int = 3):
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe, adapter


def test_frozen_step_updates_only_the_sampled_component():
    pipe, adapter = _random_adapter(LoraSpec(method="dylora", preset="attn", rank=4, alpha=4.0))
    opt = torch.optim.AdamW(adapter.param_groups(unet_lr=1e-2), weight_decay=0.1)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    method = adapter.method
    changed = []
    for step in range(3):  # later steps run with Adam momentum from earlier ones
        before = {k: v.clone() for k, v in adapter.state_dict().items()}
        method.before_step(adapter, step=step, total_steps=3)
        pipe.unet(latents, t, encoder_hidden_states=hidden).sample.pow(2).mean().backward()
        opt.step()
        method.after_optimizer_step(adapter, step=step, total_steps=3, optimizer=opt)
        opt.zero_grad()
        b = rank_for_step(step, 4)
        after = adapter.state_dict()
        for key, old in before.items():
            diff = (after[key] - old).abs()
            per_component = diff.sum(dim=1) if key.endswith("lora_A.weight") else diff.sum(dim=0)
            moved = sorted(int(i) for i in torch.nonzero(per_component).reshape(-1))
            assert moved in ([b - 1], []), (step, key, moved, b)
            changed += moved
    assert changed  # the sampled components did train


def test_truncated_adapter_equals_the_truncated_file_and_merges_exactly():
    pipe, adapter = _random_adapter(LoraSpec(method="dylora", preset="full", rank=4, alpha=2.0, text_encoder=True))
    other = build_tiny_pipeline(seed=0)
    from sdlora.lora.inject import apply_weights

    apply_weights(other.unet, other.text_encoder, truncate_rank(adapter.export(), 2), "cut")
    set_active_rank(adapter.models, "default", 2)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours_te, theirs_te = pipe.text_encoder(ids)[0], other.text_encoder(ids)[0]
        ours = pipe.unet(latents, t, encoder_hidden_states=ours_te).sample
        theirs = other.unet(latents, t, encoder_hidden_states=theirs_te).sample
        assert torch.allclose(ours_te, theirs_te, atol=1e-6) and torch.allclose(ours, theirs, atol=1e-5)
        adapter.merge()
        merged = pipe.unet(latents, t, encoder_hidden_states=ours_te).sample
        assert torch.allclose(merged, ours, atol=1e-4)
        with pytest.raises(LoraError, match="Unmerge"):
            set_active_rank(adapter.models, "default", 3)
        adapter.unmerge()
        set_active_rank(adapter.models, "default", None)
        full = pipe.unet(latents, t, encoder_hidden_states=ours_te).sample
        assert (full - ours).abs().max() > 1e-3  # the full rank really differs
    with pytest.raises(LoraError, match="whole number"):
        set_active_rank(adapter.models, "default", 0)


def test_trains_resumes_exactly_and_exports_any_rank(run, tiny_model_dir, tmp_path):
    tmp, result = run
    # exact resume from the mid-run checkpoint
    assert_same_file(result.lora_path, resume_from(result.run_dir, 2, tmp_path / "resumed"))
    assert_step_export_is_the_final_file(result)

    info = inspect_file(result.lora_path)
    assert info["method"] == "dylora" and info["network_type"] == "DyLoRA"
    assert info["network_module"] == "networks.dylora" and info["ranks"] == [4]

    # the file reproduces sdlora's preview of the trained adapter in a fresh diffusers pipeline
    ours, previewer, adapter = native_preview(result.run_dir)
    theirs = diffusers_image(tiny_model_dir, result.lora_path)
    assert abs(theirs - ours).max() <= 1e-4
    assert abs(theirs - previewer.generate(PROMPT, **PREVIEW, scale=0.0)).max() > 1e-2  # it learned something
    previewer.set_scale(1.0)

    # export --rank 2 is the truncation (first rows / columns, same alpha), not an SVD
    cut = export_from(result.lora_path, rank=2, out=tmp_path / "r2.safetensors", dtype="fp32", base=tiny_model_dir)
    full, low = load_file(str(result.lora_path)), load_file(str(cut))
    assert full.keys() == low.keys()
    for key, tensor in low.items():
        if key.endswith("lora_down.weight"):
            assert torch.equal(tensor, full[key][:2].float())
        elif key.endswith("lora_up.weight"):
            assert torch.equal(tensor, full[key][:, :2].float())
        else:
            assert torch.equal(tensor, full[key])
    cut_info = inspect_file(cut)
    assert cut_info["method"] == "dylora" and cut_info["ranks"] == [2]

    # the preview at rank 2 (training adapter, and the DyLoRA file) equals the rank-2 file in diffusers
    theirs_2 = diffusers_image(tiny_model_dir, cut)
    previewer.set_rank(adapter.name, 2)
    assert abs(previewer.generate(PROMPT, **PREVIEW) - theirs_2).max() <= 1e-4
    previewer.set_rank(adapter.name, None)
    assert abs(previewer.generate(PROMPT, **PREVIEW) - ours).max() == 0
    file_previewer = Previewer(build_tiny_pipeline(seed=0))
    name = file_previewer.load_lora(result.lora_path)
    file_previewer.set_rank(name, 2)
    assert abs(file_previewer.generate(PROMPT, **PREVIEW) - theirs_2).max() <= 1e-4
    assert abs(theirs_2 - ours).max() > 1e-4  # rank 2 is a different adapter


def test_rank_switch_refuses_files_that_are_not_dylora(tmp_path):
    from sdlora.lora import save_lora

    pipe, adapter = _random_adapter(LoraSpec(preset="attn", rank=4))
    path = save_lora(adapter, tmp_path / "plain.safetensors")
    previewer = Previewer(build_tiny_pipeline(seed=0))
    name = previewer.load_lora(path)
    with pytest.raises(LoraError, match="not a DyLoRA file"):
        previewer.set_rank(name, 2)
    with pytest.raises(LoraError, match="rsLoRA|use_rslora"):
        inject_adapters(pipe.unet, None, LoraSpec(method="dylora", rank=4, rslora=True), "other")
