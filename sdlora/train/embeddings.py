"""Trigger tokens that learn: textual inversion (only the new tokens train) and pivotal tuning (tokens and LoRA).

``embedding_tokens = N`` adds the tokens ``<s0> ... <s{N-1}>`` to every tokenizer of the base model (SDXL: both)
and N new rows to every text encoder's token embedding table. The caption template puts the tokens where
``{trigger}`` goes (:func:`sdlora.train.config.caption_trigger`). Only the new rows train: the original table is
kept frozen and never written, so every other token's embedding stays bit for bit what it was.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import ConfigError, TrainConfig, embedding_token_strings


class TokenEmbeddingWithNewRows(nn.Module):
    """A token embedding table plus ``N`` new rows that are their own ``nn.Parameter``.

    Neither transformers nor diffusers has such a layer: their textual-inversion scripts resize the whole
    table, let the optimizer update all of it and copy the old rows back after every step. Here the
    original ``nn.Embedding`` stays as it is (frozen, never written); ids ``first_id ... first_id + N - 1``
    read the new rows, all other ids the original table. Gradients reach only the new rows.
    """

    def __init__(self, original: nn.Embedding, first_id: int, rows: torch.Tensor) -> None:
        super().__init__()
        self.original = original
        self.first_id = int(first_id)
        self.rows = nn.Parameter(rows.detach().float().clone())

    @property
    def num_new(self) -> int:
        return int(self.rows.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as a tensor (original rows, then the new ones); for code that reads ``.weight``."""
        return torch.cat([self.original.weight[: self.first_id], self.rows.to(self.original.weight.dtype)])

    @property
    def embedding_dim(self) -> int:
        return self.original.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = (input_ids >= self.first_id) & (input_ids < self.first_id + self.num_new)
        base = self.original(torch.where(new, torch.zeros_like(input_ids), input_ids))
        picked = self.rows.to(base.dtype)[(input_ids - self.first_id).clamp(0, self.num_new - 1)]
        return torch.where(new.unsqueeze(-1), picked, base)


class TrainedTokens:
    """The new tokens of a run in every text encoder of the base model: one wrapped table per encoder."""

    def __init__(self, tokens: list[str], layers: list[TokenEmbeddingWithNewRows]) -> None:
        self.tokens = tokens
        self.layers = layers

    def parameters(self) -> list[nn.Parameter]:
        return [layer.rows for layer in self.layers]

    def vectors(self) -> list[torch.Tensor]:
        """The trained rows, ``[N, dim]`` per encoder (CLIP ViT-L first, OpenCLIP bigG second for SDXL)."""
        return [layer.rows.detach().float().cpu().clone() for layer in self.layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"te{i}": v.contiguous() for i, v in enumerate(self.vectors())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            value = state[f"te{i}"]
            if tuple(value.shape) != tuple(layer.rows.shape):
                raise ConfigError("embedding_tokens", f"the checkpoint holds {tuple(value.shape)} embeddings for text "
                                  f"encoder {i + 1}, this run makes {tuple(layer.rows.shape)}")
            with torch.no_grad():
                layer.rows.copy_(value.to(layer.rows.device, layer.rows.dtype))

    def set_trainable(self, on: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(on)
            if not on:
                p.grad = None

    def param_groups(self, lr: float) -> list[dict]:
        """One optimizer group with the run's ``embedding_lr`` and no weight decay (decay would pull the
        vectors towards zero, away from the scale of real token embeddings)."""
        return [{"params": self.parameters(), "lr": lr, "weight_decay": 0.0, "name": "embeddings"}]


def stop_step(cfg: TrainConfig) -> int:
    """The first step (0-based) at which the tokens no longer train."""
    return max(1, int(round(cfg.embedding_stop_fraction * cfg.max_train_steps)))


def init_ids(tokenizer, phrase: str) -> list[int]:
    """Token ids of the init phrase, without start/end tokens."""
    return list(tokenizer(phrase, add_special_tokens=False).input_ids)


def add_trained_tokens(cfg: TrainConfig, tokenizers: Sequence, encoders: Sequence[nn.Module]) -> TrainedTokens:
    """Add the run's tokens to ``tokenizers`` and wrap each encoder's token embedding (see module doc).

    Rows start from the embeddings of ``embedding_init``'s tokens (cycled when the phrase has fewer
    tokens than ``embedding_tokens``), or random with the standard deviation of the existing rows.
    Raises :class:`ConfigError` when the phrase tokenizes to nothing or a token is already known.
    """
    tokens = embedding_token_strings(cfg)
    phrase = cfg.embedding_init.strip()
    plans = []
    for i, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders)):
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise ConfigError("embedding_tokens", f"token(s) {', '.join(taken)} already exist in the vocabulary of "
                              f"tokenizer {i + 1}; use a fresh base model")
        ids = init_ids(tokenizer, phrase) if phrase else []
        if phrase and not ids:
            raise ConfigError("embedding_init", f"{phrase!r} tokenizes to nothing; give a word or phrase")
        plans.append(ids)
    layers = []
    for i, (tokenizer, encoder, ids) in enumerate(zip(tokenizers, encoders, plans)):
        table = encoder.get_input_embeddings()
        weight = table.weight.detach().float()
        if ids:
            rows = torch.stack([weight[ids[j % len(ids)]] for j in range(len(tokens))])
        else:
            g = torch.Generator().manual_seed(cfg.seed * 7919 + 17 + i)
            rows = torch.randn(len(tokens), weight.shape[1], generator=g) * weight.std().cpu()
        tokenizer.add_tokens(tokens)
        new_ids = tokenizer.convert_tokens_to_ids(tokens)
        if new_ids != list(range(new_ids[0], new_ids[0] + len(tokens))):
            raise ConfigError("embedding_tokens", f"tokenizer {i + 1} gave the new tokens ids {new_ids}, not consecutive")
        layer = TokenEmbeddingWithNewRows(table, new_ids[0], rows.to(weight.device))
        encoder.set_input_embeddings(layer)
        layers.append(layer)
    return TrainedTokens(tokens, layers)


def remove_trained_tokens(encoders: Sequence[nn.Module]) -> None:
    """Put the original embedding tables back (the tokenizers keep the tokens)."""
    for encoder in encoders:
        layer = encoder.get_input_embeddings()
        if isinstance(layer, TokenEmbeddingWithNewRows):
            encoder.set_input_embeddings(layer.original)
