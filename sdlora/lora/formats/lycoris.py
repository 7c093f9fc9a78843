"""LyCORIS LoHa / LoKr modules in kohya-named files: tensor names, shapes, reading and writing.

The layout is the one LyCORIS's kohya network writes (``lycoris/modules/loha.py`` and ``lokr.py``,
``custom_state_dict`` / ``weight_list``) and ComfyUI (``comfy/weight_adapter/loha.py``,
``lokr.py``) and A1111 (``extensions-builtin/Lora/network_hada.py``, ``network_lokr.py``) read,
under the same module names as plain LoRA (``lora_unet_…``, ``lora_te_…``, ``lora_te1_/2_…``):

* LoHa: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]``, ``hada_w2_a``, ``hada_w2_b`` (same
  shapes), ``alpha``; Tucker (k x k Conv2d): ``hada_t1``/``hada_t2 [r, r, kh, kw]`` with
  ``hada_w*_a [r, out]``, ``hada_w*_b [r, in]``. Scale ``alpha / hada_w1_b.shape[0]``.
* LoKr: ``lokr_w1 [a, c]`` or ``lokr_w1_a [a, r]`` + ``lokr_w1_b [r, c]``; ``lokr_w2 [b, d]`` /
  ``[b, d, kh, kw]`` or ``lokr_w2_a [b, r]`` + ``lokr_w2_b [r, d*kh*kw]``, or Tucker ``lokr_t2
  [r, r, kh, kw]`` + ``lokr_w2_a [r, b]`` + ``lokr_w2_b [r, d]``; ``alpha``. ``out = a*b``,
  ``in = c*d``. Scale ``alpha / r`` (r from ``lokr_w2_b``, else ``lokr_w1_b``), 1 without either.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from ..errors import LoraFileError
from ..weights import ModuleLoha, ModuleLokr

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
TITLES = {"loha": "LoHa", "lokr": "LoKr"}
#: what other tools do with these files (shown by ``inspect`` and in refusals)
LOADERS = ("A1111/Forge and ComfyUI load it natively; kohya's scripts with the lycoris package; "
           "diffusers cannot load it (it reads only LoRA factors)")


def kind_of(suffix: str) -> str | None:
    """"loha" / "lokr" for a LoHa / LoKr tensor name (``hada_w1_a`` ...), else None."""
    if suffix in LOHA_ROLES:
        return "loha"
    if suffix in LOKR_ROLES:
        return "lokr"
    return None


def module_tensors(module: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file tensors of a LoHa / LoKr module by suffix (without ``alpha``)."""
    if isinstance(module, ModuleLoha):
        named = {"hada_w1_a": module.w1_a, "hada_w1_b": module.w1_b, "hada_w2_a": module.w2_a,
                 "hada_w2_b": module.w2_b, "hada_t1": module.t1, "hada_t2": module.t2}
    elif isinstance(module, ModuleLokr):
        named = {"lokr_w1": module.w1, "lokr_w1_a": module.w1_a, "lokr_w1_b": module.w1_b, "lokr_w2": module.w2,
                 "lokr_w2_a": module.w2_a, "lokr_w2_b": module.w2_b, "lokr_t2": module.t2}
    else:
        raise TypeError(f"not a LoHa / LoKr module: {type(module).__name__}")
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in named.items() if v is not None}


def _mm_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        return None
    return int(a.shape[0]), int(b.shape[1])


