"""The kohya / A1111 LoRA layout (``lora_unet_…``, ``lora_te_text_model_…``) and its metadata.

Layout (what A1111, Forge, ComfyUI and kohya's sd-scripts load for SD 1.x/2.x):

* key ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, ``<module>.alpha`` (0-dim),
  ``<module>.dora_scale`` for DoRA; LoHa / LoKr modules hold LyCORIS's ``hada_*`` / ``lokr_*``
  tensors instead of ``lora_down``/``lora_up`` (see ``formats/lycoris.py``);
* SD 1.x/2.x: ``<module>`` is ``lora_unet_`` + the diffusers UNet path with ``.`` -> ``_``, or
  ``lora_te_text_model_`` + the CLIP text-model path (the ``text_model_`` part is required by
  A1111 and kohya even though transformers 5 has no ``text_model`` level).
* SDXL (what kohya sd-scripts writes): UNet modules by their path in SDXL's original (SGM) UNet,
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  ``lora_unet_middle_block_1_…``, ``lora_unet_output_blocks_2_1_…``, convs such as
  ``lora_unet_input_blocks_1_0_in_layers_2``; text encoders ``lora_te1_text_model_…`` (CLIP
  ViT-L) and ``lora_te2_text_model_…`` (OpenCLIP bigG).

The model family decides the names (``family`` arguments, "sd1" / "sd2" / "sdxl").

Reading accepts all of these for any family: ``lora_te_``/``lora_te1_`` and names without
``text_model_`` for the (first) text encoder, ``lora_te2_`` for the second, and both the
diffusers-path and the original-layout (LDM/SGM) UNet names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from collections import Counter
from typing import Any, Mapping

import torch
from torch import nn

from ..targets import LAYOUT_KEYS, Component, iter_adaptable, unet_layout
from ..weights import LoraWeights, ModuleLora
from ...models.unet_names import original_module_paths, to_original
from . import lycoris

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_text_model_"
#: SDXL's text-encoder prefixes (kohya's lora_te1_ / lora_te2_)
SDXL_TE_PREFIXES: dict[str, str] = {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}
_TE_READ_PREFIXES = ("lora_te_text_model_", "lora_te1_text_model_", "lora_te_", "lora_te1_")
_TE2_READ_PREFIXES = ("lora_te2_text_model_", "lora_te2_")
FAMILIES = ("sd1", "sd2", "sdxl")


#: suffixes of a plain LoRA module's tensors
PLAIN_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_OTHER_METHODS: tuple[tuple[str, str], ...] = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("oft_", "OFT"),
    ("lora_mid.", "LoCon (Tucker)"),
    ("diff", "full-weight diff"),
    ("w_norm", "GLoRA"),
    ("a1.", "GLoRA"),
    ("a2.", "GLoRA"),
    ("b1.", "GLoRA"),
    ("b2.", "GLoRA"),
)


def other_method(suffix: str) -> str | None:
    """The LyCORIS-style method a tensor suffix belongs to, if it is not part of plain LoRA."""
    for prefix, label in _OTHER_METHODS:
        if suffix.startswith(prefix):
            return label
    return None


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)} for a kohya LoRA file, got {family!r}")
    return family


def _sdxl_layout() -> dict[str, Any]:
    from ...models.shipped import read_config

    return {k: read_config("sdxl", "unet")[k] for k in LAYOUT_KEYS}


def sgm_path(canonical: str, layout: Mapping[str, Any]) -> str | None:
    """The path of a diffusers UNet module in the original (SGM/LDM) UNet of that layout, or None."""
    return to_original(canonical, dict(layout))


def module_name(component: Component, canonical: str, family: str = "sd1",
                layout: Mapping[str, Any] | None = None) -> str:
    """The kohya module name of a layer for a model family.

    SD 1.x/2.x: ``lora_unet_<diffusers path>`` / ``lora_te_text_model_…``. SDXL:
    ``lora_unet_<SGM path>`` (``layout``: the UNet's block layout, default SDXL's own; a module
    with no SGM counterpart keeps its diffusers path) and ``lora_te1_…`` / ``lora_te2_…``.
    """
    check_family(family)
    if component == "unet":
        path = canonical
        if family == "sdxl":
            path = sgm_path(canonical, layout or _sdxl_layout()) or canonical
        return UNET_PREFIX + path.replace(".", "_")
    if family == "sdxl":
        return SDXL_TE_PREFIXES[component] + canonical.replace(".", "_")
    if component != "text_encoder":
        raise ValueError(f"an {family} LoRA has one text encoder; these weights also adapt {component!r} (an SDXL part)")
    return TE_PREFIX + canonical.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """("lora_unet_x", "lora_down.weight") for ``lora_unet_x.lora_down.weight``."""
    name, _, suffix = key.partition(".")
    return name, suffix


def is_kohya_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))


def to_state_dict(weights: LoraWeights, dtype: torch.dtype, family: str = "sd1") -> dict[str, torch.Tensor]:
    """Tensors of the kohya file for ``weights`` (``alpha`` stays float32: 0.1 is not exact in fp16).

    SDXL UNet names follow the block layout in ``weights.info["unet_layout"]`` (set by
    ``LoraAdapter.export`` and ``match_to_model``), else SDXL 1.0's.
    """
    layout = weights.info.get("unet_layout") if family == "sdxl" else None
    out: dict[str, torch.Tensor] = {}
    for component, path, module in weights.items():
        name = module_name(component, path, family, layout)  # type: ignore[arg-type]
        if f"{name}.alpha" in out:
            raise ValueError(f"two layers map to the kohya module name {name!r}")
        if isinstance(module, ModuleLora):
            out[f"{name}.lora_down.weight"] = module.down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = module.up.detach().to("cpu", dtype).contiguous()
        else:  # LoHa / LoKr factors in the LyCORIS layout
            out.update({f"{name}.{suffix}": t for suffix, t in lycoris.module_tensors(module, dtype).items()})
        out[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
        if module.dora_scale is not None:
            out[f"{name}.dora_scale"] = module.dora_scale.detach().to("cpu", dtype).contiguous()
    return out


def name_index(
    unet: nn.Module | None, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None = None
) -> dict[str, tuple[Component, str]]:
    """Every kohya module name that can refer to a layer of these models -> (component, path).

    UNet layers answer to their diffusers path and their original-layout (LDM/SGM) path, the
    first text encoder to ``lora_te_`` / ``lora_te1_`` names, the second (SDXL) to ``lora_te2_``.
    """
    index: dict[str, tuple[Component, str]] = {}
    if unet is not None:
        for _, canonical, _ in iter_adaptable(unet, "unet"):
            index[UNET_PREFIX + canonical.replace(".", "_")] = ("unet", canonical)
        adaptable = [canonical for _, canonical, _ in iter_adaptable(unet, "unet")]
        for canonical, ldm in original_module_paths(unet, adaptable).items():
            index.setdefault(UNET_PREFIX + ldm.replace(".", "_"), ("unet", canonical))
    for component, model, prefixes in (
        ("text_encoder", text_encoder, _TE_READ_PREFIXES), ("text_encoder_2", text_encoder_2, _TE2_READ_PREFIXES)
    ):
        if model is None:
            continue
        for _, canonical, _ in iter_adaptable(model, component):  # type: ignore[arg-type]
            flat = canonical.replace(".", "_")
            for prefix in prefixes:
                index.setdefault(prefix + flat, (component, canonical))  # type: ignore[arg-type]
    return index


# Metadata ---------------------------------------------------------------------------------------

def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def derived_network_values(weights: LoraWeights) -> dict[str, Any]:
    """kohya's network_dim/alpha (Linear and 1x1 layers) and conv_dim/conv_alpha (larger kernels)."""
    def big_kernel(m: Any) -> bool:
        return m.is_conv and tuple(m.kernel_size) != (1, 1)

    # a LoKr layer of two full matrices has no rank (scale 1): it says nothing about network_dim
    modules = [m for _, _, m in weights.items() if m.rank is not None]
    linear = [m for m in modules if not big_kernel(m)]
    conv = [m for m in modules if big_kernel(m)]
    unet_linear = [m for m in weights.unet.values() if m.rank is not None and not big_kernel(m)] or linear
    dim = _most_common([m.rank for m in unet_linear], None)
    alpha = _most_common([m.alpha for m in unet_linear if m.rank == dim], None)
    out: dict[str, Any] = {"dim": dim, "alpha": alpha}
    if conv:
        conv_dim = _most_common([m.rank for m in conv], None)
        out["conv_dim"] = conv_dim
        out["conv_alpha"] = _most_common([m.alpha for m in conv if m.rank == conv_dim], None)
    return out


