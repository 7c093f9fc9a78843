"""What LoHa and LoKr (the LyCORIS methods, through PEFT's ``LoHaConfig`` / ``LoKrConfig``) share.

Their layers are PEFT ``LycorisLayer``s, not LoRA layers: the adapter is a set of factors in
``nn.ParameterDict``s named as LyCORIS names its tensors (``hada_w1_a``, ``lokr_w1``, ...), and the
layer adds ``delta W x`` computed from the factors (scale ``alpha / r``). PEFT's runtime controls
(scale, enable/disable, merge) work on them as on LoRA layers.

The exported file keeps the factors in the LyCORIS key layout (``<kohya module>.hada_w1_a``, ...,
``.alpha``) that A1111/Forge and ComfyUI load natively; ``ss_network_module`` is ``lycoris.kohya``
and ``ss_network_args`` carries ``algo`` as LyCORIS's kohya network writes it. diffusers loads only
LoRA factors, so its layout cannot hold these; ``export --rank R`` turns them into the best rank-R
plain LoRA (truncated SVD of each layer's delta, the error recorded in the file), which it can.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Collection, Mapping

import torch
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import TargetPlan, canonical_path
from ..weights import LoraWeights, ModuleLora
from .base import AdapterMethod

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.tuners_utils import BaseTunerLayer

#: option names for Tucker cores on k x k Conv2d layers: PEFT's, and LyCORIS's (``use_tucker``)
TUCKER_OPTIONS = ("use_effective_conv2d", "use_tucker")


def _bool_option(spec: LoraSpec, title: str, name: str, default: bool = False) -> bool:
    value = spec.options.get(name, default)
    if not isinstance(value, bool):
        raise LoraError(f"{title} option '{name}' must be true or false, got {value!r}.")
    return value


def lora_from_delta(weights: LoraWeights, rank: int) -> LoraWeights:
    """The best rank-``rank`` plain LoRA of every layer's delta (truncated SVD), with the errors.

    Each layer becomes ``down``/``up`` with ``alpha = rank`` (scale 1) that reproduce the layer's
    best rank-``rank`` approximation (a layer whose full rank is lower keeps its full rank). The
    relative Frobenius error over all layers and the worst layer's go into the metadata
    (``sdlora_svd_rel_error``, ``sdlora_svd_max_layer_error``).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"rank must be a whole number >= 1, got {rank!r}.")
    total = lost = 0.0
    worst = 0.0

    def convert(module: Any) -> ModuleLora:
        nonlocal total, lost, worst
        delta = module.delta().double()
        out_features = delta.shape[0]
        flat = delta.reshape(out_features, -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        k = max(1, min(rank, int(s.numel())))
        energy, rest = float(s.square().sum()), float(s[k:].square().sum())
        total, lost = total + energy, lost + rest
        worst = max(worst, math.sqrt(rest / energy) if energy > 0 else 0.0)
        root = s[:k].sqrt()
        up = (u[:, :k] * root).float()
        down = (root[:, None] * vh[:k]).float()
        if module.is_conv:
            return ModuleLora(down.reshape(k, *delta.shape[1:]).contiguous(), up.reshape(out_features, k, 1, 1).contiguous(), float(k))
        return ModuleLora(down.contiguous(), up.contiguous(), float(k))

    lora = weights.map_modules(convert, method="lora", info={**weights.info, "network_module": "networks.lora",
                                                              "network_args": {}})
    error = math.sqrt(lost / total) if total > 0 else 0.0
    meta = dict(lora.info.get("metadata") or {})
    meta.update({"sdlora_svd_from": weights.method, "sdlora_svd_rank": str(rank),
                 "sdlora_svd_rel_error": f"{error:.4g}", "sdlora_svd_max_layer_error": f"{worst:.4g}"})
    lora.info["metadata"] = meta
    return lora


class LycorisMethod(AdapterMethod):
    """Shared hooks of LoHa and LoKr; subclasses build the PEFT config and map tensors."""

    kohya_network_module = "lycoris.kohya"
    checkpoint_is_plain = False
    #: LyCORIS's ``algo`` name (``ss_network_args``), also the module kind (``ModuleLoha.kind`` ...)
    algo: ClassVar[str]
    #: the prefix of this method's tensor names in a file (``hada_`` / ``lokr_``)
    key_prefix: ClassVar[str]

    # Settings ---------------------------------------------------------------------------------------
    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        if spec.dropout:
            raise LoraError(
                f"network_dropout does not apply to {self.title}: its layers have no dropout on their input "
                "(LyCORIS has none either). Set network_dropout = 0."
            )
        if spec.rslora:
            raise LoraError(f"use_rslora does not apply to {self.title} (it scales by alpha / rank). Set use_rslora = false.")
        given = [name for name in TUCKER_OPTIONS if name in spec.options]
        values = {name: _bool_option(spec, self.title, name) for name in given}
        if len(set(values.values())) > 1:
            raise LoraError(
                f"{self.title} options 'use_effective_conv2d' and 'use_tucker' are the same setting (PEFT's and "
                f"LyCORIS's name); they disagree here ({values}). Give one of them."
            )

    def use_tucker(self, spec: LoraSpec) -> bool:
        """Tucker cores on k x k Conv2d layers (PEFT ``use_effective_conv2d``, LyCORIS ``use_tucker``)."""
        return any(bool(spec.options.get(name, False)) for name in TUCKER_OPTIONS)

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {"algo": self.algo, "use_tucker": str(self.use_tucker(spec))}

    # Files ------------------------------------------------------------------------------------------
    def describe(self, metadata: Mapping[str, str], suffixes: Collection[str]) -> str | None:
        from ..formats.kohya import parse_network_args

        if any(s.startswith(self.key_prefix) for s in suffixes):
            return self.title
        args = parse_network_args(metadata)
        if metadata.get("ss_network_module") == "lycoris.kohya" and str(args.get("algo", "")).lower() == self.algo:
            return self.title
        return None

    def reduce_rank(self, weights: LoraWeights, rank: int) -> LoraWeights:
        """``export --rank R``: a plain LoRA (truncated SVD of each layer's delta), errors recorded."""
        return lora_from_delta(weights, rank)

    # Layers <-> modules -----------------------------------------------------------------------------
    def layer_tensors(self, layer: "BaseTunerLayer", adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's factors in one layer by their LyCORIS name (``hada_w1_a`` ...), detached CPU copies."""
        out = {}
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if isinstance(container, nn.ParameterDict) and adapter_name in container:
                out[attr] = container[adapter_name].detach().to("cpu", copy=True).contiguous()
        return out

    def module_tensors(self, module: Any) -> dict[str, torch.Tensor]:
        """A module's factors by LyCORIS name (the inverse of building it from ``layer_tensors``)."""
        raise NotImplementedError

    def load_modules(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str,
                     modules: Mapping[str, Any]) -> None:
        """Inject this method's PEFT layers, then replace each layer's factors with the module's own
        (any shapes and decompositions a LyCORIS file holds: PEFT's layers compute the delta from
        whichever factors are present), frozen."""
        from .. import control

        self.inject(model, plan, spec, adapter_name)
        with torch.no_grad():
            for path, layer in control.tuner_layers(model):
                canonical = canonical_path(plan.component, path)
                if canonical not in modules or adapter_name not in layer.r:  # type: ignore[attr-defined]
                    continue
                created = self.layer_tensors(layer, adapter_name)
                template = next(iter(getattr(layer, a)[adapter_name] for a in created))
                for attr in created:
                    del getattr(layer, attr)[adapter_name]
                for attr, tensor in self.module_tensors(modules[canonical]).items():
                    getattr(layer, attr)[adapter_name] = nn.Parameter(
                        tensor.to(device=template.device, dtype=template.dtype), requires_grad=False)

    @staticmethod
    def layer_shape(layer: "BaseTunerLayer") -> tuple[int, ...]:
        return tuple(int(n) for n in layer.get_base_layer().weight.shape)  # type: ignore[attr-defined]


__all__ = ["LycorisMethod", "TUCKER_OPTIONS", "lora_from_delta"]
