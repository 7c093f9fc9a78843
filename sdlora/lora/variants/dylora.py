"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", EACL 2023): one adapter trained for every rank b <= r.

Each training step samples a rank ``b`` uniformly from ``{1, ..., r}`` (the paper's ``p_B``) and the
layer computes the truncated forward pass of the paper::

    h = W0 x + alpha / b * W_up[:, :b] W_dw[:b, :] x

In the paper's default ("frozen") mode only the ``b``-th row of ``W_dw`` and the ``b``-th column of
``W_up`` are updated in that step; with ``frozen = false`` all components ``<= b`` are. The others
get no gradient, and after the optimizer step they are put back as they were (so neither Adam's
momentum nor weight decay moves them). Because the components are sorted this way, the first ``k`` rows and
columns of the trained adapter are a rank-``k`` LoRA for every ``k``: ``sdlora export --rank k``
writes that truncation (:func:`truncate_rank`, no SVD) and the preview can switch rank
(:func:`set_active_rank`, ``Previewer.set_rank``).

Written for this project as a PEFT ``LoraVariant`` on PEFT's LoRA layers (PEFT has no DyLoRA): the
weights are ordinary ``lora_A``/``lora_B`` modules, so checkpoints, runtime controls and merging work
as for plain LoRA. Ranks differ between layer families when ``conv_dim``/``text_encoder_dim`` differ
from ``network_dim``; one uniform draw ``u`` per step then picks ``b = 1 + floor(u * r)`` for every
layer, so all layers truncate at the same fraction of their rank. The draw depends only on the step
and the ``seed`` option, so a resumed run samples the same ranks and every process of a multi-GPU
run uses the same rank.

The exported file at full rank is a plain LoRA (scale ``alpha / r``); the truncation to ``k`` keeps
``alpha`` (scale ``alpha / k``), as the paper's forward pass does.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..errors import LoraError
from ..spec import LoraSpec
from ..targets import TargetPlan
from ..weights import LoraWeights, ModuleLora
from .lora import PlainLora

if TYPE_CHECKING:  # pragma: no cover
    from ..inject import LoraAdapter

#: kohya's module name for DyLoRA networks (their files use the same lora_down/lora_up keys)
NETWORK_MODULE = "networks.dylora"


class DyLoraVariant(LoraVariant):
    """The truncated forward pass of one adapter in one PEFT LoRA layer (a PEFT ``LoraVariant``).

    ``rank`` is the number of leading components in use (``None``: all). During a training step
    ``train_from`` is the first component that receives gradients (frozen mode: ``rank - 1``, else
    0); components below it are used without gradient. ``kept`` holds the weights as they were
    before the step, to put back the components the step must not change.
    """

    def __init__(self) -> None:
        self.rank: int | None = None
        self.train_from: int | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def supports_lora_conversion() -> bool:
        return True

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **_: Any) -> None:  # pragma: no cover - attached, not resolved
        return None

    def _factors(self, module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, factor): the active components and the extra factor ``r / b`` on the layer's scaling."""
        down = module.lora_A[name].weight
        up = module.lora_B[name].weight
        full = int(module.r[name])
        b = full if self.rank is None else min(self.rank, full)
        if self.train_from and module.training and torch.is_grad_enabled():
            i = self.train_from
            down = torch.cat([down[:i].detach(), down[i:b]])
            up = torch.cat([up[:, :i].detach(), up[:, i:b]], dim=1)
        elif b < full:
            down, up = down[:b], up[:, :b]
        return down, up, full / b

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **_: Any) -> torch.Tensor:
        name = active_adapter
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        dropout, scaling = module.lora_dropout[name], module.scaling[name]
        if self.rank is None:
            return result + lora_b(lora_a(dropout(x))) * scaling  # exactly PEFT's plain LoRA path
        down, up, factor = self._factors(module, name)
        if isinstance(lora_a, nn.Conv2d):
            hidden = F.conv2d(dropout(x), down, None, lora_a.stride, lora_a.padding, lora_a.dilation, lora_a.groups)
            out = F.conv2d(hidden, up)
        else:
            out = F.linear(F.linear(dropout(x), down), up)
        return result + out * (scaling * factor)

    def delta_weight(self, module: nn.Module, name: str) -> torch.Tensor:
        """The weight change at the active rank and the layer's current scale (for merging)."""
        down, up, factor = self._factors(module, name)
        base = module.get_base_layer().weight
        rank = down.shape[0]
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        return (delta * (module.scaling[name] * factor)).reshape(base.shape).to(base.dtype)

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + self.delta_weight(module, active_adapter)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += self.delta_weight(module, active_adapter)

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - self.delta_weight(module, active_adapter)