def _architecture(family: str, prediction_type: str) -> str:
    # kohya's sai_model_spec: SDXL has one architecture name whatever the prediction type
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if family == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def base_model_version(family: str, prediction_type: str) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``/``sd_v2`` (+ ``_v`` for v-prediction), and
    ``sdxl_base_v1-0`` for every SDXL model (kohya marks v-prediction SDXL only by
    ``ss_v_parameterization`` and ``modelspec.prediction_type``)."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if prediction_type == "v" else "")


#: the native resolution of each family (used when the caller gives none)
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def resolution_text(resolution: Any) -> str:
    """``modelspec.resolution`` text ("WxH") from an int, a (width, height) pair or "WxH"/"W,H" text."""
    if isinstance(resolution, bool):
        raise ValueError(f"not a resolution: {resolution!r}")
    if isinstance(resolution, int):
        return f"{resolution}x{resolution}"
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        return f"{int(resolution[0])}x{int(resolution[1])}"
    if isinstance(resolution, str):
        numbers = [int(n) for n in re.findall(r"\d+", resolution)]
        if len(numbers) == 1:
            return f"{numbers[0]}x{numbers[0]}"
        if len(numbers) == 2:
            return f"{numbers[0]}x{numbers[1]}"
    raise ValueError(f"not a resolution: {resolution!r} (give an int, (width, height) or 'WxH')")


