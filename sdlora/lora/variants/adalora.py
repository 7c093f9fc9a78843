"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023): SVD-form adapters whose total rank shrinks to a budget, given to the layers that matter.

Each adapted layer computes ``W x + alpha / r * P diag(lambda) Q x`` (the paper's eq. 3; PEFT's
``lora_B``, ``lora_E``, ``lora_A``), starting at rank ``r`` with ``lambda = 0``. Training adds the
orthogonality regulariser ``R = ||P^T P - I||_F + ||Q Q^T - I||_F`` (eq. 4, weight
``orth_reg_weight``, averaged over the matrices as PEFT does). After every optimizer step the
importance of each singular triplet is updated from ``|w * grad|`` with the paper's sensitivity
smoothing and uncertainty (eqs. 8-10, ``beta1``/``beta2``) and, every ``delta_t`` steps, the
least important triplets are masked (``lambda_i = 0``) so that the total rank follows the cubic
budget schedule (eq. 12): the full budget during the first ``tinit`` share of the steps, then down
to ``target_rank`` x number of layers, which is final for the last ``tfinal`` share.

PEFT's ``AdaLoraConfig`` layers (``SVDLinear``, and ``SVDConv2d`` for Conv2d layers, with a k x k
``Q`` and a 1 x 1 ``P``, the LoCon layout) and its ``RankAllocator`` do the maths. PEFT's
``AdaLoraModel.update_and_allocate`` and its loss-based regulariser need a ``PeftModel`` and a
model output with a ``loss``; here the same phases run from the training hooks, and the
regulariser's gradient is added to ``P`` and ``Q`` right before each optimizer step (equal to adding
``R`` to the loss, except that gradient clipping does not see it; it is added once per optimizer
step whatever the gradient accumulation, and after fp16 gradient unscaling).

Conv2d targets (preset ``full``) use AdaLoRA too, through PEFT's ``SVDConv2d``: every targeted layer
takes part in the same budget. AdaLoRA has one initial rank and alpha for all layers, so
``conv_dim``/``text_encoder_dim`` and their alphas must equal ``network_dim``/``network_alpha``.

PEFT's ``set_scale`` (what the preview's strength control calls) computes ``scale * lora_alpha / r``
while SVD layers already divide by the rank in their forward pass, so the layers keep
``lora_alpha = alpha * r``: their scale at strength 1 is then ``alpha``, as PEFT's own init sets it.

Export: each layer's kept triplets (``lambda != 0``) become ``lora_down = diag(lambda) Q`` and
``lora_up = P`` times the layer's scale, one rank per layer as it ended; a layer pruned to rank 0 is
left out. Every module gets the configured ``alpha`` (scale folded into ``lora_up``), so alphas are
uniform and diffusers reads the file exactly.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import COMPONENTS, Component, TargetPlan
from ..weights import LoraWeights, ModuleLora
from .base import AdapterMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft import AdaLoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter

DEFAULTS: dict[str, Any] = {
    "target_rank": None,  # None: half the initial rank (at least 1)
    "tinit": 0.1,
    "tfinal": 0.2,
    "delta_t": 10,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
}


@dataclass(frozen=True)
class Schedule:
    """AdaLoRA's phases in optimizer steps (PEFT's ``total_step``, ``tinit``, ``tfinal``, ``deltaT``)."""

    total: int
    tinit: int
    tfinal: int
    delta_t: int

    @property
    def final_step(self) -> int:
        """The 0-based step whose allocation is final (PEFT's ``total_step - tfinal``)."""
        return self.total - self.tfinal


