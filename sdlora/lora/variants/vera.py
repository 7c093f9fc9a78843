"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

Eq. (1) of the paper::

    h = W0 x + Lambda_b B Lambda_d A x

``A`` (``r x in``) and ``B`` (``out x r``) are random (Kaiming-uniform), frozen and shared; only the
diagonal scaling vectors ``d`` (length ``r``, initialised to a constant, 0.1 by default) and ``b``
(length ``out``, initialised to zero, so a fresh adapter is the identity) train. Here the pair is
shared by every adapted layer of a model whose weight has the same shape (the paper shares one pair
across layers; layers of different shapes need matrices of their own). Conv2d layers use a k x k
``A`` convolution and a 1 x 1 ``B`` convolution, as LoRA's Conv2d layers do, with ``d`` and ``b``
scaling their channels. The output is multiplied by ``alpha / r`` like LoRA's (1 by default).

PEFT has a VeRA tuner, but its layers are not LoRA layers (no scale / multi-adapter controls the
rest of this project relies on) and it covers Linear layers only, so VeRA is written here as a
PEFT ``LoraVariant`` on PEFT's LoRA layers. The shared matrices are generated from
``projection_seed`` and the layer shape (nothing random is stored: a checkpoint holds ``d`` and ``b``
only, and resuming regenerates the same matrices); they are buffers of PEFT's ``lora_A``/``lora_B``
modules, not parameters, so nothing trains or is saved twice.

Export materialises every layer: ``lora_down = diag(d) A``, ``lora_up = diag(b) B``.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import ModuleLora
from . import layer_variants as lv
from .base import AdapterMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter

D_ATTR = "vera_lambda_d"
B_ATTR = "vera_lambda_b"
DEFAULT_D_INITIAL = 0.1
DEFAULT_PROJECTION_SEED = 0