def _dylora_layers(models: Any, name: str, *, attach: bool = False) -> list[tuple[nn.Module, DyLoraVariant]]:
    """(layer, variant) of adapter ``name``; ``attach`` adds the variant to plain LoRA layers."""
    from . import layer_variants as lv

    found = []
    for _, layer in lv.layers_with(models, name):
        variant = layer.lora_variant.get(name)  # type: ignore[attr-defined]
        if variant is None and attach:
            variant = DyLoraVariant()
            lv.attach(layer, name, variant)  # type: ignore[arg-type]
        if not isinstance(variant, DyLoraVariant):
            raise LoraError(f"Adapter {name!r} is not a DyLoRA adapter; only DyLoRA adapters have nested ranks.")
        found.append((layer, variant))
    if not found:
        raise LoraError(f"No adapter named {name!r} in the models.")
    return found


def set_active_rank(models: Any, adapter_name: str, rank: int | None, *, attach: bool = False) -> None:
    """Use only the first ``rank`` components of DyLoRA adapter ``adapter_name`` (``None``: all).

    ``models`` are the UNet / text encoder (or a ``control.LayerSet``). Layers whose rank is lower
    keep all of theirs. The result equals the rank-``rank`` file :func:`truncate_rank` writes.
    ``attach=True`` also accepts plain LoRA layers (a DyLoRA *file* loaded as plain LoRA).
    Refused while the adapter is merged (unmerge first).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoraError(f"DyLoRA rank must be a whole number >= 1 (or None for all), got {rank!r}.")
    layers = _dylora_layers(models, adapter_name, attach=attach)
    if any(adapter_name in layer.merged_adapters for layer, _ in layers):  # type: ignore[attr-defined]
        raise LoraError("Unmerge the adapter before changing its rank.")
    for _, variant in layers:
        variant.rank = rank
        variant.train_from = None


def active_rank(models: Any, adapter_name: str) -> int | None:
    """The rank set by :func:`set_active_rank` (``None``: full rank)."""
    return _dylora_layers(models, adapter_name)[0][1].rank


def truncate_rank(weights: LoraWeights, rank: int) -> LoraWeights:
    """The rank-``rank`` DyLoRA: the first ``rank`` rows of every ``down`` and columns of every ``up``.

    ``alpha`` stays (DyLoRA scales a rank-``b`` truncation by ``alpha / b``, the plain format by
    ``alpha / rank``), layers of lower rank are kept as they are. No SVD: the nested training makes
    the leading components the rank-``rank`` adapter.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number >= 1, got {rank!r}")

    def cut(m: ModuleLora) -> ModuleLora:
        if m.dora_scale is not None:
            raise ValueError("DoRA weights cannot be truncated (their magnitude depends on the full delta)")
        if m.rank <= rank:
            return m
        return ModuleLora(m.down[:rank].clone(), m.up[:, :rank].clone(), m.alpha)

    info = {**weights.info, "truncated_to_rank": rank, "network_module": NETWORK_MODULE}
    return weights.map_modules(cut, method="dylora", info=info)


def is_dylora_metadata(metadata: Mapping[str, str]) -> bool:
    """Whether a LoRA file's metadata says it holds a DyLoRA (ours, kohya's ``networks.dylora`` or
    LyCORIS ``algo=dylora``)."""
    return metadata.get("sdlora_method") == "dylora" or DyLora.recognises(metadata)


def check_dylora_file(path: str | Path) -> None:
    """:class:`LoraError` unless the file at ``path`` is a DyLoRA file (nested ranks)."""
    from ..formats.io import read_metadata

    if not is_dylora_metadata(read_metadata(path)):
        raise LoraError(
            f"{path} is not a DyLoRA file (its metadata names no DyLoRA method), so its leading components "
            "are not a lower-rank LoRA; use `sdlora export --rank` (SVD) to make a lower-rank copy instead."
        )


def _draw(step: int, seed: int) -> float:
    """The uniform number in [0, 1) that picks every layer's rank at ``step``."""
    return random.Random(f"dylora:{seed}:{step}").random()


