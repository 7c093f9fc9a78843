"""Preview generation: live adapters, LoRA files with weights, scale grids, schedulers, merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.generate import Previewer, image_grid, make_scheduler, resolve_scheduler_name, scheduler_names
from sdlora.lora import LoraError, LoraSpec, control, inject_adapters, save_lora
from sdlora.models.tiny import build_tiny_pipeline

PROMPT = "an ink drawing of a lighthouse"
FAST = dict(steps=2, guidance=4.0, scheduler="Euler", output="np")



def _randomize(adapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def _lora_file(tmp_path, name: str, spec: LoraSpec, seed: int):
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec)
    _randomize(adapter, seed)
    return save_lora(adapter, tmp_path / f"{name}.safetensors", dtype="fp32")


def test_live_training_adapter_scale_grid_leaves_training_state_alone(tiny_pipe):
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(preset="attn-mlp", rank=4, text_encoder=True))
    _randomize(adapter, seed=1)
    tiny_pipe.unet.train()
    tiny_pipe.text_encoder.train()
    weights_before = [id(p) for p in adapter.parameters()]
    layer = tiny_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    scaling_before = dict(layer.scaling)

    previewer = Previewer(tiny_pipe)
    previewer.use_adapter(adapter.name)
    images = previewer.scale_grid([0.0, 0.5, 1.0, -1.0], PROMPT, seed=5, **FAST)
    previewer.disable()
    base = previewer.generate(PROMPT, seed=5, **FAST)
    previewer.enable()

    assert len(images) == 4
    assert np.array_equal(images[0], base[0])  # scale 0 is the base model exactly
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(images[a] - images[b]).max() > 1e-3
    assert previewer.scale == 1.0
    # Training can continue: modes, scales, gradients and parameter objects unchanged (nothing reloaded).
    assert tiny_pipe.unet.training and tiny_pipe.text_encoder.training
    assert layer.scaling == scaling_before
    assert all(p.requires_grad for p in adapter.parameters())
    assert [id(p) for p in adapter.parameters()] == weights_before
    with pytest.raises(LoraError, match="being trained"):
        previewer.merge()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers loading a second adapter
def test_several_files_with_weights_match_diffusers(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    first = _lora_file(tmp_path, "ink", LoraSpec(preset="attn", rank=4, text_encoder=True), seed=2)
    second = _lora_file(tmp_path, "paper", LoraSpec(preset="full", rank=2, conv_rank=2), seed=3)

    previewer = Previewer(build_tiny_pipeline(seed=0))
    name_a = previewer.load_lora(first, weight=1.0)
    name_b = previewer.load_lora(second, weight=0.6)
    assert (name_a, name_b) == ("ink", "paper")
    assert previewer.adapters == {"ink": 1.0, "paper": 0.6}
    assert previewer.reports["paper"].unknown_keys == []
    ours = previewer.generate(PROMPT, seed=9, scale=0.5, steps=2, guidance=4.0, scheduler="DDIM", output="np")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(first), adapter_name="ink")
    pipe.load_lora_weights(str(second), adapter_name="paper")
    pipe.set_adapters(["ink", "paper"], adapter_weights=[0.5, 0.3])
    theirs = pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(9),
                  output_type="np").images
    assert np.abs(ours - theirs).max() <= 1e-4

    previewer.set_weight("paper", 0.0)
    only_ink = previewer.generate(PROMPT, seed=9, steps=2, guidance=4.0, scheduler="DDIM", output="np")
    assert np.abs(only_ink - ours).max() > 1e-3
    assert previewer.set_loras([(first, 1.0)]) == ["ink"]  # kept loaded, "paper" removed from the models
    assert previewer.adapters == {"ink": 1.0}
    assert "paper" not in control.adapter_names(previewer.unet)
    again = previewer.generate(PROMPT, seed=9, steps=2, guidance=4.0, scheduler="DDIM", output="np")
    assert np.abs(again - only_ink).max() <= 1e-6
    assert previewer.set_loras([(second, 0.6), (first, 1.0)]) == ["paper", "ink"]
    mixed = previewer.generate(PROMPT, seed=9, scale=0.5, steps=2, guidance=4.0, scheduler="DDIM", output="np")
    assert np.abs(mixed - ours).max() <= 1e-5


def test_merged_preview_matches_unmerged(tmp_path):
    path = _lora_file(tmp_path, "style", LoraSpec(preset="full", rank=4, text_encoder=True), seed=4)
    previewer = Previewer(build_tiny_pipeline(seed=0))
    previewer.load_lora(path)
    unmerged = previewer.generate(PROMPT, seed=1, **FAST)
    half = previewer.generate(PROMPT, seed=1, scale=0.5, **FAST)
    previewer.set_scale(1.0)
    previewer.merge()
    assert previewer.merged and control.is_merged(previewer.unet)
    merged = previewer.generate(PROMPT, seed=1, **FAST)
    merged_half = previewer.generate(PROMPT, seed=1, scale=0.5, **FAST)  # re-merges at the new scale
    assert np.abs(merged - unmerged).max() <= 1e-5
    assert np.abs(merged_half - half).max() <= 1e-5
    previewer.unmerge()
    assert not control.is_merged(previewer.unet)
    assert np.abs(previewer.generate(PROMPT, seed=1, scale=1.0, **FAST) - unmerged).max() <= 1e-5


def test_schedulers_seeds_and_sizes(tiny_pipe):
    previewer = Previewer(tiny_pipe)
    for name in scheduler_names():
        image = previewer.generate(PROMPT, seed=3, steps=2, guidance=3.0, scheduler=name, output="np")
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all(), name
    for required in ("Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"):
        assert required in scheduler_names()
    assert resolve_scheduler_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert resolve_scheduler_name("euler_a") == "Euler a"
    with pytest.raises(LoraError, match="Euler a, DDIM"):
        resolve_scheduler_name("k_lms_turbo")
    karras = make_scheduler("DPM++ 2M Karras", tiny_pipe.scheduler.config)
    assert karras.config.use_karras_sigmas and karras.config.algorithm_type == "dpmsolver++"
    v_pipe = build_tiny_pipeline(seed=0, prediction_type="v_prediction")
    assert make_scheduler("Euler a", v_pipe.scheduler.config).config.prediction_type == "v_prediction"

    a = previewer.generate(PROMPT, seed=7, **{**FAST, "scheduler": "Euler a"})
    b = previewer.generate(PROMPT, seed=7, **{**FAST, "scheduler": "Euler a"})
    c = previewer.generate(PROMPT, seed=8, **{**FAST, "scheduler": "Euler a"})
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    two = previewer.generate([PROMPT], seed=7, num_images=2, **{**FAST, "scheduler": "Euler a"})
    assert two.shape[0] == 2 and np.abs(two[0] - a[0]).max() <= 1e-5
    wide = previewer.generate(PROMPT, width=48, height=32, **FAST)
    assert wide.shape == (1, 32, 48, 3)
    pil = previewer.generate(PROMPT, steps=1, scheduler="DDIM")
    assert pil[0].size == (32, 32)
    grid = image_grid(pil * 3, labels=["0.0", "0.5", "1.0"])
    # 32 px images are enlarged 8x (nearest neighbour: each pixel a sharp square) under legible labels.
    assert grid.width == 3 * 256 and grid.height > 256 + 20
    cell = np.asarray(grid.crop((0, 0, 256, 256)))
    assert np.array_equal(cell[::8, ::8], np.asarray(pil[0].convert("RGB")))
    assert np.array_equal(cell, np.repeat(np.repeat(cell[::8, ::8], 8, 0), 8, 1))
    label = np.asarray(grid.crop((0, 256, 256, grid.height)).convert("L"))
    dark_rows = np.nonzero((label < 128).any(axis=1))[0]
    assert dark_rows.size and dark_rows.max() - dark_rows.min() >= 12  # text at least 12 px tall
    assert image_grid(pil, min_side=0).size == (32, 32)
    with pytest.raises(LoraError, match="multiple of 2"):
        previewer.generate(PROMPT, width=33, **FAST)
    with pytest.raises(LoraError, match="finite"):
        previewer.set_scale(float("nan"))
    with pytest.raises(LoraError, match="No adapter named 'ghost'"):
        previewer.use_adapter("ghost")
