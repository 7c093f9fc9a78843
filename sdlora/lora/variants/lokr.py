"""LoKr: Kronecker product adapters (Yeh et al. 2024, LyCORIS ``algo=lokr``), through PEFT's
``LoKrConfig`` layers (Linear and Conv2d).

Each layer's ``[out, in]`` weight is split as ``out = a * b``, ``in = c * d`` (``factor``: the
split closest to it, -1 = closest to the square root) and the layer adds
``delta W = kron(w1, w2) * scale`` with a small ``w1 [a, c]`` and a larger ``w2 [b, d * kh * kw]``.
``w2`` is a rank-``r`` product ``w2_a @ w2_b`` unless ``r`` is at least half its larger side (then a
full matrix); with ``decompose_both`` ``w1`` is decomposed the same way.

Tucker cores (PEFT ``use_effective_conv2d``, LyCORIS ``use_tucker``: ``lokr_t2 [r, r, kh, kw]``
with ``w2_a [r, b]``, ``w2_b [r, d]``) are not trained: ComfyUI's ``comfy/weight_adapter/lokr.py``
hands the rebuilt core (a non-contiguous einsum result) to ``torch.kron`` without making it
contiguous, which torch refuses ("view size is not compatible"), so ComfyUI would skip every such
layer. Files holding them (from LyCORIS) are still read and applied here.

Scale: PEFT applies ``alpha / r`` to every layer. A1111/ComfyUI (and LyCORIS) apply ``alpha / r``
only when a factor is decomposed and 1 when both are full matrices, so for those layers the export
folds ``alpha / r`` into ``lokr_w1`` and writes ``alpha = r`` (what LyCORIS writes there). The
exported delta is the trained one in every case.

PEFT's LyCORIS-style init (``init_weights="lycoris"``) zeroes ``w2`` (or ``w2_b``), so a fresh
adapter leaves every output unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import ModuleLokr
from .lycoris_base import TUCKER_OPTIONS, LycorisMethod, _bool_option

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoKrConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

DEFAULT_FACTOR = -1


class Lokr(LycorisMethod):
    name = "lokr"
    title = "LoKr"
    description = (
        "LyCORIS LoKr: a Kronecker product of a small and a low-rank (or full) matrix per layer, very few "
        "parameters; file in the LyCORIS layout A1111/Forge and ComfyUI load (not diffusers)."
    )
    algo = "lokr"
    key_prefix = "lokr_"
    option_names = frozenset({"factor", "decompose_both", *TUCKER_OPTIONS})

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        factor = spec.options.get("factor", DEFAULT_FACTOR)
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
            raise LoraError(
                f"LoKr option 'factor' must be -1 (split each dimension near its square root) or a whole number "
                f">= 1 (the size of the small Kronecker factor), got {factor!r}."
            )
        _bool_option(spec, self.title, "decompose_both")
        if self.use_tucker(spec):
            raise LoraError(
                "LoKr option 'use_effective_conv2d' / 'use_tucker' is not offered: ComfyUI's LoKr loader fails on "
                "the Tucker cores (lokr_t2) it writes and would skip those layers. Leave it false (LoHa has it)."
            )

    def build_config(self, plan: TargetPlan, spec: LoraSpec) -> "LoKrConfig":
        from peft import LoKrConfig

        return LoKrConfig(
            r=plan.default_rank,
            alpha=plan.default_alpha,
            target_modules=plan.target_regex(),
            rank_pattern=plan.rank_pattern(),
            alpha_pattern=plan.alpha_pattern(),
            use_effective_conv2d=False,
            decompose_both=bool(spec.options.get("decompose_both", False)),
            decompose_factor=int(spec.options.get("factor", DEFAULT_FACTOR)),
            init_weights="lycoris",
        )

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {**super().network_args(spec), "factor": str(spec.options.get("factor", DEFAULT_FACTOR)),
                "decompose_both": str(bool(spec.options.get("decompose_both", False)))}

    def export(self, layer: "BaseTunerLayer", adapter_name: str) -> ModuleLokr:
        t = self.layer_tensors(layer, adapter_name)
        alpha = float(layer.alpha[adapter_name])  # type: ignore[attr-defined]
        rank = int(layer.r[adapter_name])  # type: ignore[attr-defined]
        w1 = t.get("lokr_w1")
        if w1 is not None and "lokr_w2" in t:
            # Both full: the tools apply scale 1, PEFT trained with alpha / r.
            w1 = (w1.float() * (alpha / rank)).to(w1.dtype)
            alpha = float(rank)
        return ModuleLokr(
            alpha=alpha, shape=self.layer_shape(layer), w1=w1, w1_a=t.get("lokr_w1_a"), w1_b=t.get("lokr_w1_b"),
            w2=t.get("lokr_w2"), w2_a=t.get("lokr_w2_a"), w2_b=t.get("lokr_w2_b"), t2=t.get("lokr_t2"),
        )

    def module_tensors(self, module: Any) -> dict:
        names = {"lokr_w1": module.w1, "lokr_w1_a": module.w1_a, "lokr_w1_b": module.w1_b, "lokr_w2": module.w2,
                 "lokr_w2_a": module.w2_a, "lokr_w2_b": module.w2_b, "lokr_t2": module.t2}
        return {k: v for k, v in names.items() if v is not None}


__all__ = ["Lokr"]