def rank_for_step(step: int, rank: int, seed: int = 0) -> int:
    """The rank ``b`` in ``1..rank`` trained at ``step`` (uniform; same for every process and resume)."""
    return min(rank, 1 + int(_draw(step, seed) * rank))


class DyLora(PlainLora):
    name = "dylora"
    title = "DyLoRA"
    description = "Nested ranks: trains every rank <= r at once by sampling one per step; export or preview any rank."
    kohya_network_module = NETWORK_MODULE
    option_names = frozenset({"loraplus_lr_ratio", "frozen", "seed"})
    checkpoint_is_plain = False  # exported through the adapter (nested-rank facts in the metadata)

    @staticmethod
    def recognises(metadata: Mapping[str, str]) -> bool:
        from ..formats.kohya import parse_network_args

        if metadata.get("ss_network_module") == NETWORK_MODULE:
            return True
        algo = str(parse_network_args(metadata).get("algo", "")).lower()
        return metadata.get("ss_network_module") == "lycoris.kohya" and algo == "dylora"

    def describe(self, metadata: Mapping[str, str], suffixes: Collection[str]) -> str | None:
        return self.title if self.recognises(metadata) else None

    def reduce_rank(self, weights: LoraWeights, rank: int) -> LoraWeights:
        """The leading ``rank`` components (DyLoRA trained them as the rank-``rank`` adapter), no SVD."""
        return truncate_rank(weights, rank)

    def validate(self, spec: LoraSpec) -> None:
        super().validate(spec)
        if spec.rslora:
            raise LoraError("DyLoRA scales a rank-b truncation by alpha / b (the paper's rule); turn use_rslora off.")
        frozen = spec.options.get("frozen", True)
        if not isinstance(frozen, bool):
            raise LoraError(f"DyLoRA option 'frozen' must be true or false, got {frozen!r}.")
        seed = spec.options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LoraError(f"DyLoRA option 'seed' must be a whole number, got {seed!r}.")

    def inject(self, model: nn.Module, plan: TargetPlan, spec: LoraSpec, adapter_name: str) -> None:
        from . import layer_variants as lv

        super().inject(model, plan, spec, adapter_name)
        for _, layer in lv.layers_with(model, adapter_name):
            lv.attach(layer, adapter_name, DyLoraVariant())  # type: ignore[arg-type]

    def network_args(self, spec: LoraSpec) -> dict[str, str]:
        return {"unit": "1", "frozen": str(bool(spec.options.get("frozen", True)))}

    # Training -------------------------------------------------------------------------------------
    def before_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int) -> None:
        """Sample this step's rank and remember the weights, to put back what the step must not train."""
        frozen = bool(adapter.spec.options.get("frozen", True))
        u = _draw(step, int(adapter.spec.options.get("seed", 0)))
        for layer, variant in _dylora_layers(adapter.models, adapter.name):
            full = int(layer.r[adapter.name])  # type: ignore[attr-defined]
            b = min(full, 1 + int(u * full))
            variant.rank = b
            variant.train_from = b - 1 if frozen else 0
            variant.kept = (
                layer.lora_A[adapter.name].weight.detach().clone(),  # type: ignore[index]
                layer.lora_B[adapter.name].weight.detach().clone(),  # type: ignore[index]
            )

    def after_optimizer_step(self, adapter: "LoraAdapter", *, step: int, total_steps: int, optimizer: Any) -> None:
        """Put back every component outside the trained ones (momentum and weight decay would move
        them); then return to full rank for samples and export."""
        with torch.no_grad():
            for layer, variant in _dylora_layers(adapter.models, adapter.name):
                if variant.kept is not None and variant.rank is not None and variant.train_from is not None:
                    lo, hi = variant.train_from, variant.rank
                    down = layer.lora_A[adapter.name].weight  # type: ignore[index]
                    up = layer.lora_B[adapter.name].weight  # type: ignore[index]
                    new_down, new_up = variant.kept
                    new_down[lo:hi] = down[lo:hi]
                    new_up[:, lo:hi] = up[:, lo:hi]
                    down.copy_(new_down)
                    up.copy_(new_up)
                variant.kept = None
                variant.rank = None
                variant.train_from = None


__all__ = [
    "DyLora",
    "DyLoraVariant",
    "NETWORK_MODULE",
    "active_rank",
    "check_dylora_file",
    "is_dylora_metadata",
    "rank_for_step",
    "set_active_rank",
    "truncate_rank",
]
