"""LoHa: low-rank Hadamard product adapters (Hyeon-Woo et al. 2022, FedPara; LyCORIS ``algo=loha``),
through PEFT's ``LoHaConfig`` layers (Linear and Conv2d).

Each layer adds ``delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``: two rank-``r`` products
multiplied element-wise, so the update can reach rank ``r^2`` with the parameters of a rank-``2r``
LoRA. Shapes (LyCORIS, PEFT and the tools agree): ``w*_a [out, r]``, ``w*_b [r, in * kh * kw]``,
the product reshaped to the layer's weight. With ``use_effective_conv2d`` (LyCORIS ``use_tucker``)
k x k Conv2d layers get Tucker cores ``hada_t1``/``hada_t2 [r, r, kh, kw]`` with ``w*_a [r, out]``
and ``w*_b [r, in]``, which A1111 and ComfyUI also read.

``w2_b`` starts at zero (PEFT's init), so a fresh adapter leaves every output unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import ModuleLoha
from .lycoris_base import TUCKER_OPTIONS, LycorisMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoHaConfig
    from peft.tuners.tuners_utils import BaseTunerLayer


class Loha(LycorisMethod):
    name = "loha"
    title = "LoHa"
    description = (
        "LyCORIS LoHa: two low-rank products multiplied element-wise (rank up to r^2 for the parameters of a "
        "rank-2r LoRA); file in the LyCORIS layout A1111/Forge and ComfyUI load (not diffusers)."
    )
    algo = "loha"
    key_prefix = "hada_"
    option_names = frozenset(TUCKER_OPTIONS)

    def build_config(self, plan: TargetPlan, spec: LoraSpec) -> "LoHaConfig":
        from peft import LoHaConfig

        return LoHaConfig(
            r=plan.default_rank,
            alpha=plan.default_alpha,
            target_modules=plan.target_regex(),
            rank_pattern=plan.rank_pattern(),
            alpha_pattern=plan.alpha_pattern(),
            use_effective_conv2d=self.use_tucker(spec),
            init_weights=True,
        )

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLoha:
        t = self.layer_tensors(layer, adapter_name)
        return ModuleLoha(
            w1_a=t["hada_w1_a"], w1_b=t["hada_w1_b"], w2_a=t["hada_w2_a"], w2_b=t["hada_w2_b"],
            alpha=float(layer.alpha[adapter_name]),  # type: ignore[attr-defined]
            shape=self.layer_shape(layer), t1=t.get("hada_t1"), t2=t.get("hada_t2"),
        )

    def module_tensors(self, module: Any) -> dict:
        out = {"hada_w1_a": module.w1_a, "hada_w1_b": module.w1_b, "hada_w2_a": module.w2_a, "hada_w2_b": module.w2_b}
        if module.t1 is not None:
            out.update(hada_t1=module.t1, hada_t2=module.t2)
        return out


__all__ = ["Loha"]
