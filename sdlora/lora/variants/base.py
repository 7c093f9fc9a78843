"""The interface every adapter method implements.

A method is one object registered by name in :mod:`sdlora.lora.variants`. It decides

* how adapters are built and injected (:meth:`AdapterMethod.build_config` /
  :meth:`AdapterMethod.inject`, usually a PEFT config handed to ``peft.inject_adapter_in_model``;
  PEFT's own ``LoraVariant`` hooks then give forward/merge/unmerge),
* what trains at which learning rate (:meth:`AdapterMethod.param_groups`),
* how a trained adapter becomes plain ``lora_down``/``lora_up``/``alpha`` (+ ``dora_scale``)
  that any SD tool loads (:meth:`AdapterMethod.export`),
* what the file formats need to know about it: whether its checkpoints are plain LoRA weights
  (:attr:`AdapterMethod.checkpoint_is_plain`), how its files get a lower rank
  (:meth:`AdapterMethod.reduce_rank`), and how a file of this method is recognised and named by
  ``inspect`` (:meth:`AdapterMethod.describe`). The formats ask the method; they never test names.

Runtime controls (scale, enable/disable, merge) are PEFT's ``BaseTunerLayer`` methods and work
for every method without extra code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Collection, Iterator, Mapping

from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import COMPONENTS, Component, TargetPlan
from ..weights import LoraWeights, ModuleLora, resize_rank

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter


def adapter_parameters(layer: "BaseTunerLayer", adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter inside one PEFT layer, e.g. ``("lora_A.weight", p)``."""
    for attr in tuple(layer.adapter_layer_names) + tuple(layer.other_param_names):
        container = getattr(layer, attr, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, nn.Parameter):
            yield attr, item
        elif isinstance(item, nn.Module):
            for sub, param in item.named_parameters():
                yield f"{attr}.{sub}", param


