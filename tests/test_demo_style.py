"""A style LoRA is really learned on the bundled demo model (the bundled demo_style config, the outline set).

Trains with the real trainer, then slides the scale: the style metric rises with the scale and is
clearly above the base at 1.0, the content (colour, shape) is kept, scale 0 is the base exactly,
and the exported kohya file gives the same pictures in a fresh diffusers pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.models.loading import DEFAULT_BASE
from sdlora.resources import CONFIGS_DIR, style_dir

CONFIG = CONFIGS_DIR / "demo_style.toml"

pytestmark = pytest.mark.slow  # trains 600 steps


@pytest.fixture(scope="module")
def trained_style(tmp_path_factory):
    from sdlora.train.config import TrainConfig
    from sdlora.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads() if threads > 1 else 2)))
    try:
        out = tmp_path_factory.mktemp("style")
        cfg = TrainConfig.from_toml(CONFIG, [f"output_dir={out}", "sample_every_n_steps=0", "save_every_n_steps=0"])
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert result.state == "done"
    return cfg, result.lora_path


def test_style_rises_with_scale_and_content_is_kept(trained_style, artifacts_dir):
    from PIL import Image

    from sdlora.generate import Previewer
    from sdlora.demo.metrics import style_score
    from sdlora.demo.style_eval import evaluate_style, save_scale_grid

    cfg, lora = trained_style
    prev = Previewer("demo")
    prev.set_loras([(lora, 1.0)])
    rep = evaluate_style(prev, "outline", cfg.trigger_word, scales=(0.0, 0.5, 1.0), n=12)
    save_scale_grid(rep, artifacts_dir / "demo-style-outline.png")
    s0, s05, s1 = rep.style_scores
    assert s0 < s05 < s1, rep.style_scores
    # A clear margin: at least a quarter of the way from the base to the style set's own score (the
    # outline metric is the hollow share of a shape, about 0.28 on the set itself and 0 on the base).
    own = style_score([Image.open(p) for p in sorted(style_dir("outline").glob("*.png"))], "outline")
    assert s1 - s0 >= 0.25 * (own - s0), (rep.style_scores, own)
    assert rep.color_accuracy[2] >= 0.9 * rep.color_accuracy[0], rep.color_accuracy
    assert rep.shape_accuracy[2] >= 0.9 * rep.shape_accuracy[0], rep.shape_accuracy

    # Scale 0 is the base model, pixel for pixel.
    plain = Previewer("demo")
    base = plain.generate(f"a red circle on a white background, in {cfg.trigger_word} style", seed=5, steps=20,
                          scheduler="dpmpp_2m", output="np")
    zero = prev.generate(f"a red circle on a white background, in {cfg.trigger_word} style", seed=5, steps=20,
                         scheduler="dpmpp_2m", scale=0.0, output="np")
    assert np.array_equal(base, zero)


def test_exported_file_matches_preview_in_fresh_diffusers(trained_style):
    from diffusers import StableDiffusionPipeline

    from sdlora.generate import Previewer

    cfg, lora = trained_style
    prompt = f"a green star on a black background, in {cfg.trigger_word} style"
    prev = Previewer("demo")
    prev.set_loras([(lora, 1.0)])
    ours = prev.generate(prompt, seed=3, steps=20, guidance=6.0, scheduler="ddim", output="np")

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_BASE, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(prompt, num_inference_steps=20, guidance_scale=6.0, generator=torch.Generator().manual_seed(3),
                  output_type="np").images
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
