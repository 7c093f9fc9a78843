"""QLoRA: LoRA on a 4-bit NF4-quantised base model (Dettmers et al. 2023, arXiv:2305.14314).

Before the adapters are injected, every ``nn.Linear`` of the adapted model (UNet, and the text
encoder when it is trained) is replaced by a ``bitsandbytes.nn.Linear4bit`` holding its weight in
4-bit NormalFloat (Sec. 3, NF4) with double quantisation of the block scales (Sec. 3, "Double
Quantization"); computation runs in the original weight's dtype. PEFT then puts its LoRA layers
for bitsandbytes (``peft.tuners.lora.bnb.Linear4bit``) on the targeted Linear layers; Conv2d layers
have no 4-bit form and keep full-precision weights with ordinary LoRA adapters on them.

The adapters are trained against the quantised base, so previews during training show the
quantised model; the exported file is a plain LoRA that other tools apply to the full-precision
base (the paper's intended use). The paper's paged optimizer is not used: the training loop's
optimizer choice (``optimizer_type``, e.g. ``AdamW8bit``) applies.

bitsandbytes is an optional dependency. Where it is missing, or cannot run 4-bit layers on the
model's device, injection stops with a :class:`~sdlora.lora.errors.LoraError` that says so. A CUDA
GPU is the intended device; releases before the multi-backend work have no CPU path at all, while
recent ones (0.50 was checked) also run NF4 layers on the CPU, slowly. Support is probed with a
small layer (forward and backward) on the model's device before anything is changed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import Component, TargetPlan
from .lora import PlainLora

QUANT_TYPE = "nf4"


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise LoraError(
            "network_type 'qlora' needs bitsandbytes for its 4-bit NF4 base weights, and it is not installed "
            f"({exc}). Install it (pip install bitsandbytes; a CUDA GPU is needed for most releases) or use "
            "network_type 'lora'."
        ) from None
    return bnb


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_support(device: torch.device | str, in_features: int = 64, out_features: int = 64) -> None:
    """Raise :class:`LoraError` unless bitsandbytes can run a 4-bit NF4 layer of this size on ``device``.

    The probe layer is used as training uses it (forward and backward to its input) and as previews
    use it (evaluation mode, no gradients); bitsandbytes takes different code paths for the two.
    """
    bnb = _bitsandbytes()
    device = torch.device(device)
    try:
        layer = _quantized_copy(bnb, nn.Linear(in_features, out_features, device=device), device)
        x = torch.randn(2, in_features, device=device, requires_grad=True)
        layer.train()
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite input gradient through the 4-bit layer")
        layer.eval()
        with torch.no_grad():
            if not torch.isfinite(layer(x.detach())).all():
                raise RuntimeError("non-finite output of the 4-bit layer")
    except LoraError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means this device cannot train QLoRA
        where = "this CPU" if device.type == "cpu" else str(device)
        raise LoraError(
            f"network_type 'qlora' cannot run here: bitsandbytes {getattr(bnb, '__version__', '?')} has no working "
            f"4-bit NF4 path on {where} for a Linear {in_features}->{out_features} layer of this model "
            f"({type(exc).__name__}: {exc}). QLoRA needs a CUDA GPU (or a bitsandbytes release whose CPU 4-bit "
            "path handles these layers); use network_type 'lora' on this machine."
        ) from None


def _quantized_copy(bnb: Any, linear: nn.Linear, device: torch.device) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4, double quantisation) with ``linear``'s weights, on ``device``."""
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        device="cpu",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to("cpu", copy=True), requires_grad=False, compress_statistics=True, quant_type=QUANT_TYPE
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=False)
    layer = layer.to(device)
    if getattr(layer.weight, "quant_state", None) is None:
        raise RuntimeError(f"bitsandbytes did not quantise the weight on {device}")
    return layer


def quantize_linear_layers(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by an NF4 ``Linear4bit`` (in place); returns the count.

    Layers that are already 4-bit, or already wrapped by an adapter, are left alone.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    bnb = _bitsandbytes()
    device = _device_of(model)
    linear = [m for m in model.modules() if type(m) is nn.Linear]
    if linear:
        # the narrowest layer: some bitsandbytes releases fail on layers narrower than their block size
        narrowest = min(linear, key=lambda m: m.in_features)
        check_support(device, narrowest.in_features, narrowest.out_features)
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, BaseTunerLayer):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                quantized = _quantized_copy(bnb, child, device)
                quantized.train(child.training)
                setattr(parent, child_name, quantized)
                count += 1
    return count


def is_nf4(module: nn.Module) -> bool:
    """Whether ``module`` holds its weight as 4-bit NF4 (a bitsandbytes ``Linear4bit``)."""
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_type", None) == QUANT_TYPE and getattr(weight, "quant_state", None) is not None


class QLora(PlainLora):
    """LoRA (PEFT) on NF4 base Linear layers; LoRA+, rsLoRA and dropout combine with it."""

    name = "qlora"
    title = "QLoRA"
    description = "LoRA on a 4-bit NF4 base model (needs bitsandbytes, meant for a CUDA GPU): far less memory for the frozen weights."
    kohya_network_module = "networks.lora"
    option_names = frozenset({"loraplus_lr_ratio"})
    checkpoint_is_plain = True

    def check_models(self, models: Mapping[Component, nn.Module], spec: LoraSpec) -> None:
        """Probe the 4-bit path for every model (UNet and each text encoder) before any is quantised,
        so that an SDXL setup fails before the UNet is changed when an encoder cannot run NF4."""
        for model in models.values():
            linear = [m for m in model.modules() if type(m) is nn.Linear]
            if linear:
                narrowest = min(linear, key=lambda m: m.in_features)
                check_support(_device_of(model), narrowest.in_features, narrowest.out_features)

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        quantize_linear_layers(model)
        super().inject(model, plan, spec, adapter_name)

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {"base_quantization": QUANT_TYPE, "double_quantization": "True"}


__all__ = ["QLora", "check_support", "is_nf4", "quantize_linear_layers"]
