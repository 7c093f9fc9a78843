"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), in the
layout A1111 and ComfyUI load (``<module>.dora_scale``).

The paper (Eq. 5) writes the adapted weight as a magnitude times a unit direction::

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          (s = alpha / r)

with the norm ``||.||_c`` taken per column and ``m`` initialised to ``||W0||_c``, so a fresh
adapter (``B = 0``) leaves the layer unchanged. Following Sec. 4.3 the norm is treated as a
constant in the backward pass (detached).

Which axis is a "column" is where tools differ. A1111 (``extensions-builtin/Lora/network.py``,
``NetworkModule.apply_weight_decompose``) and ComfyUI (``comfy/weight_adapter/base.py``,
``weight_decompose``) both normalise ``merged.transpose(0, 1).reshape(in, -1)``: one norm per
**input** channel over the output (and kernel) axes, i.e. the columns of the ``[out, in]`` torch
weight, and read ``dora_scale`` with shape ``[1, in]`` (Linear) or ``[1, in, 1, 1]`` (Conv2d)
(LyCORIS ``dora_wd=True, wd_on_output=False``). PEFT's ``use_dora`` keeps one magnitude per
**output** row instead, which those tools would broadcast into a different weight, so PEFT's
implementation cannot be exported to this layout; this module implements the A1111/ComfyUI
form as a PEFT ``LoraVariant`` on PEFT's own LoRA layers (Linear and Conv2d).

