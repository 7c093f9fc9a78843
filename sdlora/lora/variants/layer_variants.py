"""Shared plumbing for methods that change how a PEFT LoRA layer computes (DoRA, VeRA, ...).

Such a method first injects ordinary PEFT LoRA layers (``peft.tuners.lora.Linear`` /
``Conv2d``), then attaches a ``peft.tuners.lora.layer.LoraVariant`` to its adapter in every layer.
PEFT's layers already route ``forward``, ``merge`` and ``unmerge`` of an adapter through its
variant, so the layers stay PEFT ``LoraLayer``s: the runtime controls (scale, enable/disable,
merge), several adapters in one layer and the training loop work unchanged.

Extra per-adapter tensors (a DoRA magnitude, VeRA's scaling vectors) live in
``nn.ParameterDict`` containers added to the layer and listed in its ``adapter_layer_names``, so
PEFT moves, freezes and deletes them with the adapter and :func:`~.base.adapter_parameters`
reports them for optimizers and checkpoints.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ..errors import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.lora.layer import LoraLayer, LoraVariant


def unit_scaling(layer: "LoraLayer", name: str) -> float:
    """The adapter's scale at multiplier 1: ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
    alpha, rank = float(layer.lora_alpha[name]), int(layer.r[name])
    return alpha / math.sqrt(rank) if layer.use_rslora.get(name, False) else alpha / rank


def multiplier(layer: "LoraLayer", name: str) -> float:
    """The user-facing multiplier of the adapter in this layer (1 after injection, 0 = off).

    PEFT stores ``multiplier * unit_scaling`` in ``layer.scaling`` (``set_scale``); methods whose
    output is not linear in their weights (DoRA) need the multiplier itself.
    """
    unit = unit_scaling(layer, name)
    return float(layer.scaling[name]) / unit if unit else 0.0


def parameter_container(layer: nn.Module, attr: str) -> nn.ParameterDict:
    """The layer's ``nn.ParameterDict`` ``attr`` (created on first use and registered as adapter weights)."""
    container = getattr(layer, attr, None)
    if container is None:
        container = nn.ParameterDict()
        setattr(layer, attr, container)
    if not isinstance(container, nn.ParameterDict):
        raise LoraError(f"Layer {type(layer).__name__} already has an attribute {attr!r} that is not adapter weights.")
    if attr not in layer.adapter_layer_names:  # type: ignore[attr-defined]
        # an instance attribute, as PEFT's own DoRA does: only layers holding such adapters list it
        layer.adapter_layer_names = tuple(layer.adapter_layer_names) + (attr,)  # type: ignore[attr-defined]
    return container


def base_module(layer: nn.Module) -> nn.Linear | nn.Conv2d:
    """The layer's frozen base ``nn.Linear`` / ``nn.Conv2d`` (clear error for anything else)."""
    base = layer.get_base_layer()  # type: ignore[attr-defined]
    if getattr(base.weight, "quant_state", None) is not None:
        raise LoraError("This adapter method needs full-precision base weights; it cannot act on 4-bit (QLoRA) layers.")
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise LoraError(f"Grouped convolutions (groups={base.groups}) are not supported by this adapter method.")
        return base
    if isinstance(base, nn.Linear):
        return base
    raise LoraError(f"This adapter method supports Linear and Conv2d layers, not {type(base).__name__}.")


def lora_product(layer: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in float32, shaped like the layer's base weight (no scaling)."""
    weight = base_module(layer).weight
    rank = down.shape[0]
    return (up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, -1)).reshape(weight.shape)


def attach(layer: nn.Module, name: str, variant: "LoraVariant") -> None:
    """Route adapter ``name`` of a PEFT LoRA layer through ``variant`` (forward, merge, unmerge)."""
    if name not in layer.r:  # type: ignore[attr-defined]
        raise LoraError(f"Layer has no adapter {name!r} to attach a variant to.")
    if name in layer.lora_variant:  # type: ignore[attr-defined]
        raise LoraError(f"Adapter {name!r} already has a variant in this layer.")
    layer.lora_variant[name] = variant  # type: ignore[attr-defined]


def layers_with(models: Iterator[nn.Module] | list[nn.Module] | nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, PEFT LoRA layer) of every layer in ``models`` that holds adapter ``name``."""
    from peft.tuners.lora.layer import LoraLayer

    from .. import control

    for path, layer in control.tuner_layers(models):  # type: ignore[arg-type]
        if isinstance(layer, LoraLayer) and name in layer.r:
            yield path, layer


__all__ = [
    "attach",
    "base_module",
    "layers_with",
    "lora_product",
    "multiplier",
    "parameter_container",
    "unit_scaling",
]
