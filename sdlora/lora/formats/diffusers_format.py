"""The diffusers / PEFT LoRA layout that ``StableDiffusionPipeline.load_lora_weights`` reads.

Keys: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``,
``text_encoder.text_model.<path>.lora_A.weight`` (diffusers drops ``text_model.`` itself when the
loaded ``CLIPTextModel`` has no such level) and, for SDXL's second encoder,
``text_encoder_2.text_model.<path>.lora_A.weight`` (what ``StableDiffusionXLPipeline`` reads). Ranks and alphas go into the
``lora_adapter_metadata`` header entry (JSON of PEFT ``LoraConfig`` arguments per component, the
way diffusers' own ``save_lora_weights`` writes them), so every layer keeps its exact scale.

Reading also accepts older diffusers spellings (``.lora.down.weight``,
``.lora_linear_layer.up.weight``, ``attn1.processor.to_q_lora.down.weight``) and ``.alpha`` keys.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Mapping

import torch

from ..targets import COMPONENTS, Component, is_text_encoder
from ..weights import LoraWeights

METADATA_KEY = "lora_adapter_metadata"
_COMPONENT_PREFIX: dict[Component, str] = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}

# (suffix, role) pairs, longest first so that ".lora.down.weight" is not read as something shorter.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)


def is_diffusers_key(key: str) -> bool:
    return any(key.endswith(s) for s, role in _SUFFIXES if role in ("down", "up"))


def _te_path(path: str) -> str:
    return path[len("text_model.") :] if path.startswith("text_model.") else path


def to_state_dict(weights: LoraWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, path, module in weights.items():
        prefix = "unet." if component == "unet" else f"{component}.text_model."
        out[f"{prefix}{path}.lora_A.weight"] = module.down.detach().to("cpu", dtype).contiguous()
        out[f"{prefix}{path}.lora_B.weight"] = module.up.detach().to("cpu", dtype).contiguous()
    return out


def _config_for(modules: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` arguments that give every module its exact rank and alpha."""
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: float(m.alpha) for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(modules),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


def build_metadata(weights: LoraWeights, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``lora_adapter_metadata`` (per-component LoraConfig arguments) plus ``sdlora_*`` entries."""
    from ... import __version__

    adapter_meta: dict[str, Any] = {}
    for component in COMPONENTS:
        modules = weights.component(component)
        if modules:
            for key, value in _config_for(modules).items():
                adapter_meta[f"{component}.{key}"] = value
    meta = {
        "format": "pt",
        METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True),
        "sdlora_version": __version__,
        "sdlora_method": weights.method,
    }
    if weights.info.get("preset"):
        meta["sdlora_preset"] = str(weights.info["preset"])
    if weights.info.get("spec"):
        meta["sdlora_spec"] = json.dumps(weights.info["spec"])
    meta.update({k: str(v) for k, v in dict(weights.info.get("metadata") or {}).items()})  # method-specific facts
    for key, value in dict(extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def split_key(key: str) -> tuple[Component | None, str, str] | None:
    """(component, canonical module path, role) of a diffusers/PEFT key, or None if not one."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    if stem.startswith("base_model.model."):
        stem = stem[len("base_model.model.") :]
    component: Component | None = None
    for comp, prefix in _COMPONENT_PREFIX.items():
        if stem.startswith(prefix):
            component, stem = comp, stem[len(prefix) :]
            break
    if component is None:
        # A bare PEFT state dict of one model: decide by the module names.
        if re.match(r"^(text_model\.)?encoder\.layers\.", stem):
            component = "text_encoder"
        elif re.match(r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding)", stem):
            component = "unet"
    if component is not None and is_text_encoder(component):
        stem = _te_path(stem)
    # Old attention-processor spelling: attn1.processor.to_q_lora -> attn1.to_q ; to_out_lora -> to_out.0
    stem = stem.replace(".processor.", ".")
    if suffix.startswith("_lora"):
        stem = stem + ".0" if stem.endswith("to_out") else stem
    return component, stem, role


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """Value for ``path`` under PEFT's pattern rule: key matches when ``(.*\\.)?(key)$`` does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path) or re.match(rf"(.*\.)?({key})$", "text_model." + path):
            return value
    return default


def alphas_from_metadata(metadata: Mapping[str, str], component: Component, ranks: Mapping[str, int]) -> dict[str, float]:
    """Per-module alpha from ``lora_adapter_metadata``; alpha = rank (scale 1) without metadata."""
    raw = metadata.get(METADATA_KEY)
    config: dict[str, Any] = {}
    if raw:
        try:
            loaded = json.loads(raw)
            prefix = f"{component}."
            config = {k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)}
        except (json.JSONDecodeError, AttributeError):
            config = {}
    out: dict[str, float] = {}
    for path, rank in ranks.items():
        if not config:
            out[path] = float(rank)
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", r)))
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(rank)
        out[path] = alpha
    return out