A multiplier (preview scale, A1111's ``<lora:name:w>``, ComfyUI's strength) ``w`` interpolates
between the base weight and the DoRA weight, as both tools do::

    W(w) = W0 + w * (W' - W0)

With ``g = m / ||W0 + s B A||_c`` (one factor per input channel) ``W' x = (W0 + s B A)(g * x)``,
so the layer computes ``W0 x + w * (W0 ((g - 1) * x) + s B (A (g * x)))`` without forming ``W'``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Collection, Mapping

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..errors import LoraError, LoraFileError
from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import LoraWeights, ModuleLora
from . import layer_variants as lv
from .lora import PlainLora

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter

#: the layer attribute (a ``nn.ParameterDict``) holding each adapter's magnitude
MAGNITUDE_ATTR = "dora_scale"


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input channel's column of ``weight`` (``[out, in, ...]``), shaped like ``dora_scale``.

    Linear ``[out, in]`` -> ``[1, in]``; Conv2d ``[out, in, kh, kw]`` -> ``[1, in, 1, 1]``. The same
    elements as A1111/ComfyUI's ``w.transpose(0, 1).reshape(in, -1).norm(dim=1)``.
    """
    dims = (0,) + tuple(range(2, weight.ndim))
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def magnitude_shape(weight_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """``dora_scale`` shape for a layer weight of ``weight_shape``: ``[1, in]`` or ``[1, in, 1, 1]``."""
    return (1, int(weight_shape[1])) + (1,) * (len(weight_shape) - 2)


class DoraVariant(LoraVariant):
    """PEFT ``LoraVariant`` hooks for the A1111/ComfyUI DoRA form (static methods, as PEFT calls them)."""

    @staticmethod
    def supports_lora_conversion() -> bool:
        return False

    @staticmethod
    def init(module: nn.Module, adapter_name: str, magnitude: torch.Tensor | None = None, **_: Any) -> None:
        """Add the magnitude ``m`` (default: the base weight's column norms, i.e. ``B = 0``)."""
        weight = lv.base_module(module).weight
        lora_a = module.lora_A[adapter_name].weight  # type: ignore[index]
        if magnitude is None:
            with torch.no_grad():
                magnitude = column_norm(weight.detach().float())
        elif tuple(magnitude.shape) != magnitude_shape(weight.shape):
            raise LoraError(
                f"DoRA magnitude has shape {list(magnitude.shape)}, expected {list(magnitude_shape(weight.shape))}."
            )
        container = lv.parameter_container(module, MAGNITUDE_ATTR)
        container[adapter_name] = nn.Parameter(
            magnitude.detach().to(device=lora_a.device, dtype=lora_a.dtype).clone(), requires_grad=lora_a.requires_grad
        )

    @staticmethod
    def _factor(module: nn.Module, name: str, base_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``g = m / ||W0 + s B A||_c`` with the norm detached, ``s B A``), both float32."""
        lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight  # type: ignore[index]
        delta = lv.lora_product(module, name, lora_a, lora_b) * lv.unit_scaling(module, name)  # type: ignore[arg-type]
        norm = column_norm(base_weight.detach().float() + delta.detach())
        return getattr(module, MAGNITUDE_ATTR)[name].float() / norm, delta

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **_: Any) -> torch.Tensor:
        w = lv.multiplier(module, active_adapter)  # type: ignore[arg-type]
        if w == 0.0:
            return result
        base = lv.base_module(module)
        lora_a = module.lora_A[active_adapter]  # type: ignore[index]
        lora_b = module.lora_B[active_adapter]  # type: ignore[index]
        dropout = module.lora_dropout[active_adapter]  # type: ignore[index]
        scale = lv.unit_scaling(module, active_adapter)  # type: ignore[arg-type]
        weight = base.weight
        lora_weight = lora_b.weight.float().reshape(lora_b.weight.shape[0], -1) @ lora_a.weight.float().reshape(
            lora_a.weight.shape[0], -1
        )
        norm = column_norm(weight.float() + scale * lora_weight.detach().reshape(weight.shape))
        g = (getattr(module, MAGNITUDE_ATTR)[active_adapter].float() / norm.detach()).to(x.dtype)
        xd = dropout(x)
        w0 = weight.to(x.dtype)
        if isinstance(base, nn.Conv2d):
            rest = base._conv_forward(xd, w0 * (g - 1), None)
            down = lora_a._conv_forward(xd, lora_a.weight * g.to(lora_a.weight.dtype), None)
        else:
            rest = F.linear(xd, w0 * (g - 1))
            down = F.linear(xd, lora_a.weight * g.to(lora_a.weight.dtype))
        return result + w * (rest + scale * lora_b(down))

    @staticmethod
    def _merged_delta(module: nn.Module, name: str) -> torch.Tensor:
        """``w * (W' - W0)`` (float32) from the unmerged base weight, as ``forward`` computes it."""
        with module._unmerged_base_weight() as base_weight:  # type: ignore[attr-defined]
            g, delta = DoraVariant._factor(module, name, base_weight)
            w0 = base_weight.detach().float()
            return lv.multiplier(module, name) * ((w0 + delta) * g - w0)  # type: ignore[arg-type]

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = DoraVariant._merged_delta(module, active_adapter)
            module._cache_store(f"{active_adapter}-dora-delta", delta)  # type: ignore[attr-defined]
            return (orig_weight.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        with torch.no_grad():
            delta = DoraVariant._merged_delta(module, active_adapter)
            module._cache_store(f"{active_adapter}-dora-delta", delta)  # type: ignore[attr-defined]
            orig_weight.data = (orig_weight.data.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # The delta depends on the unmerged weight, so the one added at merge time is kept and taken out.
        delta = module._cache_pop(f"{active_adapter}-dora-delta")  # type: ignore[attr-defined]
        return (orig_weight.data.float() - delta).to(orig_weight.dtype)


def attach_dora(layer: nn.Module, adapter_name: str, magnitude: torch.Tensor | None = None) -> None:
    """Turn adapter ``adapter_name`` of a PEFT LoRA layer into a DoRA adapter (magnitude ``m``)."""
    lv.base_module(layer)
    DoraVariant.init(layer, adapter_name, magnitude=magnitude)
    lv.attach(layer, adapter_name, DoraVariant())  # type: ignore[arg-type]


def magnitude_of(layer: nn.Module, adapter_name: str) -> torch.Tensor:
    """The magnitude ``m`` of a DoRA adapter in ``layer`` (``dora_scale`` layout)."""
    container = getattr(layer, MAGNITUDE_ATTR, None)
    if container is None or adapter_name not in container:
        raise LoraError(f"Adapter {adapter_name!r} is not a DoRA adapter in this layer.")
    return container[adapter_name]


def apply_dora_scales(adapter: "LoraAdapter", weights: LoraWeights) -> "LoraAdapter":
    """Make a plain adapter loaded from ``weights`` (see ``apply_weights``) the DoRA adapter it describes.

    Every module of ``weights`` must carry a ``dora_scale``: a file mixing DoRA and plain modules is
    refused (:class:`LoraFileError`) rather than applied half right.
    """
    source = weights.info.get("source", "these weights")
    plain = [f"{c}.{p}" for c, p, m in weights.items() if m.dora_scale is None]
    if plain:
        raise LoraFileError(
            f"{source} mixes DoRA modules (with dora_scale) and plain LoRA modules (e.g. {plain[0]}); "
            "such files cannot be applied here."
        )
    for component, path, layer in adapter.layers():
        module = weights.component(component)[path]
        weight_shape = lv.base_module(layer).weight.shape
        attach_dora(layer, adapter.name, module.dora_scale.float().reshape(magnitude_shape(weight_shape)))  # type: ignore[union-attr]
    adapter.method = Dora.instance()
    adapter.spec = dataclasses.replace(adapter.spec, method=Dora.name)
    return adapter


class Dora(PlainLora):
    """DoRA on PEFT LoRA layers (Linear and Conv2d); LoRA+ and rsLoRA combine with it."""

    name = "dora"
    title = "DoRA"
    description = (
        "Weight-decomposed LoRA: a trained magnitude per input channel times the LoRA-adapted direction "
        "(exported with dora_scale, as A1111/ComfyUI load it)."
    )
    #: LyCORIS writes this layout with algo=lora, dora_wd=True, wd_on_output=False
    kohya_network_module = "lycoris.kohya"
    option_names = frozenset({"loraplus_lr_ratio"})
    checkpoint_is_plain = False  # the magnitudes are part of the adapter

    @classmethod
    def instance(cls) -> "Dora":
        from . import get_method

        method = get_method(cls.name)
        assert isinstance(method, Dora)
        return method

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        super().inject(model, plan, spec, adapter_name)
        for _, layer in lv.layers_with(model, adapter_name):
            attach_dora(layer, adapter_name)

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora:
        plain = super().export(layer, adapter_name)
        plain.dora_scale = magnitude_of(layer, adapter_name).detach().to("cpu", copy=True).contiguous()  # type: ignore[arg-type]
        return plain

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}

    def reduce_rank(self, weights: LoraWeights, rank: int) -> LoraWeights:
        raise LoraError("DoRA weights cannot be re-ranked: their magnitudes are tied to the full-rank direction.")

    def describe(self, metadata: Mapping[str, str], suffixes: Collection[str]) -> str | None:
        from ..formats.kohya import parse_network_args

        dora_wd = str(parse_network_args(metadata).get("dora_wd", "")).lower() == "true"
        return self.title if "dora_scale" in suffixes or dora_wd else None


__all__ = ["Dora", "DoraVariant", "apply_dora_scales", "attach_dora", "column_norm", "magnitude_of", "magnitude_shape"]
