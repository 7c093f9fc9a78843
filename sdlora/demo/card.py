"""The model card (README.md) of the demo base model, written from the run's settings and measures."""

from __future__ import annotations

import os
from pathlib import Path

from . import world
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, RESOLUTION, TEXT_HIDDEN, unet_config, vae_config


def _folder_sizes(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def write_model_card(folder: str | Path, cfg: dict, report: dict, params: dict[str, int] | None = None,
                     seconds_per_image: float | None = None, notes: str | None = None) -> Path:
    """Write ``folder/README.md`` describing how the model was made, what it draws and how well.

    ``notes`` (Markdown) is added under "Notes on this build", e.g. settings changed while resuming.
    """
    folder = Path(folder)
    sizes = _folder_sizes(folder)
    total = sum(s for _, s in sizes)
    held = "\n".join(f"- {c} {s} on a {b} background" for c, s, b in world.HELD_OUT)
    unet = unet_config()
    vae = vae_config()
    param_lines = ""
    if params:
        param_lines = "\n".join(f"- {k}: {v / 1e6:.2f} M parameters" for k, v in params.items()) + "\n"
    speed = (f"- one {DEFAULT_STEPS}-step image with guidance on a 2-core laptop-class CPU: about "
             f"{seconds_per_image:.2f} s\n") if seconds_per_image else ""
    settings = "\n".join(f"| `{k}` | {v} |" for k, v in cfg.items())
    files = "\n".join(f"| `{n}` | {s / 1e6:.2f} MB |" for n, s in sizes)
    text = f"""# sdlora demo base model

A small text-to-image model of the Stable Diffusion 1.x architecture, trained from scratch on a
synthetic world of simple shapes so that the whole app (pick a style set, train a LoRA, slide the
scale, see the style appear) works offline on a laptop CPU in minutes. It is a real diffusers
`StableDiffusionPipeline` folder:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("sdlora/sample_data/demo-model")
image = pipe("a red star on a white background", num_inference_steps={DEFAULT_STEPS},
             guidance_scale={DEFAULT_GUIDANCE}).images[0]
```

## What it draws

{RESOLUTION} x {RESOLUTION} px images of one shape on a plain background. Prompts follow the
training captions: `a [small|large] <colour> <shape> on a <background> background`

- colours: {", ".join(world.COLORS)}
- shapes: {", ".join(world.SHAPES)}
- backgrounds: {", ".join(world.BACKGROUNDS)}
- sizes: small, (medium: no size word), large; the position is random

These colour x shape x background combinations were held out of training (the model composes them
from the words alone):

{held}

`samples.png` shows samples: the held-out combinations first, then training prompts.

## Prompt following (held-out combinations)

Measured by `sdlora.demo.metrics.evaluate_prompt_following` on {report["n"]} images
({report["steps"]} DPM-Solver++ steps, guidance {report["guidance"]}): the colour is read from the
foreground pixels, the shape by a nearest-centroid classifier built from renders.

| measure | accuracy |
|---|---|
| colour | {report["color_accuracy"]:.0%} |
| shape | {report["shape_accuracy"]:.0%} |
| background | {report["background_accuracy"]:.0%} |

## Default sampler settings

The saved scheduler is DPM-Solver++ 2M (`DPMSolverMultistepScheduler`, SD 1.x noise schedule:
scaled linear betas 0.00085-0.012, 1000 training steps, epsilon prediction). Recommended:
`num_inference_steps={DEFAULT_STEPS}`, `guidance_scale={DEFAULT_GUIDANCE}`, `height=width={RESOLUTION}`
(the pipeline's default size). DDIM with 20-25 steps works too.

{speed}
## Architecture and sizes

- UNet: `UNet2DConditionModel`, blocks {unet["down_block_types"]} / {unet["up_block_types"]},
  mid block `{unet["mid_block_type"]}`, channels {unet["block_out_channels"]},
  {unet["layers_per_block"]} layer(s) per block, cross-attention dim {unet["cross_attention_dim"]},
  latents 4 x {unet["sample_size"]} x {unet["sample_size"]}
- VAE: `AutoencoderKL`, channels {vae["block_out_channels"]} (4x down), 4 latent channels
- text encoder: `CLIPTextModel`, hidden size {TEXT_HIDDEN}, 3 layers, 4 heads, the full CLIP vocabulary
  (49408 tokens) with the real CLIP tokenizer (the one of SD 1.x)
{param_lines}
Weights are stored in fp16 to keep the folder small; the configs say float32, so a plain
`from_pretrained` loads them into fp32 modules (what a CPU runs). The text encoder file uses the
standard `text_model.`-prefixed key layout, which transformers 4.x and 5.x both load.

| file | size |
|---|---|
{files}
| total | {total / 1e6:.2f} MB |

## How it was made

```
python -m sdlora.demo.train_base --out sdlora/sample_data/demo-model --work-dir /tmp/demo-work
```

(also `sdlora demo-base train --out DIR`). Resumable: the work dir keeps checkpoints; rerun the
same command to continue, `--max-minutes N` stops cleanly after N minutes. Stages:

1. the VAE learns to reconstruct renders plus random textures (stripes at any angle, outlines,
   grain, any colours), so it can also show looks the UNet never saw;
2. {cfg.get("num_cached")} base scenes (training combinations only) are rendered and encoded once;
3. UNet and text encoder train jointly on those latents: epsilon prediction, min-SNR weighting
   (gamma {cfg.get("min_snr_gamma")}), {int(100 * cfg.get("caption_dropout", 0))} % captions dropped for
   classifier-free guidance, AdamW with cosine decay, EMA of the weights (the EMA is what is saved);
4. the VAE decoder trains {cfg.get("decoder_steps")} more steps with the encoder frozen (same latent
   space, sharper colours);
5. export: this folder, `samples.png` and the measures above.

Settings:

| setting | value |
|---|---|
{settings}

{("## Notes on this build" + chr(10) + chr(10) + notes.strip() + chr(10) + chr(10)) if notes else ""}## Style sets

`sdlora/sample_data/styles/` holds style sets drawn by the same renderer in looks this model never saw
(`python -m sdlora.demo.styles` regenerates them); `sdlora.demo.metrics.style_score`
measures each look.
"""
    path = folder / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
