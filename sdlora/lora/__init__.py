"""LoRA adapters for Stable Diffusion: injection, methods registry, runtime controls, files.

Typical use::

    from sdlora.lora import LoraSpec, inject_adapters, save_lora

    adapter = inject_adapters(pipe.unet, pipe.text_encoder, LoraSpec(preset="full", rank=16, text_encoder=True))
    optimizer = torch.optim.AdamW(adapter.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5))
    ...
    save_lora(adapter, "style.safetensors", metadata={"ss_steps": 1000})

SDXL (two text encoders; kohya names in SDXL's original layout)::

    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec, text_encoder_2=pipe.text_encoder_2)
    adapter.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, text_encoder_2_lr=None)  # None: as text_encoder_lr
    save_lora(adapter, "style_xl.safetensors", family="sdxl", resolution=1024)
    load_lora("other_xl.safetensors", pipe.unet, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
"""

from __future__ import annotations

from . import control
from .errors import LoraError, LoraFileError, LoraShapeMismatchError
from .formats import (
    FORMATS,
    LoadReport,
    UnknownKeysWarning,
    convert_lora_file,
    export_from,
    format_inspection,
    inspect_file,
    load_lora,
    match_to_model,
    read_lora_file,
    save_lora,
)
from .inject import LoraAdapter, apply_weights, inject_adapters, safe_adapter_name
from .spec import LoraSpec
from .targets import PRESETS, plan_targets, preset_names
from .variants import AdapterMethod, get_method, method_names
from .weights import LoraWeights, ModuleLora, resize_rank

__all__ = [
    "FORMATS",
    "PRESETS",
    "AdapterMethod",
    "LoadReport",
    "LoraAdapter",
    "LoraError",
    "LoraFileError",
    "LoraShapeMismatchError",
    "LoraSpec",
    "LoraWeights",
    "ModuleLora",
    "UnknownKeysWarning",
    "apply_weights",
    "control",
    "convert_lora_file",
    "export_from",
    "format_inspection",
    "get_method",
    "inject_adapters",
    "inspect_file",
    "load_lora",
    "match_to_model",
    "method_names",
    "plan_targets",
    "preset_names",
    "read_lora_file",
    "resize_rank",
    "safe_adapter_name",
    "save_lora",
]
