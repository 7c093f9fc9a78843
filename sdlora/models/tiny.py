"""Tiny Stable Diffusion models of the real architecture, for tests and quick experiments.

Every part is the diffusers / transformers class used by real SD 1.x checkpoints
(``UNet2DConditionModel`` with cross-attention, ``AutoencoderKL``, ``CLIPTextModel``, the real
CLIP tokenizer), only with very few channels, so a training step takes milliseconds on a CPU.
The UNet has attention Linear layers, resnet Conv2d layers with a ``conv_shortcut``, down/up
sampler convs and ``time_emb_proj``, so every LoRA target preset has something to hit.

:func:`build_tiny_sdxl_pipeline` does the same for SDXL: two text encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``, of different widths as in the real model), a UNet whose first
down block has no attention, ``transformer_layers_per_block`` per block and the ``text_time``
added embedding (pooled text embedding + size/crop time ids), and tokenizers as SDXL's (the
second pads with "!").
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


# Tiny SDXL ------------------------------------------------------------------------------------

TINY_SDXL_TE1_HIDDEN = 32
TINY_SDXL_TE2_HIDDEN = 64  # differs from encoder 1, as 768 vs 1280 does (single-file loaders tell them apart by width)
TINY_SDXL_TE2_PROJECTION = 32
TINY_SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet_config() -> dict:
    """An SDXL-shaped UNet: no attention in the first down block, a transformer depth per block,
    ``text_time`` added embedding; 32 px latents (64 px images with the tiny VAE)."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=TINY_SDXL_TE1_HIDDEN + TINY_SDXL_TE2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        # six time ids (original h, w, crop top, left, target h, w) + the pooled embedding of encoder 2
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TE2_PROJECTION,
        norm_num_groups=32,
    )


def tiny_sdxl_text_config_2():
    """The second (OpenCLIP-like) encoder: GELU, a text projection, pads with "!" (id 0)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TINY_SDXL_TE2_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        projection_dim=TINY_SDXL_TE2_PROJECTION,
        hidden_act="gelu",
    )


def sdxl_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SDXL 1.0 base's scheduler config (Euler, scaled-linear betas, leading spacing)."""
    from .shipped import read_config

    config = {k: v for k, v in read_config("sdxl", "scheduler").items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    return config


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionXLPipeline`` of tiny random-weight models (deterministic for a seed).

    64 px images (32 px latents); ``pipe.text_encoder`` is a ``CLIPTextModel``,
    ``pipe.text_encoder_2`` a ``CLIPTextModelWithProjection``; no watermarker.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import openclip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**{**tiny_vae_config(), "sample_size": 64, "scaling_factor": 0.13025})
    text_encoder = CLIPTextModel(tiny_text_config(TINY_SDXL_TE1_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_sdxl_text_config_2())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=openclip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(sdxl_scheduler_config(prediction_type)),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FAMILIES = ("sd1", "sdxl")


def save_tiny_model(
    out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon", family: str = "sd1"
) -> Path:
    """Write a tiny model (``family`` "sd1" or "sdxl") as a diffusers folder that
    ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained`` loads."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, not {family!r}")
    out = Path(out_dir)
    build = build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_pipeline
    pipe = build(seed=seed, prediction_type=prediction_type)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