def target_rank(spec: LoraSpec) -> int:
    value = spec.options.get("target_rank", DEFAULTS["target_rank"])
    return max(1, spec.rank // 2) if value is None else int(value)


def schedule(spec: LoraSpec, total_steps: int) -> Schedule:
    """The schedule of a run of ``total_steps`` steps; :class:`LoraError` if it leaves no budgeting phase."""
    opts = {**DEFAULTS, **spec.options}
    tinit = int(round(float(opts["tinit"]) * total_steps))
    tfinal = max(1, int(round(float(opts["tfinal"]) * total_steps)))
    if tinit >= total_steps - tfinal:
        raise LoraError(
            f"AdaLoRA needs steps between its warm-up and final phases: with max_train_steps={total_steps}, "
            f"tinit={opts['tinit']} ({tinit} steps) and tfinal={opts['tfinal']} ({tfinal} steps) leave none. "
            "Lower network_args tinit/tfinal or train longer."
        )
    return Schedule(total_steps, tinit, tfinal, int(opts["delta_t"]))


def budget_at(step: int, init_budget: int, target_budget: int, sched: Schedule) -> int:
    """The total rank allowed after ``step`` (the paper's cubic schedule, eq. 12, as PEFT's
    ``RankAllocator.budget_schedule`` computes it; the final allocation happens at ``final_step``)."""
    if step <= sched.tinit:
        return init_budget
    if step >= sched.final_step:
        return target_budget
    coeff = 1 - (step - sched.tinit) / (sched.final_step - sched.tinit)
    return int((init_budget - target_budget) * coeff**3 + target_budget)


def _svd_layers(adapter: "LoraAdapter") -> Iterator[tuple[str, str, nn.Module]]:
    from peft.tuners.adalora import AdaLoraLayer

    for comp, path, layer in adapter.layers():
        if isinstance(layer, AdaLoraLayer):
            yield comp, path, layer


class _ParamView:
    """``named_parameters()`` of an adapter's triplets, named as PEFT's ``RankAllocator`` expects
    (``...lora_A.<adapter>``), over the UNet and the text encoder together (one global budget)."""

    def __init__(self, adapter: "LoraAdapter") -> None:
        self.adapter = adapter

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        name = self.adapter.name
        for comp, path, layer in _svd_layers(self.adapter):
            for attr in ("lora_A", "lora_E", "lora_B"):
                yield f"{comp}.{path}.{attr}.{name}", getattr(layer, attr)[name]


@dataclass(eq=False)
class _AdaState:
    """Per-adapter training state (the allocator and its smoothed importances live here)."""

    adapter_name: str
    allocator: Any = None
    schedule: Schedule | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    budget: int | None = None
    loaded: dict[str, Any] | None = None
    matrices: list[tuple[nn.Parameter, str]] = field(default_factory=list)  # (P or Q, "A" | "B")
    orth_weight: float = 0.0
    pending: bool = False


_PENDING: "weakref.WeakSet[_AdaState]" = weakref.WeakSet()
_HOOK: list[Any] = []


def orthogonality_grads(matrices: list[tuple[torch.Tensor, str]], weight: float) -> list[torch.Tensor]:
    """Gradients of ``weight * mean_m ||C_m - I||_F`` with ``C = Q Q^T`` ("A") or ``P^T P`` ("B")
    (PEFT's regulariser): ``2 (C - I) Q / ||C - I||`` and ``2 P (C - I) / ||C - I||``, over the mean's count."""
    n = max(1, len(matrices))
    grads = []
    with torch.no_grad():
        for p, kind in matrices:
            w = p.detach()
            cov = w @ w.T if kind == "A" else w.T @ w
            cov = cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            norm = torch.linalg.matrix_norm(cov)
            if float(norm) == 0.0:
                grads.append(torch.zeros_like(w))
                continue
            g = (cov @ w if kind == "A" else w @ cov) * (2.0 * weight / n) / norm
            grads.append(g)
    return grads


def _orthogonality_pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: adds the pending regulariser gradients of the adapters this
    optimizer trains (grads are unscaled and clipped at this point)."""
    if not len(_PENDING):
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for state in list(_PENDING):
        if not state.pending or not state.matrices or id(state.matrices[0][0]) not in ids:
            continue
        state.pending = False
        for (p, _), g in zip(state.matrices, orthogonality_grads(state.matrices, state.orth_weight)):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))


def _ensure_hook() -> None:
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK.append(register_optimizer_step_pre_hook(_orthogonality_pre_hook))


def _own_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    """PEFT's SVD layers add their update to the base layer's output in place; a base output that is
    a view made inside a custom autograd function (the CPU training speed-ups' frozen-weight kernels)
    cannot be changed in place, so such an output is copied first. Plain outputs pass unchanged."""
    if isinstance(output, torch.Tensor) and output._is_view() and torch.is_grad_enabled():
        return output.clone()
    return None


class AdaLora(AdapterMethod):
    name = "adalora"
    title = "AdaLoRA"
    description = "SVD-form adapters; importance-based rank budget shrinks the total rank to target_rank per layer."
    kohya_network_module = "networks.lora"
    option_names = frozenset(DEFAULTS)

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[nn.Module, dict[str, _AdaState]]" = weakref.WeakKeyDictionary()

    # Settings -------------------------------------------------------------------------------------
    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        opts = {**DEFAULTS, **spec.options}
        if spec.rslora:
            raise LoraError("AdaLoRA divides by its initial rank (PEFT's SVD layers); turn use_rslora off.")
        if (spec.effective_conv_rank, spec.effective_text_encoder_rank) != (spec.rank, spec.rank) or (
            spec.effective_conv_alpha, spec.effective_text_encoder_alpha) != (spec.linear_alpha, spec.linear_alpha):
            raise LoraError(
                "AdaLoRA starts every layer at one rank and alpha (it redistributes the rank itself): set conv_dim, "
                "text_encoder_dim and their alphas equal to network_dim / network_alpha (or leave them unset)."
            )
        target = opts["target_rank"]
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= spec.rank):
            raise LoraError(f"AdaLoRA option 'target_rank' (average final rank) must be a whole number in 1..network_dim ({spec.rank}), got {target!r}.")
        for key, low, high in (("tinit", 0.0, 1.0), ("tfinal", 0.0, 1.0), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0)):
            value = opts[key]
            closed_low = key == "tinit"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (low <= value if closed_low else low < value) and value < high):
                raise LoraError(f"AdaLoRA option {key!r} must be a number in {'[' if closed_low else '('}{low:g}, {high:g}), got {value!r}.")
        if float(opts["tinit"]) + float(opts["tfinal"]) >= 1:
            raise LoraError("AdaLoRA options tinit + tfinal (shares of the run's steps) must be below 1 to leave a budgeting phase.")
        delta_t = opts["delta_t"]
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise LoraError(f"AdaLoRA option 'delta_t' (steps between rank allocations) must be a whole number >= 1, got {delta_t!r}.")
        weight = opts["orth_reg_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise LoraError(f"AdaLoRA option 'orth_reg_weight' must be a number >= 0, got {weight!r}.")

    def build_config(self, plan: TargetPlan, spec: LoraSpec) -> "AdaLoraConfig":
        from peft import AdaLoraConfig

        opts = {**DEFAULTS, **spec.options}
        # total_step/tinit/tfinal are placeholders here: the run's length reaches the method only in
        # the training hooks, which build the allocator with the real schedule (see before_step).
        return AdaLoraConfig(
            init_r=plan.default_rank,
            target_r=target_rank(spec),
            lora_alpha=plan.default_alpha,
            target_modules=plan.target_regex(),
            lora_dropout=float(spec.dropout),
            total_step=1,
            beta1=float(opts["beta1"]),
            beta2=float(opts["beta2"]),
            orth_reg_weight=float(opts["orth_reg_weight"]),
            init_lora_weights=True,
        )

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        from peft.tuners.adalora import AdaLoraLayer

        from .. import control

        super().inject(model, plan, spec, adapter_name)
        for _, layer in control.tuner_layers(model):
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.r:
                # so that PEFT's set_scale (scale * lora_alpha / r) yields scale * alpha, see the module docstring
                layer.lora_alpha[adapter_name] = float(layer.lora_alpha[adapter_name]) * int(layer.r[adapter_name])
                base = layer.get_base_layer()
                if not getattr(base, "_sdlora_no_view_output", False):
                    base.register_forward_hook(_own_output)
                    base._sdlora_no_view_output = True

    def param_groups(self, adapter: "LoraAdapter", *, lrs: Mapping[Component, float],
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """The triplets train; PEFT's ``ranknum`` (the constant initial rank) does not."""
        groups = super().param_groups(adapter, lrs=lrs, weight_decay=weight_decay)
        constant = {id(p) for name, p in adapter.named_parameters() if name.split(".")[-1] == "ranknum"}
        for group in groups:
            for p in group["params"]:
                if id(p) in constant:
                    p.requires_grad_(False)
            group["params"] = [p for p in group["params"] if id(p) not in constant]
        return [g for g in groups if g["params"]]

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        opts = {**DEFAULTS, **spec.options}
        return {
            "init_rank": str(spec.rank),
            "target_rank": str(target_rank(spec)),
            "tinit": repr(float(opts["tinit"])),
            "tfinal": repr(float(opts["tfinal"])),
            "delta_t": str(opts["delta_t"]),
            "conv_layers": "adalora",
        }

    # Export ---------------------------------------------------------------------------------------
    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora | None:
        """The layer's kept triplets as plain down/up at the configured alpha (None if none is left)."""
        e = layer.lora_E[adapter_name].detach().float().reshape(-1)  # type: ignore[attr-defined]
        keep = torch.nonzero(e != 0).reshape(-1)
        rank = int(keep.numel())
        if rank == 0:
            return None
        q = layer.lora_A[adapter_name].detach().float()  # type: ignore[attr-defined]
        p = layer.lora_B[adapter_name].detach().float()  # type: ignore[attr-defined]
        init_rank = int(layer.r[adapter_name])  # type: ignore[attr-defined]
        alpha = float(layer.lora_alpha[adapter_name]) / init_rank  # the configured alpha (see inject)
        ranknum = float(layer.ranknum[adapter_name].item())  # type: ignore[attr-defined]
        # layer: alpha / (ranknum + 1e-5) * P diag(E) Q ; file: alpha / rank * up @ down
        down = (q[keep] * e[keep, None]).contiguous()
        up = (p[:, keep].double() * (rank / (ranknum + 1e-5))).float().contiguous()
        base = layer.get_base_layer()  # type: ignore[attr-defined]
        if isinstance(base, nn.Conv2d):
            kh, kw = base.kernel_size
            return ModuleLora(down.reshape(rank, -1, kh, kw), up.reshape(up.shape[0], rank, 1, 1), alpha)
        return ModuleLora(down, up, alpha)

    def export_metadata(self, adapter: "LoraAdapter", weights: LoraWeights) -> dict[str, str]:
        layers = list(_svd_layers(adapter))
        kept = {comp: 0 for comp in COMPONENTS}
        for comp, _, layer in layers:
            kept[comp] += int((layer.lora_E[adapter.name] != 0).sum())
        state = self._state(adapter)
        summary = {
            "init_rank": adapter.spec.rank,
            "target_rank": target_rank(adapter.spec),
            "layers": len(layers),
            "target_total_rank": target_rank(adapter.spec) * len(layers),
            "total_rank": sum(kept.values()),
            "total_rank_by_component": {k: v for k, v in kept.items() if v},
            # the budget a checkpoint restores too, so a step export of the last step says the same as the run's file
            "final": bool(state.budget is not None and state.budget == target_rank(adapter.spec) * len(layers)),
        }
        return {"sdlora_adalora": json.dumps(summary)}

    # Training hooks -------------------------------------------------------------------------------
    def _state(self, adapter: "LoraAdapter") -> _AdaState:
        per_model = self._states.setdefault(adapter.models[0], {})
        return per_model.setdefault(adapter.name, _AdaState(adapter.name))

    def budget(self, adapter: "LoraAdapter") -> dict[str, int | None]:
        """``{"init", "target", "current"}`` total ranks (``current``: the last allocation's budget)."""
        state = self._state(adapter)
        layers = len(list(_svd_layers(adapter)))
        return {"init": layers * adapter.spec.rank, "target": layers * target_rank(adapter.spec), "current": state.budget}

    def _start(self, adapter: "LoraAdapter", total_steps: int) -> _AdaState:
        from peft import AdaLoraConfig
        from peft.tuners.adalora import RankAllocator

        state = self._state(adapter)
        if state.allocator is not None:
            return state
        opts = {**DEFAULTS, **adapter.spec.options}
        sched = schedule(adapter.spec, total_steps)
        config = AdaLoraConfig(init_r=adapter.spec.rank, target_r=target_rank(adapter.spec), total_step=sched.total,
                               tinit=sched.tinit, tfinal=sched.tfinal, deltaT=sched.delta_t,
                               beta1=float(opts["beta1"]), beta2=float(opts["beta2"]),
                               orth_reg_weight=float(opts["orth_reg_weight"]))
        view = _ParamView(adapter)
        allocator = RankAllocator(view, config, adapter.name)
        if state.loaded is not None:
            params = dict(view.named_parameters())
            for key, value in state.loaded.items():
                kind, _, pname = key.partition(":")
                p = params[pname]
                getattr(allocator, kind)[pname] = value.to(device=p.device, dtype=p.dtype)
            for pname in allocator.exp_avg_ipt:
                allocator.ipt[pname] = torch.zeros_like(params[pname])
            state.loaded = None
        state.allocator, state.schedule = allocator, sched
        state.matrices = [(getattr(layer, attr)[adapter.name], kind) for _, _, layer in _svd_layers(adapter)
                          for attr, kind in (("lora_A", "A"), ("lora_B", "B"))]
        state.orth_weight = float(opts["orth_reg_weight"])
        return state

    def before_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int) -> None:
        state = self._start(adapter, total_steps)
        if state.orth_weight > 0:
            _ensure_hook()
            state.pending = True
            _PENDING.add(state)

    def after_optimizer_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int, optimizer: Any) -> None:
        """PEFT's ``update_and_allocate`` phases: importance, budget masking, then the fixed final mask."""
        state = self._start(adapter, total_steps)
        state.pending = False
        allocator, sched = state.allocator, state.schedule
        assert sched is not None
        view = _ParamView(adapter)
        if step < sched.final_step:
            allocator.update_ipt(view)
            budget, mask_now = allocator.budget_schedule(step)
            if mask_now and budget < allocator.init_bgt:
                state.rank_pattern = allocator.mask_to_budget(view, budget)
                state.budget = budget
        elif step == sched.final_step:
            if allocator.target_bgt < allocator.init_bgt:
                state.rank_pattern = allocator.mask_to_budget(view, allocator.target_bgt)
            state.budget = allocator.target_bgt
            allocator.reset_ipt()
        elif state.rank_pattern:
            allocator.mask_using_rank_pattern(view, state.rank_pattern)

    def extra_state(self, adapter: "LoraAdapter") -> dict[str, Any]:
        state = self._state(adapter)
        out: dict[str, Any] = {}
        if state.rank_pattern is not None:
            out["adalora.rank_pattern"] = json.dumps(state.rank_pattern)
        if state.budget is not None:
            out["adalora.budget"] = state.budget
        if state.allocator is not None:
            for kind in ("exp_avg_ipt", "exp_avg_unc"):
                for pname, value in getattr(state.allocator, kind).items():
                    out[f"adalora.{kind}:{pname}"] = value
        return out

    def load_extra_state(self, adapter: "LoraAdapter", state: dict[str, Any]) -> None:
        own = self._state(adapter)
        if state.get("adalora.rank_pattern"):
            own.rank_pattern = json.loads(state["adalora.rank_pattern"])
        if state.get("adalora.budget") is not None:
            own.budget = int(state["adalora.budget"])
        loaded = {k[len("adalora."):]: v for k, v in state.items() if k.startswith("adalora.exp_avg_")}
        own.loaded = loaded or None


__all__ = ["AdaLora", "Schedule", "budget_at", "orthogonality_grads", "schedule", "target_rank"]
