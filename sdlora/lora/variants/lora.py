"""Plain LoRA (Hu et al. 2021) on Linear and Conv2d layers, through PEFT's ``LoraConfig``.

Conv2d adapters are a k x k ``down`` conv with the base layer's stride and padding followed by a
1 x 1 ``up`` conv (PEFT's ``lora.Conv2d``), i.e. kohya's LoCon layout. ``up`` starts at zero, so a
fresh adapter leaves every output bit-identical.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import ModuleLora
from .base import AdapterMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer


class PlainLora(AdapterMethod):
    name = "lora"
    title = "LoRA"
    description = "Low-rank adapters on attention/MLP Linear layers and (preset 'full') Conv2d layers."
    kohya_network_module = "networks.lora"

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
            init_lora_weights=True,
            bias="none",
        )

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLora:
        rank = int(layer.r[adapter_name])
        alpha = float(layer.lora_alpha[adapter_name])
        if layer.use_rslora.get(adapter_name, False):
            # rsLoRA scales by alpha / sqrt(r); the plain format scales by alpha / r.
            alpha = alpha * math.sqrt(rank)
        down = layer.lora_A[adapter_name].weight.detach().to("cpu", copy=True).contiguous()
        up = layer.lora_B[adapter_name].weight.detach().to("cpu", copy=True).contiguous()
        return ModuleLora(down=down, up=up, alpha=alpha)
