"""Adapter weights per layer, independent of PEFT and of any file layout.

Every adapter method exports to this form and every file format reads into it, so formats and
methods never need to know about each other. Most methods export plain LoRA (:class:`ModuleLora`:
``down``/``up``/``alpha`` per layer, plus ``dora_scale`` for DoRA); the LyCORIS methods LoHa and
LoKr keep their own factors (:class:`ModuleLoha`, :class:`ModuleLokr`). All three share one
interface: ``delta()`` (the weight change at scale 1, shaped like the layer's weight), ``is_conv``,
``kernel_size``, ``rank``, ``alpha``, ``scale``, ``dora_scale`` and ``to(dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Union

import torch

from .targets import COMPONENTS, Component


@dataclass
class ModuleLora:
    """The adapter of one layer: ``delta W = up @ down * alpha / rank``.

    Shapes: Linear ``down [r, in]``, ``up [out, r]``; Conv2d ``down [r, in, kh, kw]``,
    ``up [out, r, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None
    #: the method family of this module's factors (``lora``, ``loha``, ``lokr``)
    kind: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.down.shape[2]), int(self.down.shape[3])) if self.is_conv else (1, 1)

    def to(self, dtype: torch.dtype) -> "ModuleLora":
        """A copy with ``down``/``up`` (and ``dora_scale``) cast to ``dtype``."""
        return ModuleLora(self.down.to(dtype), self.up.to(dtype), self.alpha,
                          None if self.dora_scale is None else self.dora_scale.to(dtype))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this adapter adds at scale 1, shaped like the layer's weight."""
        down = self.down.float()
        up = self.up.float().reshape(self.up.shape[0], self.rank)
        if self.is_conv:
            flat = up @ down.reshape(self.rank, -1)
            return flat.reshape(up.shape[0], *down.shape[1:]) * self.scale
        return (up @ down) * self.scale


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: core ``[r, r, kh, kw]``, ``out_factor [r, out]``, ``in_factor [r, in]``
    -> ``[out, in, kh, kw]``."""
    return torch.einsum("i j k l, i p, j q -> p q k l", core.float(), out_factor.float(), in_factor.float())


class _LayerShape:
    """Layer kind and kernel of an adapter that records its layer's weight ``shape``."""

    shape: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.shape[2]), int(self.shape[3])) if self.is_conv else (1, 1)


@dataclass
class ModuleLoha(_LayerShape):
    """A LyCORIS LoHa (Hadamard product) adapter of one layer.

    ``delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` (element-wise product), reshaped to
    the layer's weight ``shape``. Shapes: ``w1_a``/``w2_a`` ``[out, r]``, ``w1_b``/``w2_b``
    ``[r, in * kh * kw]``. With Tucker cores (LyCORIS ``use_tucker``, PEFT ``use_effective_conv2d``;
    Conv2d with a kernel larger than 1x1 only) ``t1``/``t2`` are ``[r, r, kh, kw]``, ``w*_a``
    ``[r, out]`` and ``w*_b`` ``[r, in]``. ``rank`` is ``w1_b.shape[0]`` (what A1111 and ComfyUI
    divide alpha by).
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    #: the adapted layer's weight shape: ``(out, in)`` or ``(out, in, kh, kw)``
    shape: tuple[int, ...]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: None = None  # LoHa with DoRA (LyCORIS dora_wd) is not supported
    kind: ClassVar[str] = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this adapter adds at scale 1, shaped like the layer's weight."""
        if self.t1 is not None and self.t2 is not None:
            product = _tucker(self.t1, self.w1_a, self.w1_b) * _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            product = (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())
        return product.reshape(self.shape) * self.scale

    def to(self, dtype: torch.dtype) -> "ModuleLoha":
        return ModuleLoha(self.w1_a.to(dtype), self.w1_b.to(dtype), self.w2_a.to(dtype), self.w2_b.to(dtype),
                          self.alpha, tuple(self.shape), _cast(self.t1, dtype), _cast(self.t2, dtype))


@dataclass
class ModuleLokr(_LayerShape):
    """A LyCORIS LoKr (Kronecker product) adapter of one layer.

    ``delta W = kron(w1, w2) * scale``, reshaped to the layer's weight ``shape``, where ``w1`` is
    ``lokr_w1`` or ``w1_a @ w1_b`` and ``w2`` is ``lokr_w2``, ``w2_a @ w2_b`` or (Tucker, Conv2d)
    the rebuild of ``t2`` [r, r, kh, kw] with ``w2_a`` [r, out2] and ``w2_b`` [r, in2]. A 4-d ``w2``
    (``[out2, in2, kh, kw]``) takes ``w1`` as ``[out1, in1, 1, 1]``.

    The scale follows LyCORIS and ComfyUI (``comfy/weight_adapter/lokr.py``): ``alpha / rank`` where
    ``rank`` is ``w2_b.shape[0]`` when ``w2`` is decomposed, else ``w1_b.shape[0]`` when ``w1`` is;
    when both are full matrices there is no rank and the scale is 1 (alpha is ignored).
    """

    alpha: float
    shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: None = None  # LoKr with DoRA (LyCORIS dora_wd) is not supported
    kind: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise ValueError("a LoKr module needs lokr_w1, or lokr_w1_a and lokr_w1_b (not both)")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError("a LoKr module needs lokr_w2, or lokr_w2_a and lokr_w2_b (not both)")

    @property
    def rank(self) -> int | None:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        return float(self.alpha) / rank if rank else 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) as full matrices (float32), before the scale."""
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()  # type: ignore[union-attr]
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)  # type: ignore[arg-type]
        else:
            w2 = self.w2_a.float() @ self.w2_b.float()  # type: ignore[union-attr]
        return w1, w2

    def delta(self) -> torch.Tensor:
        """The weight change this adapter adds at scale 1, shaped like the layer's weight."""
        w1, w2 = self.factors()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(self.shape) * self.scale

    def to(self, dtype: torch.dtype) -> "ModuleLokr":
        return ModuleLokr(self.alpha, tuple(self.shape), _cast(self.w1, dtype), _cast(self.w1_a, dtype),
                          _cast(self.w1_b, dtype), _cast(self.w2, dtype), _cast(self.w2_a, dtype),
                          _cast(self.w2_b, dtype), _cast(self.t2, dtype))


