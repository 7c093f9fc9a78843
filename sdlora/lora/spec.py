"""`LoraSpec`: what to inject (method, target preset, ranks, alphas, dropout)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LoraError


@dataclass(frozen=True)
class LoraSpec:
    """Settings of one adapter, shared by the UNet and (optionally) the text encoder(s).

    Ranks and alphas follow kohya's conventions so that the exported file's metadata is true:

    * ``rank``/``alpha`` apply to every Linear layer and every 1x1 Conv2d layer of the UNet
      (kohya's ``network_dim``/``network_alpha``);
    * ``conv_rank``/``conv_alpha`` apply to Conv2d layers with a larger kernel (3x3 resnet and
      sampler convs, only targeted by the ``full`` preset; kohya's ``conv_dim``/``conv_alpha``).
      ``None`` means "same as ``rank``/``alpha``";
    * ``text_encoder_rank``/``text_encoder_alpha`` apply to the text encoder (SDXL: both text
      encoders) when ``text_encoder`` is true. ``None`` means "same as ``rank``/``alpha``".

    ``alpha=None`` means ``alpha = rank`` (scale 1); a ``None`` conv or text-encoder alpha is
    ``alpha`` (so the scale of those layers is ``alpha / conv_rank`` etc.). The output of an adapted layer is
    ``W x + scale * up(down(dropout(x)))`` with ``scale = alpha / rank``, or
    ``alpha / sqrt(rank)`` when ``rslora`` is true.

    ``options`` holds settings only a particular method understands (e.g. a LoRA+ learning-rate
    ratio); the method validates them.
    """

    method: str = "lora"
    preset: str = "attn"
    rank: int = 16
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    text_encoder: bool = False
    text_encoder_rank: int | None = None
    text_encoder_alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rank", "conv_rank", "text_encoder_rank"):
            value = getattr(self, name)
            if value is None and name != "rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoraError(f"LoRA option '{name}' must be a whole number >= 1, got {value!r}.")
        for name in ("alpha", "conv_alpha", "text_encoder_alpha"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LoraError(f"LoRA option '{name}' must be a number > 0, got {value!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA option 'dropout' must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.method, str) or not self.method:
            raise LoraError(f"LoRA option 'method' must be a method name, got {self.method!r}.")
        if not isinstance(self.preset, str) or not self.preset:
            raise LoraError(f"LoRA option 'preset' must be a preset name, got {self.preset!r}.")

    # Effective values ---------------------------------------------------------------------------
    @property
    def linear_rank(self) -> int:
        return self.rank

    @property
    def linear_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_conv_rank(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.linear_alpha if self.conv_alpha is None else float(self.conv_alpha)

    @property
    def effective_text_encoder_rank(self) -> int:
        return self.rank if self.text_encoder_rank is None else self.text_encoder_rank

    @property
    def effective_text_encoder_alpha(self) -> float:
        return self.linear_alpha if self.text_encoder_alpha is None else float(self.text_encoder_alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (for run configs and file metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraError(f"Unknown LoRA option(s) {unknown}; known options: {sorted(known)}.")
        return cls(**data)
