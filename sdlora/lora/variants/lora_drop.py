"""LoRA-drop (Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output
Evaluation", COLING 2025, arXiv:2402.07721): keep the adapters whose output matters, share one
adapter among the rest.

After a short warm-up of plain LoRA training, the importance of layer ``i`` is the squared norm of
its adapter output over training data, normalised over the layers (the paper's importance)::

    g_i = sum_x || Delta W_i x_i ||^2 ,    I_i = g_i / sum_j g_j

Layers are sorted by ``I_i`` and kept, most important first, until their cumulative importance
reaches the threshold ``T`` (0.9 in the paper). Every other layer drops its own adapter and uses a
shared one; training then continues.

How this maps onto a diffusion UNet (written for this project; PEFT has no LoRA-drop):

* the importance is measured on the forward passes of the last ``measure_steps`` warm-up steps
  (the training data itself, with the warm-up weights; never the first step, whose adapters are
  still zero, so the warm-up is at least 2 steps). The set of trained weights changes in
  the middle of the run, which multi-process (DDP) training cannot follow: one process only;
* a single adapter can only be shared by layers of the same shape: the dropped layers are grouped
  by component, kind, in/out size, kernel, stride, padding and rank, and each group shares the
  adapter of its most important member (which continues from its warm-up weights). A dropped layer
  with no partner of its shape keeps its own adapter;
* sharing is done by pointing the layers' PEFT ``lora_A``/``lora_B`` entries at the same modules.
  The dropped adapters leave the model; their optimizer state is freed and they stay in the
  optimizer only as empty, gradient-free placeholders (so the optimizer's layout, and therefore
  checkpoints and exact resume, do not change). The plan is part of every later checkpoint.

The exported file is plain LoRA: every layer gets its (possibly shared) adapter's weights, so the
file is as large as a plain LoRA's; the saving is in trained parameters and optimizer state.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..weights import LoraWeights
from .lora import PlainLora

if TYPE_CHECKING:  # pragma: no cover
    from ..inject import LoraAdapter

DEFAULT_WARMUP = 0.1
DEFAULT_THRESHOLD = 0.9
DEFAULT_MEASURE_STEPS = 2


@dataclass
class _DropState:
    """Per-adapter training state: importance sums while measuring, then the sharing plan."""

    importance: torch.Tensor | None = None  # float64, one entry per layer in adapter.layers() order
    labels: list[str] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    plan: dict[str, Any] | None = None


def importance_plan(importance: dict[str, float], threshold: float) -> list[str]:
    """The layers kept by the paper's rule: most important first until the cumulative normalised
    importance reaches ``threshold`` (at least one layer)."""
    total = sum(importance.values())
    if total <= 0 or not math.isfinite(total):
        return list(importance)  # nothing measured: keep every adapter
    kept: list[str] = []
    cumulative = 0.0
    for label, value in sorted(importance.items(), key=lambda kv: (-kv[1], kv[0])):
        if kept and cumulative >= threshold:
            break
        kept.append(label)
        cumulative += value / total
    return kept


def _shape_key(comp: str, layer: nn.Module, name: str) -> tuple:
    """Layers with equal keys can share one adapter (same module shapes, placement and scale)."""
    a, b = layer.lora_A[name], layer.lora_B[name]  # type: ignore[index]
    if isinstance(a, nn.Conv2d):
        geometry: tuple = ("conv", a.in_channels, b.out_channels, a.kernel_size, a.stride, a.padding, a.dilation, a.groups)
    else:
        geometry = ("linear", a.in_features, b.out_features)
    return (comp, *geometry, int(layer.r[name]), float(layer.lora_alpha[name]), bool(layer.use_rslora.get(name, False)))  # type: ignore[attr-defined]


class LoraDrop(PlainLora):
    name = "lora_drop"
    title = "LoRA-drop"
    description = "Plain LoRA warm-up, then only the layers with the largest adapter output keep their own; the rest share one."
    kohya_network_module = "networks.lora"
    option_names = frozenset({"loraplus_lr_ratio", "warmup", "threshold", "measure_steps"})
    checkpoint_is_plain = False  # shared layers hold one adapter for several

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[nn.Module, dict[str, _DropState]]" = weakref.WeakKeyDictionary()

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        opts = spec.options
        warmup = opts.get("warmup", DEFAULT_WARMUP)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 < warmup < 1:
            raise LoraError(f"LoRA-drop option 'warmup' (share of the run's steps before layers are dropped) must be in (0, 1), got {warmup!r}.")
        threshold = opts.get("threshold", DEFAULT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise LoraError(f"LoRA-drop option 'threshold' (share of the importance kept) must be in (0, 1], got {threshold!r}.")
        steps = opts.get("measure_steps", DEFAULT_MEASURE_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise LoraError(f"LoRA-drop option 'measure_steps' must be a whole number >= 1, got {steps!r}.")

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {
            "drop_warmup": repr(float(spec.options.get("warmup", DEFAULT_WARMUP))),
            "drop_threshold": repr(float(spec.options.get("threshold", DEFAULT_THRESHOLD))),
        }

    # Schedule -------------------------------------------------------------------------------------
    @staticmethod
    def drop_step(spec: LoraSpec, total_steps: int) -> int:
        """The number of warm-up steps: layers are dropped right after this many optimizer steps
        (at least 2: the adapters start at zero, so the first step has no output to measure)."""
        warmup = float(spec.options.get("warmup", DEFAULT_WARMUP))
        return max(min(2, total_steps - 1), min(total_steps - 1, int(round(warmup * total_steps))))

    def _state(self, adapter: "LoraAdapter") -> _DropState:
        per_model = self._states.setdefault(adapter.models[0], {})
        return per_model.setdefault(adapter.name, _DropState())

    def plan(self, adapter: "LoraAdapter") -> dict[str, Any] | None:
        """The sharing plan once made: ``{"importance", "kept", "groups", "drop_step", "threshold"}``."""
        return self._state(adapter).plan

    # Training hooks -------------------------------------------------------------------------------
    def before_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int) -> None:
        state = self._state(adapter)
        if state.plan is not None or total_steps < 2:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise LoraError(
                "LoRA-drop changes which weights train in the middle of the run, which multi-process (DDP) "
                "training cannot follow; train LoRA-drop in a single process."
            )
        k = self.drop_step(adapter.spec, total_steps)
        window = int(adapter.spec.options.get("measure_steps", DEFAULT_MEASURE_STEPS))
        if not max(1, k - window) <= step < k:  # step 0 runs with up = 0: every output is zero
            return
        layers = list(adapter.layers())
        labels = [f"{comp}.{path}" for comp, path, _ in layers]
        if state.importance is None or state.labels != labels:
            state.importance = torch.zeros(len(layers), dtype=torch.float64)
            state.labels = labels
        for i, (_, _, layer) in enumerate(layers):
            state.hooks.append(layer.lora_B[adapter.name].register_forward_hook(self._measure(state, i, layer, adapter.name)))  # type: ignore[index]

    @staticmethod
    def _measure(state: _DropState, index: int, layer: nn.Module, name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            with torch.no_grad():
                scale = float(layer.scaling[name])  # type: ignore[index]
                value = output.detach().float().pow(2).sum().double() * (scale * scale)
                state.importance[index] += value.cpu()  # type: ignore[index]

        return hook

    def after_optimizer_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int, optimizer: Any) -> None:
        state = self._state(adapter)
        for handle in state.hooks:
            handle.remove()
        state.hooks.clear()
        if state.plan is not None or total_steps < 2 or step != self.drop_step(adapter.spec, total_steps) - 1:
            return
        labels = state.labels or [f"{c}.{p}" for c, p, _ in adapter.layers()]
        importance = state.importance if state.importance is not None else torch.zeros(len(labels), dtype=torch.float64)
        plan = self.make_plan(adapter, {label: float(v) for label, v in zip(labels, importance.tolist())})
        plan["drop_step"] = step + 1
        self.apply_plan(adapter, plan, optimizer)
        state.importance = None

    def make_plan(self, adapter: "LoraAdapter", importance: dict[str, float]) -> dict[str, Any]:
        """Which layers keep their adapter and which share, from measured importances (any scale)."""
        threshold = float(adapter.spec.options.get("threshold", DEFAULT_THRESHOLD))
        total = sum(importance.values())
        shares = {k: (v / total if total > 0 else 0.0) for k, v in importance.items()}
        kept = set(importance_plan(importance, threshold))
        groups: dict[tuple, list[str]] = {}
        for comp, path, layer in adapter.layers():
            label = f"{comp}.{path}"
            if label not in kept:
                groups.setdefault(_shape_key(comp, layer, adapter.name), []).append(label)
        ordered = [sorted(members, key=lambda m: (-shares.get(m, 0.0), m)) for members in groups.values()]
        return {
            "threshold": threshold,
            "importance": shares,
            "kept": sorted(kept),
            "groups": sorted(ordered),
        }

    def apply_plan(self, adapter: "LoraAdapter", plan: dict[str, Any], optimizer: Any | None = None) -> None:
        """Make each group's layers use its first member's adapter; free the dropped adapters."""
        layers = {f"{comp}.{path}": layer for comp, path, layer in adapter.layers()}
        unknown = [m for g in plan["groups"] for m in g if m not in layers]
        if unknown:
            raise LoraError(f"LoRA-drop plan names layers this adapter does not have, e.g. {unknown[0]}.")
        inner = getattr(optimizer, "optimizer", optimizer)
        name = adapter.name
        for members in plan["groups"]:
            owner = layers[members[0]]
            for label in members[1:]:
                layer = layers[label]
                dropped = [p for key in ("lora_A", "lora_B") for p in getattr(layer, key)[name].parameters()]
                layer.lora_A[name] = owner.lora_A[name]  # type: ignore[index]
                layer.lora_B[name] = owner.lora_B[name]  # type: ignore[index]
                for p in dropped:
                    if inner is not None:
                        inner.state.pop(p, None)
                    p.grad = None
                    p.requires_grad_(False)
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._state(adapter).plan = plan

    def extra_state(self, adapter: "LoraAdapter") -> dict[str, Any]:
        state = self._state(adapter)
        out: dict[str, Any] = {}
        if state.plan is not None:
            out["lora_drop.plan"] = json.dumps(state.plan)
        elif state.importance is not None:
            out["lora_drop.importance"] = state.importance.clone()
            out["lora_drop.labels"] = json.dumps(state.labels)
        return out

    def load_extra_state(self, adapter: "LoraAdapter", state: dict[str, Any]) -> None:
        own = self._state(adapter)
        if state.get("lora_drop.plan"):
            self.apply_plan(adapter, json.loads(state["lora_drop.plan"]))
        elif state.get("lora_drop.importance") is not None:
            own.importance = state["lora_drop.importance"].to(torch.float64).clone()
            own.labels = json.loads(state["lora_drop.labels"])

    def export_metadata(self, adapter: "LoraAdapter", weights: LoraWeights) -> dict[str, str]:
        plan = self._state(adapter).plan
        if plan is None:
            return {"sdlora_lora_drop": json.dumps({"dropped": False})}
        shared = [g for g in plan["groups"] if len(g) > 1]
        summary = {
            "dropped": True,
            "drop_step": plan.get("drop_step"),
            "threshold": plan["threshold"],
            "kept_layers": len(plan["kept"]),
            "shared_groups": len(shared),
            "layers_sharing": sum(len(g) for g in shared),
            "alone_layers": sum(1 for g in plan["groups"] if len(g) == 1),
        }
        return {"sdlora_lora_drop": json.dumps(summary)}


def unique_trainable(adapter: "LoraAdapter") -> list[nn.Parameter]:
    """The adapter's distinct parameters (shared ones once)."""
    seen: dict[int, nn.Parameter] = {}
    for _, p in adapter.named_parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["LoraDrop", "importance_plan", "unique_trainable"]
