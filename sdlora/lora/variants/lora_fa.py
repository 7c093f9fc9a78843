"""LoRA-FA: LoRA with a frozen down-projection (Zhang et al. 2023, arXiv:2308.03303).

``delta W = s * B A`` as in LoRA, but ``A`` keeps its random initialisation (PEFT's Kaiming-uniform
init, the one plain LoRA uses) and only ``B`` (zero at start) trains. The optimizer therefore holds
no state for ``A``, and the backward pass needs no gradient for it, which is where the paper's
memory saving comes from (Sec. 3: the input activations are only needed through ``A x``, whose
``r`` channels are much smaller than the layer's input).

The exported file is an ordinary LoRA (``lora_down`` = the frozen ``A``); kohya's ``sd-scripts``
names this network ``networks.lora_fa``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Mapping

from ..targets import Component
from .lora import PlainLora

if TYPE_CHECKING:  # pragma: no cover
    from ..inject import LoraAdapter


class LoraFA(PlainLora):
    """PEFT LoRA layers whose ``lora_A`` stays frozen; LoRA+, rsLoRA and dropout combine with it."""

    name = "lora_fa"
    title = "LoRA-FA"
    description = "LoRA with the down-projection A frozen at its random init: only B trains (less optimizer memory)."
    kohya_network_module = "networks.lora_fa"
    option_names = frozenset({"loraplus_lr_ratio"})
    checkpoint_is_plain = True

    def param_groups(
        self,
        adapter: "LoraAdapter",
        *,
        lrs: Mapping[Component, float],
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Only ``up`` (PEFT's ``lora_B``) weights; ``A`` is frozen (``requires_grad=False``).

        With ``loraplus_lr_ratio`` the ``up`` weights train at ``ratio`` x the configured learning
        rate, the rate ``A`` would have had (LoRA+'s ratio of B's to A's learning rate).
        """
        groups = super().param_groups(adapter, lrs=lrs, weight_decay=weight_decay)
        frozen = {id(p): p for name, p in adapter.named_parameters() if ".lora_B." not in f".{name}"}
        for p in frozen.values():
            p.requires_grad_(False)
        kept = []
        for group in groups:
            params = [p for p in group["params"] if id(p) not in frozen]
            if params:
                kept.append({**group, "params": params})
        return kept

    def describe(self, metadata: Mapping[str, str], suffixes: Collection[str]) -> str | None:
        return self.title if metadata.get("ss_network_module") == self.kohya_network_module else None


__all__ = ["LoraFA"]