class AdapterMethod(ABC):
    """Base class of adapter methods. Subclasses set the class attributes and the abstract hooks."""

    #: registry name (also written to file metadata as ``sdlora_method``)
    name: ClassVar[str]
    #: short human-readable name shown in the UI and by ``inspect``
    title: ClassVar[str]
    #: one-line description for the UI
    description: ClassVar[str] = ""
    #: kohya's ``ss_network_module`` value for files this method exports
    kohya_network_module: ClassVar[str] = "networks.lora"
    #: keys of ``LoraSpec.options`` this method understands
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: whether a training checkpoint (``LoraAdapter.state_dict()``) holds exactly the plain
    #: ``lora_A``/``lora_B`` of the exported file, so it can be exported without the base model
    checkpoint_is_plain: ClassVar[bool] = False

    def validate(self, spec: LoraSpec) -> None:
        """Raise :class:`LoraError` for settings this method cannot honour."""
        unknown = sorted(set(spec.options) - self.option_names)
        if unknown:
            allowed = ", ".join(sorted(self.option_names)) or "none"
            raise LoraError(f"LoRA method {self.name!r} has no option(s) {unknown}; its options: {allowed}.")

    def check_models(self, models: Mapping[Component, nn.Module], spec: LoraSpec) -> None:
        """Raise :class:`LoraError` when this method cannot adapt these models (called before any
        model is changed). ``models`` maps component ("unet", "text_encoder", "text_encoder_2")
        to the model that gets adapters. Every registered method handles SD 1.x/2.x and SDXL."""

    @abstractmethod
    def build_config(self, plan: TargetPlan, spec: LoraSpec) -> "PeftConfig":
        """The PEFT config that puts this method's adapters on exactly ``plan``'s layers."""

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` to the layers of ``plan`` (in place)."""
        import warnings

        from peft import inject_adapter_in_model

        with warnings.catch_warnings():
            # Several named adapters in one model is intended (preview mixes, training + files).
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(self.build_config(plan, spec), model, adapter_name=adapter_name)

    def param_groups(
        self,
        adapter: "LoraAdapter",
        *,
        lrs: Mapping[Component, float],
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: by default every adapter weight trains, one group per component.

        ``lrs`` holds the learning rate of each component ("unet", "text_encoder",
        "text_encoder_2"; see ``LoraAdapter.param_groups``). Groups carry a ``name`` key (the
        component) for logging; torch optimizers ignore it.
        """
        groups = []
        for component in COMPONENTS:
            params = [p for _, p in adapter.named_parameters(component)]
            for p in params:
                p.requires_grad_(True)
            if params:
                groups.append({"name": component, "params": params, "lr": lrs[component], "weight_decay": weight_decay})
        return groups

    @abstractmethod
    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora | None:
        """Plain ``down``/``up``/``alpha`` (+ ``dora_scale``) equal to this layer's adapter at scale 1.

        ``None`` leaves the layer out of the file: its adapter adds nothing (e.g. AdaLoRA pruned it
        to rank 0; the plain format has no rank-0 modules).
        """

    def export_metadata(self, adapter: "LoraAdapter", weights: "LoraWeights") -> dict[str, str]:
        """Facts about one export that its file records (e.g. an approximation error), called after
        every layer's :meth:`export`; written as-is into the file's metadata."""
        return {}

    # File hooks -----------------------------------------------------------------------------------
    def load_modules(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str,
                     modules: Mapping[str, Any]) -> None:
        """Put a file's modules (canonical path -> module of this method's kind) into ``model`` as
        adapter ``adapter_name`` on ``plan``'s layers, frozen. Default: plain LoRA layers holding
        ``down``/``up`` (``apply_weights`` calls this for plain LoRA files)."""
        import torch

        from .. import control
        from ..targets import canonical_path

        self.inject(model, plan, spec, adapter_name)
        with torch.no_grad():
            for path, layer in control.tuner_layers(model):
                canonical = canonical_path(plan.component, path)
                if canonical not in modules or adapter_name not in layer.r:  # type: ignore[attr-defined]
                    continue
                src = modules[canonical]
                a = layer.lora_A[adapter_name].weight  # type: ignore[attr-defined]
                b = layer.lora_B[adapter_name].weight  # type: ignore[attr-defined]
                a.copy_(src.down.reshape(a.shape).to(a.dtype))  # [a, b] <-> [a, b, 1, 1] where needed
                b.copy_(src.up.reshape(b.shape).to(b.dtype))
                a.requires_grad_(False)
                b.requires_grad_(False)

    def reduce_rank(self, weights: LoraWeights, rank: int) -> LoraWeights:
        """A copy of this method's exported ``weights`` with every layer above ``rank`` brought down
        to ``rank`` (``export --rank``). Default: the best rank-``rank`` approximation of each layer's
        delta (truncated SVD)."""
        return resize_rank(weights, rank)

    def describe(self, metadata: Mapping[str, str], suffixes: Collection[str]) -> str | None:
        """The network type ``inspect`` shows when a file is one of this method's (by its header
        ``metadata`` and the tensor-name ``suffixes`` of its modules, e.g. ``dora_scale``), else None.

        Methods whose files are plain LoRA to every other tool return None (the default); the file
        is then named by its layout (LoRA / LoCon). Also decides which method a file without an
        ``sdlora_method`` entry belongs to (see ``variants.method_for_file``)."""
        return None

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        """Method-specific entries of kohya's ``ss_network_args`` (string values, as kohya writes them).

        ``conv_dim``/``conv_alpha`` are derived from the exported weights by the file writer.
        """
        return {}

    # Training hooks ---------------------------------------------------------------------------------
    # The loop calls these for every method; the defaults do nothing. Methods whose adapters change
    # during training (rank budgets, sampled ranks, layer sharing, base-weight updates) use them.
    def before_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int) -> None:
        """Called before the forward pass of optimizer step ``step`` (0-based)."""

    def after_optimizer_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int, optimizer: Any) -> None:
        """Called right after ``optimizer.step()`` of step ``step`` (0-based), before ``zero_grad``."""

    def extra_state(self, adapter: "LoraAdapter") -> dict[str, Any]:
        """Anything beyond the adapter's parameters that a checkpoint must keep for an exact resume
        (tensors and JSON-serialisable values), e.g. changed base weights or a layer-sharing plan."""
        return {}

    def load_extra_state(self, adapter: "LoraAdapter", state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (called before the parameters are loaded)."""