def _hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor data) and ``sshs_legacy_hash``.

    Both are computed over the file as serialised with only the ``ss_*`` metadata, as kohya does,
    so tools that index LoRAs by these hashes see the values they expect.
    """
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def build_metadata(
    weights: LoraWeights,
    tensors: Mapping[str, torch.Tensor],
    *,
    family: str = "sd1",
    prediction_type: str = "epsilon",
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
    resolution: Any = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and ``modelspec.*`` metadata: what can be derived, then the caller's values.

    ``extra`` holds what only the caller knows (``ss_steps``, ``ss_num_train_images``,
    ``ss_resolution``, ``ss_tag_frequency``, ``modelspec.title``, ...); values that are not strings
    are written as kohya writes them (JSON for dicts/lists, ``True``/``False`` for booleans).
    Caller values win over derived ones. ``resolution`` (the training resolution: an int,
    (width, height) or "WxH") gives ``modelspec.resolution``; without it ``extra``'s
    ``ss_resolution`` does, else the family's native size.
    """
    from ... import __version__

    check_family(family)
    pred = "v" if prediction_type in ("v", "v_prediction") else "epsilon"
    extra = dict(extra or {})
    if resolution is None and extra.get("ss_resolution") is not None:
        try:
            resolution = resolution_text(extra["ss_resolution"])
        except ValueError:
            resolution = None
    if resolution is None:
        resolution = 768 if family == "sd2" and pred == "v" else DEFAULT_RESOLUTION[family]
    info = weights.info
    net = derived_network_values(weights)
    network_args: dict[str, str] = {}
    algos = weights.kinds() & set(lycoris.TITLES)
    if len(algos) == 1:  # LyCORIS's kohya network records its algorithm
        network_args["algo"] = algos.pop()
    if "conv_dim" in net:
        network_args["conv_dim"] = _fmt_number(net["conv_dim"])
        network_args["conv_alpha"] = _fmt_number(net["conv_alpha"])
    network_args.update({k: _stringify(v) for k, v in dict(info.get("network_args") or {}).items()})

    meta: dict[str, Any] = {
        "ss_network_module": info.get("network_module") or ("lycoris.kohya" if "algo" in network_args else "networks.lora"),
        "ss_network_dim": net["dim"],
        "ss_network_alpha": float(net["alpha"]) if net["alpha"] is not None else None,
        "ss_base_model_version": base_model_version(family, pred),
        "ss_v2": family == "sd2",
        "ss_v_parameterization": pred == "v",
        "ss_network_train_unet_only": not (weights.text_encoder or weights.text_encoder_2),
        "ss_network_train_text_encoder_only": not weights.unet,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_architecture(family, pred)}/lora",
        # kohya: SDXL LoRAs name Stability's original (SGM) modules, SD 1.x/2.x ones diffusers'
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": title or "LoRA",
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": resolution_text(resolution),
        "modelspec.prediction_type": pred,
        "sdlora_version": __version__,
        "sdlora_method": weights.method,
    }
    if network_args:
        meta["ss_network_args"] = network_args
    if info.get("dropout"):
        meta["ss_network_dropout"] = info["dropout"]
    if info.get("preset"):
        meta["sdlora_preset"] = info["preset"]
    if info.get("spec"):
        meta["sdlora_spec"] = info["spec"]
    if title:
        meta["ss_output_name"] = title
    meta.update(dict(info.get("metadata") or {}))  # method-specific facts of this export
    for key, value in extra.items():
        meta[key] = value
    strings = {k: _stringify(v) for k, v in meta.items() if v is not None}
    if "sshs_model_hash" not in strings:
        strings["sshs_model_hash"], strings["sshs_legacy_hash"] = _hashes(tensors, strings)
    return strings


def parse_network_args(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("ss_network_args")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_raw": raw}


def to_float(value: torch.Tensor | float) -> float:
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(number):
        raise ValueError(f"non-finite alpha {number}")
    return number


__all__ = [
    "FAMILIES",
    "base_model_version",
    "check_family",
    "resolution_text",
    "sgm_path",
    "unet_layout",
    "other_method",
    "PLAIN_SUFFIXES",
    "build_metadata",
    "derived_network_values",
    "is_kohya_key",
    "module_name",
    "name_index",
    "parse_network_args",
    "split_key",
    "to_state_dict",
]
