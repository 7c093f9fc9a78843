"""Runtime controls over adapters already in a model: scale, activation, enable/disable, merge.

All functions take one or more models (UNet, text encoder(s)) and act on every PEFT layer in them,
through PEFT's ``BaseTunerLayer``/``LoraLayer`` methods. Nothing is reloaded: a scale change
only rewrites one float per layer. Adapter parameters keep their ``requires_grad`` flags
(PEFT's ``set_adapter``/``enable_adapters`` would otherwise turn gradients on), so these calls are
safe in the middle of training.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from torch import nn

from .errors import LoraError

class LayerSet:
    """The PEFT layers of some models, collected once.

    Walking a UNet's module tree takes milliseconds; callers that change scales often (a preview
    slider) collect the layers once with :func:`collect` and pass the set instead of the models.
    Collect again after adapters are added or removed.
    """

    def __init__(self, models: list[nn.Module], items: list[tuple[str, nn.Module]]) -> None:
        self.models = models
        self.items = items

    def __len__(self) -> int:
        return len(self.items)


Models = nn.Module | Iterable[nn.Module | None] | LayerSet | None


def _models(models: Models) -> list[nn.Module]:
    if models is None:
        return []
    if isinstance(models, LayerSet):
        return models.models
    if isinstance(models, nn.Module):
        return [models]
    return [m for m in models if m is not None]


def tuner_layers(models: Models) -> Iterator[tuple[str, "nn.Module"]]:
    """(path, layer) of every PEFT adapter layer in the given models."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(models, LayerSet):
        yield from models.items
        return
    for model in _models(models):
        for path, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                yield path, module


def collect(models: Models) -> LayerSet:
    """A :class:`LayerSet` of the models' PEFT layers (pass it to the other functions)."""
    return LayerSet(_models(models), list(tuner_layers(models)))


def adapter_names(models: Models) -> list[str]:
    """Names of all adapters present in the models, in order of first appearance."""
    names: dict[str, None] = {}
    for _, layer in tuner_layers(models):
        for name in layer.r:  # type: ignore[attr-defined]
            names.setdefault(name, None)
    return list(names)


def _require(models: Models, names: Iterable[str]) -> None:
    present = set(adapter_names(models))
    missing = [n for n in names if n not in present]
    if missing:
        raise LoraError(f"No adapter named {missing} in the model; adapters present: {sorted(present) or 'none'}.")


