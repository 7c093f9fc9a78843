"""Putting adapters into a UNet and its text encoder(s), and the handle the training loop holds.

SD 1.x/2.x have one text encoder; SDXL has two (``text_encoder`` = CLIP ViT-L,
``text_encoder_2`` = OpenCLIP bigG). ``spec.text_encoder`` adapts every text encoder given.

Injection goes through ``peft.inject_adapter_in_model`` for both models (transformers 5's own
``add_adapter`` refuses peft 0.21, and diffusers' loader uses the same PEFT call), so the layers
are ordinary PEFT ``LoraLayer``s that diffusers, PEFT and our runtime controls all understand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import control
from .errors import LoraError, LoraShapeMismatchError
from .spec import LoraSpec
from .targets import (
    COMPONENTS, Component, TargetModule, TargetPlan, canonical_path, plan_from_shapes, plan_targets, unet_layout,
)
from .variants import AdapterMethod, adapter_parameters, get_method
from .weights import LoraWeights

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """Adapter names become keys of ``nn.ModuleDict``s: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LoraError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or '_'."
        )
    return name


def safe_adapter_name(text: str, taken: set[str] | None = None) -> str:
    """An adapter name derived from free text (e.g. a file name), unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")[:48] or "lora"
    if not re.match(r"[A-Za-z_]", base):
        base = "lora_" + base
    name, i = base, 2
    while taken and name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


@dataclass
class LoraAdapter:
    """One named adapter living in a UNet (and maybe one or two text encoders).

    Returned by :func:`inject_adapters` and :func:`apply_weights`; the training loop keeps it to
    get optimizer groups, checkpoints and the exported weights.
    """

    name: str
    method: AdapterMethod
    spec: LoraSpec
    unet: nn.Module | None
    text_encoder: nn.Module | None
    plans: dict[str, TargetPlan] = field(default_factory=dict)
    #: where the weights came from when they were loaded rather than injected fresh (a file path)
    origin: str | None = None
    #: SDXL's second text encoder when it holds this adapter
    text_encoder_2: nn.Module | None = None

    # Structure ------------------------------------------------------------------------------------
    @property
    def models(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    def model(self, component: Component) -> nn.Module | None:
        if component not in COMPONENTS:
            raise LoraError(f"Unknown LoRA component {component!r}; components: {', '.join(COMPONENTS)}.")
        return getattr(self, component)

    def components(self) -> list[Component]:
        """The components holding this adapter, in order (unet, text_encoder, text_encoder_2)."""
        return [c for c in COMPONENTS if self.model(c) is not None]

    def layers(self, component: Component | None = None) -> Iterator[tuple[Component, str, nn.Module]]:
        """(component, canonical path, PEFT layer) of every layer holding this adapter."""
        for comp in (component,) if component else COMPONENTS:
            model = self.model(comp)  # type: ignore[arg-type]
            if model is None:
                continue
            for path, layer in control.tuner_layers(model):
                if self.name in getattr(layer, "r", {}):
                    yield comp, canonical_path(comp, path), layer  # type: ignore[misc]

    def named_parameters(self, component: Component | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """("<component>.<path>.<param>", parameter) of this adapter's weights only."""
        for comp, path, layer in self.layers(component):
            for pname, param in adapter_parameters(layer, self.name):  # type: ignore[arg-type]
                yield f"{comp}.{path}.{pname}", param

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Training -------------------------------------------------------------------------------------
    def param_groups(
        self,
        *,
        unet_lr: float,
        text_encoder_lr: float | None = None,
        weight_decay: float = 0.0,
        text_encoder_2_lr: float | None = None,
    ) -> list[dict[str, Any]]:
        """Optimizer groups decided by the method (what trains at which learning rate).

        ``text_encoder_lr=None`` trains the text encoder(s) at ``unet_lr``; ``text_encoder_2_lr=None``
        trains SDXL's second text encoder at the first one's rate. Groups are named "unet",
        "text_encoder", "text_encoder_2" (methods may split them, e.g. "unet.up").
        """
        lrs = learning_rates(unet_lr, text_encoder_lr, text_encoder_2_lr)
        return self.method.param_groups(self, lrs=lrs, weight_decay=weight_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's raw weights (for checkpoints; exact, method-specific)."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict` returned; keys and shapes must match exactly."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise LoraError(
                f"Adapter {self.name!r} state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        with torch.no_grad():
            for key, param in params.items():
                if tuple(state[key].shape) != tuple(param.shape):
                    raise LoraShapeMismatchError(
                        f"Adapter {self.name!r}: {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}."
                    )
                param.copy_(state[key])

    # Export ---------------------------------------------------------------------------------------
    def export(self) -> LoraWeights:
        """Plain down/up/alpha per layer (scale 1), via the method's export hook."""
        weights = LoraWeights(method=self.method.name, info=self.info())
        for comp, path, layer in self.layers():
            module = self.method.export(layer, self.name)  # type: ignore[arg-type]
            if module is not None:
                weights.component(comp)[path] = module
        extra = self.method.export_metadata(self, weights)
        if extra:
            weights.info["metadata"] = dict(extra)
        return weights

    def info(self) -> dict[str, Any]:
        """What a file writer records about this adapter (method, preset, kohya network args)."""
        return {
            "method": self.method.name,
            "preset": self.spec.preset if self.origin is None else None,
            "source": self.origin,
            "spec": self.spec.to_dict(),
            "network_module": self.method.kohya_network_module,
            "network_args": self.method.network_args(self.spec),
            "dropout": self.spec.dropout,
            "unet_layout": unet_layout(self.unet),
        }

    # Runtime controls -----------------------------------------------------------------------------
    def set_scale(self, scale: float) -> None:
        control.set_scales(self.models, {self.name: scale})

    def activate(self) -> None:
        control.activate(self.models, [self.name])

    def enable(self) -> None:
        control.enable(self.models)

    def disable(self) -> None:
        control.disable(self.models)

    def merge(self) -> None:
        control.merge(self.models, [self.name])

    def unmerge(self) -> None:
        control.unmerge(self.models)

    def remove(self) -> None:
        control.delete(self.models, self.name)


def learning_rates(
    unet_lr: float, text_encoder_lr: float | None = None, text_encoder_2_lr: float | None = None
) -> dict[Component, float]:
    """Learning rate per component: a ``None`` text-encoder rate falls back to ``unet_lr``, a ``None``
    second-encoder rate to the first encoder's."""
    te = unet_lr if text_encoder_lr is None else text_encoder_lr
    return {"unet": unet_lr, "text_encoder": te, "text_encoder_2": te if text_encoder_2_lr is None else text_encoder_2_lr}


def _check_free(model: nn.Module, name: str) -> None:
    if name in control.adapter_names(model):
        raise LoraError(f"An adapter named {name!r} is already in {type(model).__name__}; pick another name.")


def _verify(model: nn.Module, plan: TargetPlan, name: str) -> None:
    got = {canonical_path(plan.component, p) for p, layer in control.tuner_layers(model) if name in layer.r}  # type: ignore[attr-defined]
    missing = [m.canonical for m in plan.modules if m.canonical not in got]
    if missing:
        raise LoraError(f"Adapter {name!r} was not placed on {len(missing)} planned layer(s), e.g. {missing[0]}.")


def inject_adapters(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    spec: LoraSpec | None = None,
    adapter_name: str = "default",
    *,
    text_encoder_2: nn.Module | None = None,
) -> LoraAdapter:
    """Add a fresh adapter to the UNet (and the text encoders when ``spec.text_encoder``).

    ``text_encoder_2`` is SDXL's second text encoder; with ``spec.text_encoder`` both encoders
    get adapters from the same preset, rank and alpha. The adapter is zero at start (``up`` = 0),
    so outputs are bit-identical to the base model until it trains. Raises :class:`LoraError` for
    an unknown method or preset, or a rank larger than a layer allows (naming the layer).
    """
    spec = spec or LoraSpec()
    check_adapter_name(adapter_name)
    method = get_method(spec.method)
    method.validate(spec)
    if unet is None and (not spec.text_encoder or (text_encoder is None and text_encoder_2 is None)):
        raise LoraError("Nothing to adapt: give a UNet, or a text encoder with spec.text_encoder=True.")
    if spec.text_encoder and text_encoder is None:
        raise LoraError("spec.text_encoder is true but no text encoder was given.")
    work: list[tuple[Component, nn.Module]] = []
    if unet is not None:
        work.append(("unet", unet))
    if spec.text_encoder:
        work.extend((c, m) for c, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None)
    method.check_models(dict(work), spec)
    # Plan everything first so that a bad rank fails before any model is modified.
    plans = {comp: plan_targets(model, comp, spec) for comp, model in work}
    for comp, model in work:
        _check_free(model, adapter_name)
    for comp, model in work:
        method.inject(model, plans[comp], spec, adapter_name)
        _verify(model, plans[comp], adapter_name)
    return LoraAdapter(
        adapter_name, method, spec, unet, text_encoder if spec.text_encoder else None, plans,
        text_encoder_2=text_encoder_2 if spec.text_encoder else None,
    )


def _check_lora_can_wrap(model: nn.Module, plan: TargetPlan) -> None:
    """PEFT cannot put a LoRA Conv2d layer around a LoHa/LoKr layer (it reads ``groups`` of the layer it
    wraps); LoRA files must be loaded before LoHa/LoKr ones into the same model."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for target in plan.modules:
        layer = model.get_submodule(target.path)
        if target.kind == "conv" and isinstance(layer, BaseTunerLayer) and not isinstance(layer, LoraLayer):
            raise LoraError(
                f"A LoRA file cannot be added on top of a LoHa/LoKr adapter in the same model (layer "
                f"'{target.label}': PEFT cannot wrap a LoHa/LoKr Conv2d layer in a LoRA layer). Load LoRA files "
                "first, then LoHa/LoKr files."
            )


def apply_weights(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    weights: LoraWeights,
    adapter_name: str,
    *,
    text_encoder_2: nn.Module | None = None,
) -> LoraAdapter:
    """Inject adapter weights (e.g. read from a file) as adapter ``adapter_name``.

    Plain LoRA modules become PEFT LoRA layers with exactly the file's rank and alpha (PEFT
    ``rank_pattern``/``alpha_pattern``); LoHa / LoKr modules become the layers of their method
    (its ``load_modules`` hook). Shapes must already have been checked against the model (see
    ``formats.match_to_model``).
    """
    check_adapter_name(adapter_name)
    kinds = weights.kinds()
    if len(kinds) > 1:
        raise LoraError(
            f"These weights mix module kinds ({', '.join(sorted(kinds))}); one adapter holds one kind only."
        )
    method = get_method(kinds.pop() if kinds else "lora")  # module kinds are registry names
    given: dict[Component, nn.Module | None] = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    parts: list[tuple[Component, nn.Module, dict[str, Any]]] = []
    for comp in COMPONENTS:
        modules = weights.component(comp)
        if not modules:
            continue
        model = given[comp]
        if model is None:
            what = {"unet": "a UNet", "text_encoder": "a text encoder", "text_encoder_2": "a second text encoder (SDXL)"}[comp]
            raise LoraError(f"These LoRA weights adapt {what}, but none was given.")
        parts.append((comp, model, modules))
    if not parts:
        raise LoraError("These LoRA weights are empty.")
    for _, model, _ in parts:
        _check_free(model, adapter_name)
    spec = LoraSpec(method=method.name, preset="attn", text_encoder=bool(weights.text_encoder or weights.text_encoder_2))
    plans: dict[str, TargetPlan] = {}
    for comp, model, modules in parts:
        # (rank, alpha) with the module's scale alpha / rank; a LoKr of two full matrices has scale 1
        plan = plan_from_shapes(model, comp, {p: (m.rank, m.alpha) if m.rank else (1, 1.0) for p, m in modules.items()})
        if method.name == "lora":
            _check_lora_can_wrap(model, plan)
        plans[comp] = plan
        method.load_modules(model, plan, spec, adapter_name, modules)
        _verify(model, plan, adapter_name)
    return LoraAdapter(
        adapter_name,
        method,
        spec,
        unet if weights.unet else None,
        text_encoder if weights.text_encoder else None,
        plans,
        origin=str(weights.info.get("source", "weights")),
        text_encoder_2=text_encoder_2 if weights.text_encoder_2 else None,
    )


__all__ = [
    "LoraAdapter",
    "TargetModule",
    "apply_weights",
    "check_adapter_name",
    "inject_adapters",
    "learning_rates",
    "safe_adapter_name",
]
