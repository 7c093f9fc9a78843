"""Plain LoRA weights, independent of PEFT and of any file layout.

Every adapter method exports to this form (``down``/``up``/``alpha`` per layer, plus
``dora_scale`` for DoRA) and every file format reads into it, so formats and methods never need
to know about each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

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

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

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


@dataclass
class LoraWeights:
    """Adapters by component and canonical module path (text-encoder paths without ``text_model.``).

    ``text_encoder_2`` is SDXL's second text encoder (empty for SD 1.x/2.x). ``method`` is the
    registry name of the method that produced the weights; ``info`` carries what the writer should
    record (preset, spec values, ...).
    """

    unet: dict[str, ModuleLora] = field(default_factory=dict)
    text_encoder: dict[str, ModuleLora] = field(default_factory=dict)
    method: str = "lora"
    info: dict[str, object] = field(default_factory=dict)
    text_encoder_2: dict[str, ModuleLora] = field(default_factory=dict)

    def component(self, name: Component) -> dict[str, ModuleLora]:
        if name not in COMPONENTS:
            raise KeyError(f"unknown LoRA component {name!r}; components: {', '.join(COMPONENTS)}")
        return getattr(self, name)

    def items(self) -> Iterator[tuple[Component, str, ModuleLora]]:
        for name in COMPONENTS:
            for path, module in self.component(name).items():
                yield name, path, module

    def counts(self) -> dict[str, int]:
        """Modules per component, for the components that have any."""
        return {c: len(self.component(c)) for c in COMPONENTS if self.component(c)}

    def map_modules(self, fn: Callable[[ModuleLora], ModuleLora], method: str | None = None,
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
        """A copy with ``down``/``up`` (and ``dora_scale``) cast to ``dtype``."""

        def cast(m: ModuleLora) -> ModuleLora:
            return ModuleLora(
                m.down.to(dtype),
                m.up.to(dtype),
                m.alpha,
                None if m.dora_scale is None else m.dora_scale.to(dtype),
            )

        return self.map_modules(cast)


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

    def resize(m: ModuleLora) -> ModuleLora:
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
