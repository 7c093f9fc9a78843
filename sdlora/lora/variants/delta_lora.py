"""Delta-LoRA (Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices", arXiv:2309.02411): the base weights move too, by the change of the adapter.

From the update-start step ``K`` on, every optimizer step also updates the frozen weight by the
change of the low-rank product (the paper's update rule, with the adapter's own scale
``s = alpha / r``)::

    W(t+1) = W(t) + lambda * s * (B(t+1) A(t+1) - B(t) A(t))

``W`` gets no gradient and no optimizer state, and the low-rank branch has no dropout (the paper
removes it so that the update stands for W's own gradient step; ``network_dropout`` must be 0).

Summed over the steps, the changes telescope: ``W(t) = W(K) + lambda * s * (B(t) A(t) - B(K) A(K))``.
This implementation uses that closed form instead of adding a small change to the stored weight at
every step. The layer computes ``W(K) x + lambda * s * (B A - B_K A_K) x`` (the second term without
gradient) ``+ s * B A x``, which is the paper's forward pass, while

* the base weights stay untouched in memory: half-precision base weights would round most of the
  tiny per-step changes away, and a preview can still show the base model exactly;
* a checkpoint only adds ``A_K`` and ``B_K`` (the adapter at step ``K``) and resumes exactly.

Written for this project as a PEFT ``LoraVariant`` on PEFT's LoRA layers (PEFT has no Delta-LoRA).

The total change of a layer at the end, ``s * ((1 + lambda) B A - lambda B_K A_K)``, has rank up to
``2 r``. The exported kohya file holds its best rank-``export_rank`` approximation (truncated SVD,
default the layer's rank ``r``; ``2 r`` is exact); the relative error is written to the file's
metadata (``sdlora_delta_svd_rel_error``, ``sdlora_delta_svd_max_layer_error``) and returned by
:func:`export_delta`. :func:`merge_into_base` folds the exact change into the base weights, for a
merged checkpoint (``sdlora.models.single_file.save_single_file(pipe, path)``; from a run directory:
:func:`sdlora.train.export.save_merged_checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import LoraWeights, ModuleLora
from .lora import PlainLora

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter

DEFAULT_FACTOR = 0.5
DEFAULT_UPDATE_START = 0.1


class DeltaLoraVariant(LoraVariant):
    """One layer's adapter plus its accumulated base-weight change (a PEFT ``LoraVariant``).

    ``start_down`` / ``start_up`` are ``A_K`` / ``B_K`` once the base has started to move (``None``
    before). ``factor`` is lambda; ``export_rank`` the rank of the exported SVD (``None``: ``r``).
    The last export's squared error and squared norm are kept for :meth:`DeltaLora.export_metadata`.
    """

    def __init__(self, factor: float, export_rank: int | None) -> None:
        self.factor = float(factor)
        self.export_rank = export_rank
        self.start_down: torch.Tensor | None = None
        self.start_up: torch.Tensor | None = None
        self.last_export: tuple[int, float, float] | None = None  # (rank, error^2, norm^2)

    @staticmethod
    def supports_lora_conversion() -> bool:
        return False  # the total change has rank up to 2r

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **_: Any) -> None:  # pragma: no cover - attached, not resolved
        return None

    @property
    def started(self) -> bool:
        return self.start_down is not None

    def _start_output(self, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B_K A_K x`` (the adapter as it was at step ``K``), without gradient."""
        lora_a = module.lora_A[name]
        down = self.start_down.to(lora_a.weight)  # type: ignore[union-attr]
        up = self.start_up.to(module.lora_B[name].weight)  # type: ignore[union-attr]
        with torch.no_grad():
            if isinstance(lora_a, nn.Conv2d):
                hidden = F.conv2d(x, down, None, lora_a.stride, lora_a.padding, lora_a.dilation, lora_a.groups)
                return F.conv2d(hidden, up)
            return F.linear(F.linear(x, down), up)

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **_: Any) -> torch.Tensor:
        """``result + s B A x + lambda s (B A x - B_K A_K x)``, the second term without gradient.

        The branch has no dropout (checked at injection), so ``B A x`` is computed once for both terms.
        """
        name = active_adapter
        scaling = module.scaling[name]
        out = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](x)))
        result = result + out * scaling
        if self.started and self.factor:
            moved = out.detach() - self._start_output(module, name, x)
            result = result + moved * (self.factor * scaling)
        return result

    def total_delta(self, module: nn.Module, name: str, scaling: float | None = None) -> torch.Tensor:
        """``s * ((1 + lambda) B A - lambda B_K A_K)`` in float32, shaped like the base weight
        (``scaling`` default: the layer's current scale)."""
        s = float(module.scaling[name]) if scaling is None else float(scaling)
        down, up = self.factors(module, name, s)
        rank = down.shape[0]
        base = module.get_base_layer().weight
        return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(base.shape)

    def factors(self, module: nn.Module, name: str, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in float32 with ``up @ down`` = the total change at ``scaling`` (rank r or 2r)."""
        down = module.lora_A[name].weight.detach().float()
        up = module.lora_B[name].weight.detach().float()
        if not self.started or not self.factor:
            return down, up * scaling
        k_down = self.start_down.to(down)  # type: ignore[union-attr]
        k_up = self.start_up.to(up)  # type: ignore[union-attr]
        return (torch.cat([down, k_down]), torch.cat([up * ((1 + self.factor) * scaling), k_up * (-self.factor * scaling)], dim=1))

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + self.total_delta(module, active_adapter).to(orig_weight.dtype)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += self.total_delta(module, active_adapter).to(orig_weight.dtype)

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - self.total_delta(module, active_adapter).to(orig_weight.dtype)


def _variants(models: Any, name: str) -> list[tuple[nn.Module, DeltaLoraVariant]]:
    from . import layer_variants as lv

    out = []
    for _, layer in lv.layers_with(models, name):
        variant = layer.lora_variant.get(name)  # type: ignore[attr-defined]
        if not isinstance(variant, DeltaLoraVariant):
            raise LoraError(f"Adapter {name!r} is not a Delta-LoRA adapter.")
        out.append((layer, variant))
    return out


def base_change(layer: nn.Module, adapter_name: str) -> torch.Tensor:
    """How far the layer's base weight has moved so far: ``lambda * s * (B A - B_K A_K)`` (float32).

    The effective base weight is ``layer.get_base_layer().weight + base_change(layer, name)``.
    """
    variant = layer.lora_variant.get(adapter_name)  # type: ignore[attr-defined]
    if not isinstance(variant, DeltaLoraVariant):
        raise LoraError(f"Adapter {adapter_name!r} of this layer is not a Delta-LoRA adapter.")
    base = layer.get_base_layer().weight  # type: ignore[attr-defined]
    if not variant.started or not variant.factor:
        return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    unit = _unit_scaling(layer, adapter_name)
    down = torch.cat([layer.lora_A[adapter_name].weight.detach().float(), variant.start_down.float()])  # type: ignore[union-attr, index]
    up = torch.cat([layer.lora_B[adapter_name].weight.detach().float(), -variant.start_up.float()], dim=1)  # type: ignore[union-attr, index]
    rank = down.shape[0]
    return ((up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * (variant.factor * unit)).reshape(base.shape)


def _unit_scaling(layer: nn.Module, name: str) -> float:
    from . import layer_variants as lv

    return lv.unit_scaling(layer, name)  # type: ignore[arg-type]


def svd_factors(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ``up @ down`` (flattened), with the squared error and norm.

    Written for this project: QR of both thin factors, then the SVD of the small core, so the cost is
    ``O((in + out) k^2)`` for inner dimension ``k``. Returns ``(down_r, up_r, error^2, norm^2)``
    (Frobenius) with ``up_r @ down_r`` the approximation; the singular values are split evenly.
    """
    k = down.shape[0]
    out_features = up.shape[0]
    q_up, r_up = torch.linalg.qr(up.double().reshape(out_features, k))
    q_down, r_down = torch.linalg.qr(down.double().reshape(k, -1).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    rank = min(rank, int(s.numel()))
    root = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * root
    new_down = root[:, None] * (vh[:rank] @ q_down.T)
    return new_down.float(), new_up.float(), float((s[rank:] ** 2).sum()), float((s**2).sum())


@dataclass
class DeltaExport:
    """What :func:`export_delta` returns: the file's weights and how well they approximate."""

    weights: LoraWeights
    #: per layer ("<component>.<path>"): relative Frobenius error ||D - D_k|| / ||D||
    layer_errors: dict[str, float] = field(default_factory=dict)
    #: over all layers: sqrt(sum ||D - D_k||^2) / sqrt(sum ||D||^2)
    rel_error: float = 0.0
    max_layer_error: float = 0.0


def export_delta(adapter: "LoraAdapter", rank: int | None = None) -> DeltaExport:
    """Export a Delta-LoRA adapter as plain LoRA weights at ``rank`` (default: the method's
    ``export_rank`` option, else each layer's rank) and report the SVD approximation error."""
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoraError(f"Delta-LoRA export rank must be a whole number >= 1, got {rank!r}.")
        kept = [(v, v.export_rank) for _, v in _variants(adapter.models, adapter.name)]
        for v, _ in kept:
            v.export_rank = rank
        try:
            weights = adapter.export()
        finally:
            for v, old in kept:
                v.export_rank = old
    else:
        weights = adapter.export()
    errors: dict[str, float] = {}
    total_err = total_norm = 0.0
    for comp, path, layer in adapter.layers():
        variant = layer.lora_variant.get(adapter.name)  # type: ignore[attr-defined]
        if isinstance(variant, DeltaLoraVariant) and variant.last_export is not None:
            _, err, norm = variant.last_export
            errors[f"{comp}.{path}"] = math.sqrt(err / norm) if norm > 0 else 0.0
            total_err += err
            total_norm += norm
    rel = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    return DeltaExport(weights, errors, rel, max(errors.values(), default=0.0))


def merge_into_base(adapter: "LoraAdapter") -> None:
    """Fold every layer's exact total change (at scale 1) into its base weight and remove the adapter.

    The models then compute what the trained adapter computed, with no adapter left (layers that
    held no other adapter become plain layers again); save them with
    ``sdlora.models.single_file.save_single_file(pipe, path)`` for a merged checkpoint.
    """
    from .. import control

    with torch.no_grad():
        for layer, variant in _variants(adapter.models, adapter.name):
            if adapter.name in layer.merged_adapters:  # type: ignore[attr-defined]
                raise LoraError("Unmerge the adapter (preview merge) before folding it into the base weights.")
            weight = layer.get_base_layer().weight  # type: ignore[attr-defined]
            delta = variant.total_delta(layer, adapter.name, scaling=_unit_scaling(layer, adapter.name))
            weight.data = (weight.data.float() + delta).to(weight.dtype)
    control.delete(adapter.models, adapter.name)
    for model in adapter.models:
        for path, layer in list(control.tuner_layers(model)):
            if not layer.r:  # type: ignore[attr-defined]
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())  # type: ignore[attr-defined]


def _check_number(name: str, value: Any, *, low: float, strict: bool, high: float | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (value <= low if strict else value < low) or (high is not None and value >= high)
    if bad:
        limits = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise LoraError(f"Delta-LoRA option {name!r} must be a number {limits}, got {value!r}.")


class DeltaLora(PlainLora):
    name = "delta_lora"
    title = "Delta-LoRA"
    description = "LoRA whose training also moves the base weights by lambda x the change of BA; exported by SVD."
    kohya_network_module = "networks.lora"
    option_names = frozenset({"loraplus_lr_ratio", "delta_factor", "update_start", "export_rank"})
    checkpoint_is_plain = False  # the adapter at the update start is part of its state

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        if spec.dropout:
            raise LoraError(
                "Delta-LoRA trains without dropout in the low-rank branch (the paper removes it so that the "
                "base-weight update follows the gradient); set network_dropout = 0."
            )
        opts = spec.options
        _check_number("delta_factor", opts.get("delta_factor", DEFAULT_FACTOR), low=0.0, strict=False)
        _check_number("update_start", opts.get("update_start", DEFAULT_UPDATE_START), low=0.0, strict=False, high=1.0)
        rank = opts.get("export_rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise LoraError(f"Delta-LoRA option 'export_rank' must be a whole number >= 1, got {rank!r}.")

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        from . import layer_variants as lv

        super().inject(model, plan, spec, adapter_name)
        factor = float(spec.options.get("delta_factor", DEFAULT_FACTOR))
        export_rank = spec.options.get("export_rank")
        for _, layer in lv.layers_with(model, adapter_name):
            lv.base_module(layer)  # refuses 4-bit / grouped layers with a clear error
            lv.attach(layer, adapter_name, DeltaLoraVariant(factor, export_rank))  # type: ignore[arg-type]

    @staticmethod
    def start_step(spec: LoraSpec, total_steps: int) -> int:
        """The step ``K`` from which the base weights move (``update_start`` x the run's steps)."""
        return int(round(float(spec.options.get("update_start", DEFAULT_UPDATE_START)) * total_steps))

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora:
        """The layer's total change at scale 1, as its best rank-``export_rank`` LoRA (alpha as configured)."""
        variant = layer.lora_variant[adapter_name]  # type: ignore[attr-defined]
        plain = super().export(layer, adapter_name)
        if not variant.started or not variant.factor:
            variant.last_export = (plain.rank, 0.0, float(plain.delta().double().pow(2).sum()))
            return plain
        unit = _unit_scaling(layer, adapter_name)
        down, up = variant.factors(layer, adapter_name, unit)
        rank = int(variant.export_rank or plain.rank)
        new_down, new_up, err, norm = svd_factors(down, up, rank)
        rank = new_down.shape[0]
        alpha = float(plain.alpha)  # the configured alpha, so alphas stay uniform across layers
        new_up = new_up * (rank / alpha)
        variant.last_export = (rank, err, norm)
        if plain.is_conv:
            return ModuleLora(new_down.reshape(rank, *plain.down.shape[1:]), new_up.reshape(new_up.shape[0], rank, 1, 1), alpha)
        return ModuleLora(new_down, new_up, alpha)

    def export_metadata(self, adapter: "LoraAdapter", weights: LoraWeights) -> dict[str, str]:
        total_err = total_norm = 0.0
        worst = 0.0
        ranks = set()
        for layer, variant in _variants(adapter.models, adapter.name):
            if variant.last_export is None:
                continue
            rank, err, norm = variant.last_export
            ranks.add(rank)
            total_err += err
            total_norm += norm
            worst = max(worst, math.sqrt(err / norm) if norm > 0 else 0.0)
        rel = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
        started = any(v.started for _, v in _variants(adapter.models, adapter.name))
        return {
            "sdlora_delta_factor": repr(float(adapter.spec.options.get("delta_factor", DEFAULT_FACTOR))),
            "sdlora_delta_base_moved": str(started),
            "sdlora_delta_svd_rank": ",".join(str(r) for r in sorted(ranks)),
            "sdlora_delta_svd_rel_error": f"{rel:.6g}",
            "sdlora_delta_svd_max_layer_error": f"{worst:.6g}",
        }

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        args = {
            "delta_factor": repr(float(spec.options.get("delta_factor", DEFAULT_FACTOR))),
            "update_start": repr(float(spec.options.get("update_start", DEFAULT_UPDATE_START))),
        }
        if spec.options.get("export_rank"):
            args["export_rank"] = str(spec.options["export_rank"])
        return args

    # Training -------------------------------------------------------------------------------------
    def before_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int) -> None:
        """At step ``K``: remember ``A_K``, ``B_K``; from then on the base weights move."""
        if step != self.start_step(adapter.spec, total_steps):
            return
        for layer, variant in _variants(adapter.models, adapter.name):
            if not variant.started:
                variant.start_down = layer.lora_A[adapter.name].weight.detach().clone()  # type: ignore[index]
                variant.start_up = layer.lora_B[adapter.name].weight.detach().clone()  # type: ignore[index]

    def extra_state(self, adapter: "LoraAdapter") -> dict[str, Any]:
        state: dict[str, Any] = {}
        for comp, path, layer in adapter.layers():
            variant = layer.lora_variant.get(adapter.name)  # type: ignore[attr-defined]
            if isinstance(variant, DeltaLoraVariant) and variant.started:
                state[f"delta_lora.{comp}.{path}.down"] = variant.start_down
                state[f"delta_lora.{comp}.{path}.up"] = variant.start_up
        return state

    def load_extra_state(self, adapter: "LoraAdapter", state: dict[str, Any]) -> None:
        for comp, path, layer in adapter.layers():
            variant = layer.lora_variant.get(adapter.name)  # type: ignore[attr-defined]
            down = state.get(f"delta_lora.{comp}.{path}.down")
            if not isinstance(variant, DeltaLoraVariant) or down is None:
                continue
            up = state[f"delta_lora.{comp}.{path}.up"]
            weight = layer.lora_A[adapter.name].weight  # type: ignore[index]
            variant.start_down = down.to(device=weight.device, dtype=weight.dtype)
            variant.start_up = up.to(device=weight.device, dtype=weight.dtype)


__all__ = [
    "DeltaExport",
    "DeltaLora",
    "DeltaLoraVariant",
    "base_change",
    "export_delta",
    "merge_into_base",
    "svd_factors",
]
