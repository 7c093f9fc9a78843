"""Tiny Stable Diffusion models of the real architecture, for tests and quick experiments.

Every part is the diffusers / transformers class used by real SD 1.x checkpoints
(``UNet2DConditionModel`` with cross-attention, ``AutoencoderKL``, ``CLIPTextModel``, the real
CLIP tokenizer), only with very few channels, so a training step takes milliseconds on a CPU.
The UNet has attention Linear layers, resnet Conv2d layers with a ``conv_shortcut``, down/up
sampler convs and ``time_emb_proj``, so every LoRA target preset has something to hit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, clip_tokenizer


def tiny_unet_config(cross_attention_dim: int = 32, prediction_type: str | None = None) -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_text_config(hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",
    )


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` of tiny random-weight models (deterministic for a seed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(tiny_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny model as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(seed=seed, prediction_type=prediction_type)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