def _tucker_shape(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[int, ...] | None:
    if t.ndim != 4 or wa.ndim != 2 or wb.ndim != 2 or (t.shape[0], t.shape[1]) != (wa.shape[0], wb.shape[0]):
        return None
    return int(wa.shape[1]), int(wb.shape[1]), int(t.shape[2]), int(t.shape[3])


def _fits(implied: tuple[int, ...] | None, weight: tuple[int, ...]) -> bool:
    """Whether factors implying ``implied`` fill a layer weight of shape ``weight`` (2-d: flattened kernel)."""
    if implied is None:
        return False
    if len(implied) == 4:
        return tuple(implied) == tuple(weight) or (len(weight) == 2 and implied[2:] == (1, 1) and implied[:2] == weight)
    return implied == (weight[0], math.prod(weight[1:]))


def build_module(
    kind: str, tensors: Mapping[str, torch.Tensor], alpha: float | None, weight_shape: tuple[int, ...],
    mismatch: Callable[[str, str], Exception], name: str,
) -> ModuleLoha | ModuleLokr:
    """A LoHa / LoKr module from a file's tensors (by suffix) for a layer whose weight has ``weight_shape``.

    ``mismatch(what, key_suffix)`` makes the error for factors that do not fit the layer; a module
    missing a tensor it needs raises :class:`LoraFileError` naming ``name``.
    """
    t = {k: v.float() for k, v in tensors.items()}
    title = TITLES[kind]

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in t]
        if missing:
            raise LoraFileError(f"{title} module '{name}' lacks {', '.join(missing)}.")

    if kind == "loha":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        tucker = "hada_t1" in t or "hada_t2" in t
        if tucker:
            need("hada_t1", "hada_t2")
            parts = [_tucker_shape(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]),
                     _tucker_shape(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])]
        else:
            parts = [_mm_shape(t["hada_w1_a"], t["hada_w1_b"]), _mm_shape(t["hada_w2_a"], t["hada_w2_b"])]
        for implied, key in zip(parts, ("hada_w1_a", "hada_w2_a")):
            if not _fits(implied, weight_shape):
                raise mismatch(f"factors for a {list(implied) if implied else 'malformed'} weight", key)
        rank = int(t["hada_w1_b"].shape[0])
        return ModuleLoha(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                          float(rank if alpha is None else alpha), tuple(weight_shape),
                          t.get("hada_t1"), t.get("hada_t2"))

    # LoKr
    if "lokr_w1" in t:
        w1 = (tuple(t["lokr_w1"].shape) if t["lokr_w1"].ndim == 2 else None)
    else:
        need("lokr_w1_a", "lokr_w1_b")
        w1 = _mm_shape(t["lokr_w1_a"], t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2: tuple[int, ...] | None = tuple(t["lokr_w2"].shape) if t["lokr_w2"].ndim in (2, 4) else None
    elif "lokr_t2" in t:
        need("lokr_w2_a", "lokr_w2_b")
        w2 = _tucker_shape(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        need("lokr_w2_a", "lokr_w2_b")
        w2 = _mm_shape(t["lokr_w2_a"], t["lokr_w2_b"])
    implied: tuple[int, ...] | None = None
    if w1 is not None and w2 is not None:
        implied = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    if not _fits(implied, weight_shape):
        raise mismatch(f"factors for a {list(implied) if implied else 'malformed'} weight", "lokr_w1" if "lokr_w1" in t else "lokr_w1_a")
    rank = int(t["lokr_w2_b"].shape[0]) if "lokr_w2_b" in t else int(t["lokr_w1_b"].shape[0]) if "lokr_w1_b" in t else None
    return ModuleLokr(float(alpha if alpha is not None else (rank or 1)), tuple(weight_shape), t.get("lokr_w1"),
                      t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"), t.get("lokr_w2_a"),
                      t.get("lokr_w2_b"), t.get("lokr_t2"))


def entry_info(kind: str, shapes: Mapping[str, list[int]]) -> dict[str, Any]:
    """What ``inspect`` can tell of a LoHa / LoKr module from its tensor shapes alone: ``rank``,
    ``fan_in`` where the shapes give it (Linear layers), ``tucker``."""
    info: dict[str, Any] = {}
    if kind == "loha":
        if "hada_w1_b" in shapes:
            info["rank"] = int(shapes["hada_w1_b"][0])
            if "hada_t1" in shapes:
                info["fan_in"] = int(shapes["hada_w1_b"][1])
                info["kind"], info["kernel"] = "conv2d", list(shapes["hada_t1"][2:])
            else:
                info["flat_in"] = int(shapes["hada_w1_b"][1])
        return info
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in shapes:
            info["rank"] = int(shapes[key][0])
            break
    c = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes.get("lokr_w1_b", [0, 0])[1]
    if "lokr_t2" in shapes or len(shapes.get("lokr_w2", [])) == 4:
        info["kind"] = "conv2d"
        info["kernel"] = list((shapes.get("lokr_t2") or shapes["lokr_w2"])[2:])
        d = shapes["lokr_w2_b"][1] if "lokr_t2" in shapes else shapes["lokr_w2"][1]
        info["fan_in"] = int(c * d)
    else:
        d = shapes["lokr_w2"][1] if "lokr_w2" in shapes else shapes.get("lokr_w2_b", [0, 0])[1]
        info["flat_in"] = int(c * d)
    return info


__all__ = ["LOADERS", "LOHA_ROLES", "LOKR_ROLES", "TITLES", "build_module", "entry_info", "kind_of", "module_tensors"]
