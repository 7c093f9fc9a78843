"""The diffusers configs shipped with the package (no weights), and models built from them.

``sdlora/models/configs/<folder>/`` holds ``model_index.json`` and the ``config.json`` of every
part of a real base model, so that single files load offline and layer names can be resolved
without any weights:

* ``sd1``: SD 1.5 (CLIP ViT-L text encoder, 512 px, epsilon);
* ``sd2``: SD 2.x base (OpenCLIP ViT-H, 512 px, epsilon); ``sd2_v``: SD 2.x 768-v (v-prediction);
* ``sdxl``: SDXL 1.0 base (CLIP ViT-L + OpenCLIP bigG as ``CLIPTextModelWithProjection``, 1024 px).
  v-prediction SDXL models share the architecture; only the scheduler's prediction type differs.

This module is the one place that finds these folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
"""The folder of shipped config folders."""

SHIPPED_FAMILIES = ("sd1", "sd2", "sdxl")

#: the text-encoder parts of each family, in the order the pipeline uses them
TEXT_ENCODER_PARTS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _is_v(prediction_type: str | None) -> bool:
    return str(prediction_type or "epsilon").lower().replace("-", "_") in ("v", "v_prediction", "v_pred", "vpred")


def config_dir(family: str, prediction_type: str = "epsilon") -> Path:
    """The shipped diffusers config folder for a family and prediction type.

    SD 2.x has two folders (512 epsilon, 768 v-prediction); SD 1.x and SDXL one each (their
    v-prediction fine-tunes share the architecture and resolution). Raises ``ValueError`` for a
    family with no shipped configs.
    """
    if family == "sd1":
        return CONFIGS_DIR / "sd1"
    if family == "sd2":
        return CONFIGS_DIR / ("sd2_v" if _is_v(prediction_type) else "sd2")
    if family == "sdxl":
        return CONFIGS_DIR / "sdxl"
    raise ValueError(f"no shipped configs for model family {family!r} (known: {', '.join(SHIPPED_FAMILIES)})")


def read_config(family: str, part: str, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The shipped config of one part (``"unet"``, ``"vae"``, ``"text_encoder"``, ``"text_encoder_2"``,
    ``"scheduler"``, ``"model_index"``) as a dict."""
    folder = config_dir(family, prediction_type)
    if part == "model_index":
        path = folder / "model_index.json"
    elif part == "scheduler":
        path = folder / "scheduler" / "scheduler_config.json"
    else:
        path = folder / part / "config.json"
    if not path.is_file():
        raise ValueError(f"model family {family!r} has no shipped {part} config ({path})")
    return json.loads(path.read_text(encoding="utf-8"))


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def text_encoder_class(family: str, part: str):
    """The transformers class of a text-encoder part (SDXL's second encoder has a projection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if (family == "sdxl" and part == "text_encoder_2") else CLIPTextModel


def meta_models(family: str, prediction_type: str = "epsilon", *, vae: bool = False) -> dict[str, nn.Module]:
    """The UNet and text encoder(s) of a family on the meta device (no memory, about a second).

    Keys: ``"unet"``, ``"text_encoder"`` and, for SDXL, ``"text_encoder_2"``
    (``CLIPTextModelWithProjection``); with ``vae=True`` also ``"vae"``. Built from the shipped
    configs with accelerate's ``init_empty_weights``: module trees and parameter shapes are the real
    ones, tensors hold no data. Raises ``ValueError`` for a family with no shipped configs.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    configs = {"unet": _public(read_config(family, "unet", prediction_type))}
    for part in TEXT_ENCODER_PARTS[family]:
        configs[part] = _public(read_config(family, part, prediction_type))
    if vae:
        configs["vae"] = _public(read_config(family, "vae", prediction_type))
    models: dict[str, nn.Module] = {}
    with init_empty_weights():
        models["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        for part in TEXT_ENCODER_PARTS[family]:
            models[part] = text_encoder_class(family, part)(CLIPTextConfig(**configs[part]))
        if vae:
            models["vae"] = AutoencoderKL.from_config(configs["vae"])
    return models