def shared_projection(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A frozen Kaiming-uniform matrix of ``shape`` determined only by ``seed`` and ``shape``.

    Same bound as ``nn.init.kaiming_uniform_(a=sqrt(5))`` (PEFT's VeRA init): ``1 / sqrt(fan_in)``.
    """
    generator = torch.Generator("cpu").manual_seed(zlib.crc32(f"vera:{seed}:{list(shape)}".encode()))
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    values = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return values.to(device=device, dtype=dtype)


def _share(module: nn.Module, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the (frozen, non-saved) weight of a PEFT ``lora_A``/``lora_B`` Linear/Conv module."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.register_buffer("weight", tensor, persistent=False)


class VeraVariant(LoraVariant):
    """PEFT ``LoraVariant`` hooks for VeRA (static methods, as PEFT calls them)."""

    @staticmethod
    def supports_lora_conversion() -> bool:
        return True

    @staticmethod
    def vectors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(``d``, ``b``) of adapter ``name``."""
        return getattr(module, D_ATTR)[name], getattr(module, B_ATTR)[name]

    @staticmethod
    def factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain ``(down, up) = (diag(d) A, diag(b) B)`` in the layer's weight layout."""
        d, b = VeraVariant.vectors(module, name)
        a = module.lora_A[name].weight  # type: ignore[index]
        bm = module.lora_B[name].weight  # type: ignore[index]
        down = a * d.reshape((-1,) + (1,) * (a.ndim - 1))
        up = bm * b.reshape((-1,) + (1,) * (bm.ndim - 1))
        return down, up

    @staticmethod
    def delta_weight(module: nn.Module, name: str) -> torch.Tensor:
        down, up = VeraVariant.factors(module, name)
        return lv.lora_product(module, name, down, up) * float(module.scaling[name])  # type: ignore[index]

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **_: Any) -> torch.Tensor:
        d, b = VeraVariant.vectors(module, active_adapter)
        lora_a = module.lora_A[active_adapter]  # type: ignore[index]
        lora_b = module.lora_B[active_adapter]  # type: ignore[index]
        dropout = module.lora_dropout[active_adapter]  # type: ignore[index]
        h = lora_a(dropout(x))
        channel_dim = 1 if h.ndim == 4 else -1
        view = [1] * h.ndim
        view[channel_dim] = -1
        # the vectors may be kept in another precision than the frozen projections (e.g. fp32 vs fp16)
        h = lora_b((h * d.reshape(view).to(h.dtype)).to(lora_b.weight.dtype))
        return result + (h * b.reshape(view).to(h.dtype)) * float(module.scaling[active_adapter])  # type: ignore[index]

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (orig_weight.float() + VeraVariant.delta_weight(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        with torch.no_grad():
            delta = VeraVariant.delta_weight(module, active_adapter)
            orig_weight.data = (orig_weight.data.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (orig_weight.data.float() - VeraVariant.delta_weight(module, active_adapter)).to(orig_weight.dtype)


class Vera(AdapterMethod):
    """VeRA on PEFT LoRA layers (Linear and Conv2d); rsLoRA scaling and dropout combine with it."""

    name = "vera"
    title = "VeRA"
    description = (
        "Frozen random A/B shared across layers of the same shape; only two scaling vectors per layer train "
        "(very few parameters; use a larger rank, e.g. 64-256)."
    )
    kohya_network_module = "networks.lora"
    option_names = frozenset({"projection_seed", "d_initial", "loraplus_lr_ratio"})

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        seed = spec.options.get("projection_seed", DEFAULT_PROJECTION_SEED)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LoraError(f"VeRA option 'projection_seed' must be a whole number >= 0, got {seed!r}.")
        d_initial = spec.options.get("d_initial", DEFAULT_D_INITIAL)
        if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial) or d_initial == 0:
            raise LoraError(f"VeRA option 'd_initial' must be a non-zero number (paper: 0.1), got {d_initial!r}.")
        if spec.options.get("loraplus_lr_ratio"):
            raise LoraError(
                "loraplus_lr_ratio does not apply to VeRA: its A and B matrices are frozen and shared, only the "
                "scaling vectors d and b train. Set loraplus_lr_ratio = 0."
            )

    def build_config(self, plan: TargetPlan, spec: LoraSpec) -> "LoraConfig":
        from peft import LoraConfig

        return LoraConfig(
            r=plan.default_rank,
            lora_alpha=plan.default_alpha,
            target_modules=plan.target_regex(),
            rank_pattern=plan.rank_pattern(),
            alpha_pattern=plan.alpha_pattern(),
            lora_dropout=float(spec.dropout),
            use_rslora=bool(spec.rslora),
            init_lora_weights=False,  # A and B are replaced by the shared projections below
            bias="none",
        )

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        super().inject(model, plan, spec, adapter_name)
        seed = int(spec.options.get("projection_seed", DEFAULT_PROJECTION_SEED))
        d_initial = float(spec.options.get("d_initial", DEFAULT_D_INITIAL))
        shared: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for _, layer in lv.layers_with(model, adapter_name):
            base = lv.base_module(layer)
            lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            rank = int(layer.r[adapter_name])
            template = lora_a.weight
            key = (rank, *base.weight.shape)
            if key not in shared:
                shared[key] = (
                    shared_projection(tuple(lora_a.weight.shape), seed, template.dtype, template.device),
                    shared_projection(tuple(lora_b.weight.shape), seed, template.dtype, template.device),
                )
            a, b = shared[key]
            _share(lora_a, a)
            _share(lora_b, b)
            lv.parameter_container(layer, D_ATTR)[adapter_name] = nn.Parameter(
                torch.full((rank,), d_initial, dtype=template.dtype, device=template.device)
            )
            lv.parameter_container(layer, B_ATTR)[adapter_name] = nn.Parameter(
                torch.zeros(int(layer.out_features), dtype=template.dtype, device=template.device)
            )
            lv.attach(layer, adapter_name, VeraVariant())  # type: ignore[arg-type]

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora:
        rank = int(layer.r[adapter_name])  # type: ignore[attr-defined]
        alpha = float(layer.lora_alpha[adapter_name])  # type: ignore[attr-defined]
        if layer.use_rslora.get(adapter_name, False):  # type: ignore[attr-defined]
            alpha = alpha * math.sqrt(rank)
        with torch.no_grad():
            down, up = VeraVariant.factors(layer, adapter_name)  # type: ignore[arg-type]
        return ModuleLora(
            down=down.detach().to("cpu", torch.float32, copy=True).contiguous(),
            up=up.detach().to("cpu", torch.float32, copy=True).contiguous(),
            alpha=alpha,
        )

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        seed = spec.options.get("projection_seed", DEFAULT_PROJECTION_SEED)
        d_initial = spec.options.get("d_initial", DEFAULT_D_INITIAL)
        return {"algo": "vera", "projection_seed": str(seed), "d_initial": str(d_initial)}


__all__ = ["Vera", "VeraVariant", "shared_projection"]