@contextmanager
def _keep_requires_grad(layer: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _set_scaling(layer: nn.Module, name: str, scale: float) -> None:
    """Set one adapter's multiplier in one layer, re-merging if the layer is merged."""
    if name not in layer.scaling:  # type: ignore[attr-defined]
        return
    if layer.scaling[name] == _scaling_for(layer, name, float(scale)):  # type: ignore[attr-defined]
        return  # unchanged: nothing to do (and no re-merge)
    merged = list(layer.merged_adapters) if layer.merged else []  # type: ignore[attr-defined]
    if name in merged:
        layer.unmerge()  # type: ignore[attr-defined]
    layer.set_scale(name, float(scale))  # type: ignore[attr-defined]
    if name in merged:
        with _keep_requires_grad(layer):
            layer.merge(adapter_names=merged)  # type: ignore[attr-defined]


def set_scale(models: Models, scale: float, names: Sequence[str] | None = None) -> None:
    """Set the multiplier of adapters ``names`` (default: all) to ``scale`` (any float; 0 = base).

    Output of an adapted layer: ``W x + scale * alpha / r * up(down(x))``. Merged layers are
    unmerged and merged again with the new scale.
    """
    set_scales(models, {n: scale for n in (names if names is not None else adapter_names(models))})


def set_scales(models: Models, scales: Mapping[str, float]) -> None:
    """Set each named adapter's multiplier (does not change which adapters are active)."""
    _require(models, scales)
    for _, layer in tuner_layers(models):
        for name, scale in scales.items():
            _set_scaling(layer, name, scale)


def get_scales(models: Models) -> dict[str, float]:
    """Current multiplier of each adapter (read from the first layer that has it)."""
    out: dict[str, float] = {}
    for _, layer in tuner_layers(models):
        for name in layer.scaling:  # type: ignore[attr-defined]
            if name in out or name not in layer.r:  # type: ignore[attr-defined]
                continue
            base = _base_scaling(layer, name)
            out[name] = layer.scaling[name] / base if base else 0.0  # type: ignore[attr-defined]
    return out


def _alpha(layer: nn.Module, name: str) -> float:
    """An adapter's alpha: ``lora_alpha`` on PEFT LoRA layers, ``alpha`` on LyCORIS ones (LoHa, LoKr)."""
    alphas = getattr(layer, "lora_alpha", None)
    return (alphas if alphas is not None else layer.alpha)[name]  # type: ignore[attr-defined]


def _rslora(layer: nn.Module, name: str) -> bool:
    return bool(getattr(layer, "use_rslora", {}).get(name, False))


def _scaling_for(layer: nn.Module, name: str, scale: float) -> float:
    """What PEFT's ``set_scale(name, scale)`` stores (same expression, so equality is exact)."""
    if _rslora(layer, name):
        return scale * _alpha(layer, name) / math.sqrt(layer.r[name])  # type: ignore[attr-defined]
    return scale * _alpha(layer, name) / layer.r[name]  # type: ignore[attr-defined]


def _base_scaling(layer: nn.Module, name: str) -> float:
    alpha, r = _alpha(layer, name), layer.r[name]  # type: ignore[attr-defined]
    return alpha / math.sqrt(r) if _rslora(layer, name) else alpha / r


def active_adapters(models: Models) -> list[str]:
    for _, layer in tuner_layers(models):
        return list(layer.active_adapters)  # type: ignore[attr-defined]
    return []


def activate(models: Models, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters (others stay loaded but do nothing)."""
    _require(models, names)
    wanted = list(names)
    for _, layer in tuner_layers(models):
        if list(layer.active_adapters) != wanted:  # type: ignore[attr-defined]
            if layer.merged:  # type: ignore[attr-defined]
                layer.unmerge()  # type: ignore[attr-defined]
            with _keep_requires_grad(layer):
                layer.set_adapter(wanted)  # type: ignore[attr-defined]


def set_adapters(models: Models, weights: Mapping[str, float]) -> None:
    """Activate the named adapters together, each at its weight (several LoRAs at once)."""
    activate(models, list(weights))
    set_scales(models, weights)


def enable(models: Models) -> None:
    """Turn adapters back on after :func:`disable`."""
    for _, layer in tuner_layers(models):
        if layer.disable_adapters:  # type: ignore[attr-defined]
            with _keep_requires_grad(layer):
                layer.enable_adapters(True)  # type: ignore[attr-defined]


def disable(models: Models) -> None:
    """Run the base model only (adapters stay loaded; merged layers are unmerged first)."""
    for _, layer in tuner_layers(models):
        if layer.merged:  # type: ignore[attr-defined]
            layer.unmerge()  # type: ignore[attr-defined]
        if not layer.disable_adapters:  # type: ignore[attr-defined]
            with _keep_requires_grad(layer):
                layer.enable_adapters(False)  # type: ignore[attr-defined]


def merge(models: Models, names: Sequence[str] | None = None) -> None:
    """Fold the active adapters (or ``names``) into the base weights at their current scales.

    Generation then costs what the base model costs; :func:`unmerge` restores the base weights.
    """
    if names is not None:
        _require(models, names)
    for _, layer in tuner_layers(models):
        if layer.disable_adapters:  # type: ignore[attr-defined]
            raise LoraError("Adapters are disabled; enable them before merging.")
        todo = [n for n in (names or layer.active_adapters) if n in layer.r and n not in layer.merged_adapters]  # type: ignore[attr-defined]
        if todo:
            with _keep_requires_grad(layer):
                layer.merge(adapter_names=todo)  # type: ignore[attr-defined]


def unmerge(models: Models) -> None:
    """Undo :func:`merge` (subtracts exactly the deltas that were added)."""
    for _, layer in tuner_layers(models):
        if layer.merged:  # type: ignore[attr-defined]
            layer.unmerge()  # type: ignore[attr-defined]


def is_merged(models: Models) -> bool:
    return any(layer.merged for _, layer in tuner_layers(models))  # type: ignore[attr-defined]


def delete(models: Models, name: str) -> None:
    """Remove adapter ``name`` from every layer (unmerging first where needed)."""
    _require(models, [name])
    for _, layer in tuner_layers(models):
        if name in layer.merged_adapters:  # type: ignore[attr-defined]
            layer.unmerge()  # type: ignore[attr-defined]
        if name in layer.r:  # type: ignore[attr-defined]
            remaining = [n for n in layer.active_adapters if n != name]  # type: ignore[attr-defined]
            with _keep_requires_grad(layer), warnings.catch_warnings():
                # PEFT warns when the deleted adapter was active; we pick the remaining ones ourselves.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                layer.delete_adapter(name)  # type: ignore[attr-defined]
                if remaining:
                    layer.set_adapter(remaining)  # type: ignore[attr-defined]
    for model in _models(models):
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)


@dataclass
class LayerState:
    """Adapter state of one layer, for :func:`snapshot` / :func:`restore`."""

    layer: nn.Module
    scaling: dict[str, float]
    active: list[str]
    disabled: bool


def snapshot(models: Models) -> list[LayerState]:
    """Scales, active adapters and enabled flags of every layer (restorable with :func:`restore`)."""
    return [
        LayerState(layer, dict(layer.scaling), list(layer.active_adapters), bool(layer.disable_adapters))  # type: ignore[attr-defined]
        for _, layer in tuner_layers(models)
    ]


def restore(states: Sequence[LayerState]) -> None:
    """Put layers back as :func:`snapshot` found them (merged layers are left as they are)."""
    for state in states:
        layer = state.layer
        if layer.merged:  # type: ignore[attr-defined]
            continue
        with _keep_requires_grad(layer):
            if list(layer.active_adapters) != state.active:  # type: ignore[attr-defined]
                present = [n for n in state.active if n in layer.r]  # type: ignore[attr-defined]
                layer.set_adapter(present or state.active)  # type: ignore[attr-defined]
            if bool(layer.disable_adapters) != state.disabled:  # type: ignore[attr-defined]
                layer.enable_adapters(not state.disabled)  # type: ignore[attr-defined]
        for name, value in state.scaling.items():
            if name in layer.scaling:  # type: ignore[attr-defined]
                layer.scaling[name] = value  # type: ignore[attr-defined]
