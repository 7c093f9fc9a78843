"""Random LoRA weights on the layers a preset selects, for the tools' tests (no PEFT, no training)."""

from __future__ import annotations

import re

import torch

from sdlora.lora import LoraSpec, LoraWeights, ModuleLora, plan_targets
from sdlora.lora.targets import base_layer, unet_layout


def random_weights(
    models: dict, spec: LoraSpec, seed: int, *, std: float = 0.1, only: str | None = None, dora: bool = False,
) -> LoraWeights:
    """LoRA weights with random ``down``/``up`` on every layer ``spec`` selects in ``models``
    ({"unet", "text_encoder"[, "text_encoder_2"]}, real or on the meta device).

    ``only``: a regular expression the ``component.path`` label must match (keeps files small).
    ``dora``: add a ``dora_scale`` near the layer's own column norms (needs real weights).
    """
    g = torch.Generator().manual_seed(seed)
    weights = LoraWeights(info={"unet_layout": unet_layout(models["unet"])})
    components = ["unet"] + ([c for c in ("text_encoder", "text_encoder_2") if models.get(c) is not None]
                             if spec.text_encoder else [])
    for component in components:
        model = models[component]
        for t in plan_targets(model, component, spec).modules:
            if only and not re.search(only, f"{component}.{t.canonical}"):
                continue
            if t.kind == "conv":
                down = torch.randn(t.rank, t.in_features, *t.kernel_size, generator=g) * std
                up = torch.randn(t.out_features, t.rank, 1, 1, generator=g) * std
            else:
                down = torch.randn(t.rank, t.in_features, generator=g) * std
                up = torch.randn(t.out_features, t.rank, generator=g) * std
            scale = None
            if dora:
                from sdlora.lora.variants.dora import column_norm

                weight = base_layer(model.get_submodule(t.path)).weight.detach().float()
                scale = column_norm(weight) * (1 + 0.2 * torch.rand(column_norm(weight).shape, generator=g))
            weights.component(component)[t.canonical] = ModuleLora(down, up, float(t.alpha), scale)
    return weights


def deltas(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """``component.path`` -> the module's delta at scale 1 (float64)."""
    return {f"{c}.{p}": m.delta().double() for c, p, m in weights.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a.double() - b.double()).norm() / b.double().norm())