#: any module a ``LoraWeights`` may hold
AdapterModule = Union[ModuleLora, ModuleLoha, ModuleLokr]


@dataclass
class LoraWeights:
    """Adapters by component and canonical module path (text-encoder paths without ``text_model.``).

    ``text_encoder_2`` is SDXL's second text encoder (empty for SD 1.x/2.x). ``method`` is the
    registry name of the method that produced the weights; ``info`` carries what the writer should
    record (preset, spec values, ...).
    """

    unet: dict[str, AdapterModule] = field(default_factory=dict)
    text_encoder: dict[str, AdapterModule] = field(default_factory=dict)
    method: str = "lora"
    info: dict[str, object] = field(default_factory=dict)
    text_encoder_2: dict[str, AdapterModule] = field(default_factory=dict)

    def component(self, name: Component) -> dict[str, AdapterModule]:
        if name not in COMPONENTS:
            raise KeyError(f"unknown LoRA component {name!r}; components: {', '.join(COMPONENTS)}")
        return getattr(self, name)

    def items(self) -> Iterator[tuple[Component, str, AdapterModule]]:
        for name in COMPONENTS:
            for path, module in self.component(name).items():
                yield name, path, module

    def counts(self) -> dict[str, int]:
        """Modules per component, for the components that have any."""
        return {c: len(self.component(c)) for c in COMPONENTS if self.component(c)}

    def map_modules(self, fn: Callable[[AdapterModule], AdapterModule], method: str | None = None,
                    info: dict[str, object] | None = None) -> "LoraWeights":
        """A copy with ``fn`` applied to every module (same components and paths)."""
        parts = {c: {k: fn(v) for k, v in self.component(c).items()} for c in COMPONENTS}
        return LoraWeights(
            parts["unet"], parts["text_encoder"], self.method if method is None else method,
            dict(self.info) if info is None else info, text_encoder_2=parts["text_encoder_2"],
        )

    def __len__(self) -> int:
        return sum(len(self.component(c)) for c in COMPONENTS)

    def to(self, dtype: torch.dtype) -> "LoraWeights":
        """A copy with every module's tensors (``down``/``up``, ``dora_scale``, LoHa/LoKr factors) cast to ``dtype``."""
        return self.map_modules(lambda m: m.to(dtype))

    def kinds(self) -> set[str]:
        """The module kinds present (``lora``, ``loha``, ``lokr``)."""
        return {m.kind for _, _, m in self.items()}


def resize_rank(weights: LoraWeights, rank: int) -> LoraWeights:
    """The best rank-``rank`` approximation of every layer's delta (truncated SVD), same scale.

    Written for this project: the SVD is taken of the small core of ``up @ down`` (after QR of
    both factors), so re-ranking a full SD 1.5 LoRA takes well under a second.

    Layers whose rank is already <= ``rank`` are kept as they are. Each new pair keeps the
    layer's ``alpha / rank`` scale, so the file's alpha semantics stay as before. ``dora_scale``
    cannot be carried through a change of rank and is refused.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number >= 1, got {rank!r}")

    def resize(m: AdapterModule) -> ModuleLora:
        if not isinstance(m, ModuleLora):
            raise ValueError(f"{m.kind} modules have no rank-r LoRA factors to truncate (see lora_from_delta)")
        if m.dora_scale is not None:
            raise ValueError("DoRA weights cannot be resized (their magnitude depends on the full delta)")
        if m.rank <= rank:
            return m
        scale = m.scale
        out_features = m.up.shape[0]
        # SVD of up @ down through QR of the thin factors: O((in + out) r^2), not O(in * out * min).
        q_up, r_up = torch.linalg.qr(m.up.double().reshape(out_features, m.rank))
        q_down, r_down = torch.linalg.qr(m.down.double().reshape(m.rank, -1).T)
        u_small, s, vh_small = torch.linalg.svd(r_up @ r_down.T)
        root = s[:rank].sqrt()
        up = ((q_up @ u_small[:, :rank]) * root).float()
        down = (root[:, None] * (vh_small[:rank] @ q_down.T)).float()
        new_alpha = scale * rank
        if m.is_conv:
            return ModuleLora(down.reshape(rank, *m.down.shape[1:]), up.reshape(out_features, rank, 1, 1), new_alpha)
        return ModuleLora(down, up, new_alpha)

    return weights.map_modules(resize, info={**weights.info, "resized_to_rank": rank})
