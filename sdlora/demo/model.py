"""The demo base model: real Stable Diffusion parts at a size that trains on a laptop CPU.

The parts are the classes of Stable Diffusion 1.x - ``AutoencoderKL``, ``UNet2DConditionModel`` with
cross-attention down/up blocks and an attention mid block, ``CLIPTextModel`` with the real CLIP
tokenizer, a DPM-Solver++ scheduler with the SD 1.x noise schedule - only with few channels and
layers. :func:`save_demo_model` writes them as a diffusers folder that
``StableDiffusionPipeline.from_pretrained`` loads with no arguments, with the text encoder in the
standard ``text_model.``-prefixed key layout that transformers 4.x and other SD tools expect.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..models.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, clip_tokenizer

#: Image side in pixels the demo model is trained for.
RESOLUTION = 64
#: Default sampler settings (recorded in the model card; the scheduler saved is DPM-Solver++ 2M).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 6.0
TEXT_HIDDEN = 64


def unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments: SD 1.x block layout with (64, 128, 128) channels."""
    return dict(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` arguments: three blocks, so 64 x 64 px images become 4 x 16 x 16 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )


def text_config():
    """``CLIPTextConfig`` of the demo text encoder (full CLIP vocabulary, hidden size 64, 3 layers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
    )


def scheduler_config_kwargs() -> dict[str, Any]:
    """Noise schedule of SD 1.x (scaled linear betas 0.00085-0.012, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )


def build_vae(seed: int = 0):
    """A fresh (random) ``AutoencoderKL`` of the demo architecture; the same as ``build_models(seed)[0]``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def build_models(seed: int = 0):
    """Fresh (random) ``(vae, unet, text_encoder)`` of the demo architecture, deterministic for ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_config())
    return vae, unet, text_encoder


def sampler_scheduler():
    """The default sampler: DPM-Solver++ (2M) with the SD 1.x noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        **scheduler_config_kwargs(), algorithm_type="dpmsolver++", solver_order=2
    )


def prefixed_text_encoder_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's weights in the standard CLIP key layout (``text_model.`` prefix).

    transformers 5 names ``CLIPTextModel`` weights without the prefix; transformers 4.x, A1111 and
    kohya look for ``text_model.embeddings...`` and would silently keep random weights otherwise.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        out[name] = value.detach().contiguous().clone()
    return out


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_demo_model(out_dir: str | Path, vae, unet, text_encoder, dtype: torch.dtype = torch.float16) -> Path:
    """Write the demo model as a diffusers ``StableDiffusionPipeline`` folder.

    Weights are stored in ``dtype`` (fp16 by default, to keep the folder small); every config says
    ``float32`` so that plain ``from_pretrained`` calls load them into fp32 modules, which is what
    CPUs run. The text encoder file uses the ``text_model.``-prefixed key layout.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=sampler_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Configs, tokenizer, scheduler and model_index.json through diffusers itself ...
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for sub in ("unet", "vae", "text_encoder"):
            for f in Path(tmp, sub).glob("*.safetensors"):
                f.unlink()
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = out / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    # The slow-tokenizer files too (transformers 4.x loads ``CLIPTokenizer`` from vocab.json/merges.txt).
    from ..models.tokenizer import TOKENIZER_DIR

    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        src = TOKENIZER_DIR / name
        if src.is_file() and not (out / "tokenizer" / name).exists():
            _atomic_write_text(out / "tokenizer" / name, src.read_text(encoding="utf-8"))
    # ... then the weights ourselves, in the chosen dtype and (text encoder) key layout.
    def cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}

    _atomic_save_safetensors(cast(unet.state_dict()), out / "unet" / "diffusion_pytorch_model.safetensors")
    _atomic_save_safetensors(cast(vae.state_dict()), out / "vae" / "diffusion_pytorch_model.safetensors")
    _atomic_save_safetensors(cast(prefixed_text_encoder_state(text_encoder)), out / "text_encoder" / "model.safetensors")
    te_cfg_path = out / "text_encoder" / "config.json"
    te_cfg = json.loads(te_cfg_path.read_text(encoding="utf-8"))
    te_cfg["dtype"] = "float32"
    te_cfg["torch_dtype"] = "float32"
    _atomic_write_text(te_cfg_path, json.dumps(te_cfg, indent=2, sort_keys=True) + "\n")
    return out
