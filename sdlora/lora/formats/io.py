"""Reading and writing ``.safetensors`` files with clear errors and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..errors import LoraFileError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def resolve_lora_path(path: str | os.PathLike[str]) -> Path:
    """The file to read for ``path``: the path itself, or for a folder its LoRA weights file."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / DIFFUSERS_WEIGHT_NAME] if (p / DIFFUSERS_WEIGHT_NAME).is_file() else sorted(p.glob("*.safetensors"))
        if len(candidates) != 1:
            raise LoraFileError(
                f"Folder {p} holds {len(candidates)} .safetensors files; give the LoRA file itself."
            )
        return candidates[0]
    if not p.exists():
        raise LoraFileError(f"LoRA file not found: {p}")
    if not p.is_file():
        raise LoraFileError(f"Not a file: {p}")
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{p} is a pickle-based file ({p.suffix}); only .safetensors LoRA files are loaded, because "
            "pickles can run code. Convert it to .safetensors with a tool you trust."
        )
    return p


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the header metadata of a safetensors file.

    Raises :class:`LoraFileError` naming the file when it is missing, not safetensors, or truncated.
    """
    from safetensors import SafetensorError, safe_open

    p = resolve_lora_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = p.stat().st_size
        raise LoraFileError(
            f"{p} is not a readable .safetensors file ({size} bytes; {exc}). It may be truncated "
            "(an interrupted download) or another format; download or export it again."
        ) from exc
    if not tensors:
        raise LoraFileError(f"{p} holds no tensors; it is not a LoRA file.")
    return tensors, metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the header metadata (fast; does not read tensors)."""
    from safetensors import SafetensorError, safe_open

    p = resolve_lora_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFileError(f"{p} is not a readable .safetensors file ({exc}).") from exc


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file to a temporary name in the target folder, then rename it.

    A reader never sees a half-written file, and a failed write leaves any older file intact.
    """
    from safetensors.torch import save_file

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str) or not isinstance(k, str)}
    if bad:
        raise LoraFileError(f"safetensors metadata must be strings; got {bad}.")
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(prepared, tmp, metadata=dict(metadata))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a LoRA is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target
