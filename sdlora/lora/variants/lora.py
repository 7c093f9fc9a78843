"""Plain LoRA (Hu et al. 2021) on Linear and Conv2d layers, through PEFT's ``LoraConfig``.

Conv2d adapters are a k x k ``down`` conv with the base layer's stride and padding followed by a
1 x 1 ``up`` conv (PEFT's ``lora.Conv2d``), i.e. kohya's LoCon layout. ``up`` starts at zero, so a
fresh adapter leaves every output bit-identical.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import Component, TargetPlan
from ..weights import ModuleLora
from .base import AdapterMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..inject import LoraAdapter


class PlainLora(AdapterMethod):
    name = "lora"
    title = "LoRA"
    description = "Low-rank adapters on attention/MLP Linear layers and (preset 'full') Conv2d layers."
    kohya_network_module = "networks.lora"
    #: LoRA+ (Hayou et al. 2024): ``up`` (PEFT's lora_B) trains at ``ratio`` x the learning rate
    option_names = frozenset({"loraplus_lr_ratio"})
    checkpoint_is_plain = True

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        ratio = spec.options.get("loraplus_lr_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 0):
            raise LoraError(f"LoRA option 'loraplus_lr_ratio' must be a number >= 0 (0 = off), got {ratio!r}.")

    def param_groups(
        self,
        adapter: "LoraAdapter",
        *,
        lrs: Mapping[Component, float],
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """One group per component; with LoRA+ each component splits into ``down`` and ``up`` groups."""
        ratio = float(adapter.spec.options.get("loraplus_lr_ratio") or 0.0)
        groups = super().param_groups(adapter, lrs=lrs, weight_decay=weight_decay)
        if not ratio:
            return groups
        split: list[dict[str, Any]] = []
        for group in groups:
            up_ids = {id(p) for name, p in adapter.named_parameters(group["name"]) if ".lora_B." in f".{name}"}
            down = [p for p in group["params"] if id(p) not in up_ids]
            up = [p for p in group["params"] if id(p) in up_ids]
            split.append({**group, "name": f"{group['name']}.down", "params": down})
            split.append({**group, "name": f"{group['name']}.up", "params": up, "lr": group["lr"] * ratio})
        return split

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
