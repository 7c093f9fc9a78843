"""What the UNet is conditioned on, for each model family: captions in, UNet keyword arguments out.

SD 1.x / 2.x
    The text encoder's last hidden state (``encoder_hidden_states``).
SDXL
    Both text encoders' penultimate hidden states, concatenated along the channels (768 + 1280 =
    2048 for SDXL 1.0); the pooled, projected output of encoder 2 (``text_embeds``); and per-sample
    ``time_ids`` = (original height, original width, crop top, crop left, target height, target
    width) of what the data pipeline really did to *that* sample (bucket resize and crop), as SGM
    and kohya's sd-scripts train SDXL. The pipelines' own ``encode_prompt`` builds the same tensors
    at inference.

The family differences are data (which encoders, which hidden layer, whether there is a pooled
output and time ids), not separate trainer classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77 for CLIP), the way the pipelines pad them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def time_ids(original_sizes: Sequence[Sequence[int]], crop_top_lefts: Sequence[Sequence[int]],
             target_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    """SDXL's micro-conditioning of a batch: ``B x 6`` (orig h, orig w, crop top, crop left, target h, w)."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)]
    if any(len(r) != 6 for r in rows):
        raise ValueError(f"time ids need (h, w) sizes and (top, left) crops, got {rows}")
    return torch.tensor(rows, dtype=torch.float32)


@dataclass
class TextConditioning:
    """Encoded captions: ``hidden`` (B x tokens x channels) and, for SDXL, ``pooled`` (B x P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def as_cache(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the text cache stores: a tensor (SD 1.x/2.x, as before) or a dict (SDXL)."""
        if self.pooled is None:
            return self.hidden
        return {"hidden": self.hidden, "pooled": self.pooled}

    @classmethod
    def from_cache(cls, value: torch.Tensor | dict[str, torch.Tensor]) -> "TextConditioning":
        if isinstance(value, torch.Tensor):
            return cls(value)
        return cls(value["hidden"], value.get("pooled"))

    def to(self, device, dtype: torch.dtype | None = None) -> "TextConditioning":
        return TextConditioning(self.hidden.to(device, dtype),
                                None if self.pooled is None else self.pooled.to(device, dtype))


class Conditioner:
    """Encodes captions with a base model's tokenizers and text encoders and builds the UNet's inputs."""

    def __init__(self, base) -> None:
        self.family = base.family
        self.sdxl = base.family == "sdxl"
        self.tokenizers = tuple(base.tokenizers)
        self.encoders = tuple(base.text_encoders)

    def encode(self, captions: list[str], encoders: Sequence[nn.Module] | None = None) -> TextConditioning:
        """Encode ``captions`` with ``encoders`` (default: the base model's; pass wrapped or adapted ones
        when training them). Gradients flow when the caller has them on."""
        encoders = tuple(encoders) if encoders is not None else self.encoders
        device = next(encoders[0].parameters()).device
        if not self.sdxl:
            ids = tokenize(self.tokenizers[0], captions).to(device)
            return TextConditioning(encoders[0](ids, return_dict=False)[0])
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, encoders):
            ids = tokenize(tokenizer, captions).to(device)
            out = encoder(ids, output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as encoder 2")
        return TextConditioning(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, text: TextConditioning, ids: torch.Tensor | None, dtype: torch.dtype | None = None
                    ) -> dict[str, Any]:
        """Keyword arguments of the UNet call besides the noisy latents and timesteps."""
        hidden = text.hidden if dtype is None else text.hidden.to(dtype)
        if not self.sdxl:
            return {"encoder_hidden_states": hidden}
        if ids is None or text.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding and per-sample time ids")
        pooled = text.pooled if dtype is None else text.pooled.to(dtype)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(hidden.device, hidden.dtype)}}
