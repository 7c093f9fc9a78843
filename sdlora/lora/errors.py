"""Errors raised by the LoRA package; every message names the layer, file or option at fault."""

from __future__ import annotations


class LoraError(ValueError):
    """Invalid LoRA settings or an operation that cannot be done on the current adapters."""


class LoraFileError(LoraError):
    """A LoRA file that cannot be read, or whose contents do not fit the loaded base model."""


class LoraShapeMismatchError(LoraFileError):
    """A tensor in a LoRA file whose shape does not fit the matching layer of the loaded base model."""
