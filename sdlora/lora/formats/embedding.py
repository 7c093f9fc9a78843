"""Textual-inversion embedding files, standalone and bundled into a LoRA file.

Standalone ``.safetensors`` (A1111/Forge and ComfyUI load it from their embeddings folder and call it by its
file name; diffusers with ``load_textual_inversion(file, token=...)``):

- SD 1.x / 2.x: one tensor ``emb_params`` ``[N, dim]`` (kohya sd-scripts' textual-inversion key; A1111 and
  ComfyUI take the single tensor of a file whatever its key, diffusers too).
- SDXL: ``clip_l`` ``[N, 768]`` (text encoder 1) and ``clip_g`` ``[N, 1280]`` (text encoder 2), the keys
  A1111, ComfyUI (``load_embed``'s ``embed_key``) and diffusers' advanced DreamBooth-LoRA scripts use; diffusers
  loads each into its encoder (``text_encoder``/``tokenizer``, then ``text_encoder_2``/``tokenizer_2``).

Bundled into a LoRA file (A1111/Forge load it with the LoRA): ``bundle_emb.<name>.string_to_param.*`` for
SD 1.x / 2.x, ``bundle_emb.<name>.clip_l`` / ``bundle_emb.<name>.clip_g`` for SDXL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import LoraFileError
from .io import atomic_save, read_safetensors

BUNDLE_PREFIX = "bundle_emb."
ENCODER_KEYS = ("clip_l", "clip_g")


def embedding_tensors(vectors: Sequence[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The standalone file's tensors for the trained rows of each encoder (one for SD 1.x/2.x, two for SDXL)."""
    _check(vectors, family)
    if family == "sdxl":
        return {"clip_l": vectors[0], "clip_g": vectors[1]}
    return {"emb_params": vectors[0]}


def bundle_tensors(name: str, vectors: Sequence[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The keys that bundle the embedding ``name`` into a kohya LoRA file."""
    _check(vectors, family)
    if not name or "." in name:
        raise LoraFileError(f"A bundled embedding needs a name without dots; got {name!r}.")
    if family == "sdxl":
        return {f"{BUNDLE_PREFIX}{name}.clip_l": vectors[0], f"{BUNDLE_PREFIX}{name}.clip_g": vectors[1]}
    return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors[0]}


def save_embedding(vectors: Sequence[torch.Tensor], path: str | os.PathLike[str], *, family: str,
                   dtype: torch.dtype = torch.float32, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a standalone embedding file atomically (temp name, then rename)."""
    target = Path(path).expanduser()
    if target.suffix.lower() != ".safetensors":
        raise LoraFileError(f"Embedding files end in .safetensors; got {target}.")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in embedding_tensors(vectors, family).items()}
    return atomic_save(tensors, target, dict(metadata or {}))


def split_bundled(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {"string_to_param.*" | "clip_l" | "clip_g": tensor}}`` of the embeddings bundled in a LoRA file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            rest = key[len(BUNDLE_PREFIX):]
            name, _, part = rest.partition(".")
            out.setdefault(name, {})[part] = value
    return out


def vectors_of(parts: Mapping[str, torch.Tensor], *, where: str) -> list[torch.Tensor]:
    """The per-encoder rows of one embedding's tensors (standalone file or one bundled entry)."""
    if "clip_l" in parts or "clip_g" in parts:
        missing = [k for k in ENCODER_KEYS if k not in parts]
        if missing:
            raise LoraFileError(f"{where}: SDXL embedding without {', '.join(missing)}.")
        return [_rows(parts["clip_l"]), _rows(parts["clip_g"])]
    for key in ("string_to_param.*", "emb_params"):
        if key in parts:
            return [_rows(parts[key])]
    if len(parts) == 1:
        return [_rows(next(iter(parts.values())))]
    raise LoraFileError(f"{where}: not an embedding (keys {sorted(parts)[:4]}).")


def read_embeddings(path: str | os.PathLike[str], name: str | None = None) -> dict[str, list[torch.Tensor]]:
    """``{name: [rows per encoder]}`` of a standalone embedding file (named by ``name`` or the file's stem)
    or of every embedding bundled into a LoRA file."""
    tensors, _ = read_safetensors(path)
    bundled = split_bundled(tensors)
    if bundled:
        return {n: vectors_of(parts, where=f"{path} ({BUNDLE_PREFIX}{n})") for n, parts in bundled.items()}
    return {name or Path(path).stem: vectors_of(tensors, where=str(path))}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def _check(vectors: Sequence[torch.Tensor], family: str) -> None:
    want = 2 if family == "sdxl" else 1
    if len(vectors) != want:
        raise LoraFileError(f"A {family} embedding has rows for {want} text encoder(s); got {len(vectors)}.")
    if len({int(v.shape[0]) for v in vectors}) != 1:
        raise LoraFileError(f"Every encoder needs the same number of vectors; got {[tuple(v.shape) for v in vectors]}.")


def own_tokenizers(pipe) -> None:
    """Give ``pipe`` its own copies of its tokenizers before tokens are added to them: the shipped CLIP
    tokenizers are cached and shared by every pipeline built in the process (tiny, demo, single files)."""
    import copy

    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, attr, None)
        if tok is not None and not getattr(tok, "_sdlora_own", False):
            mine = copy.deepcopy(tok)
            mine._sdlora_own = True
            setattr(pipe, attr, mine)
