"""Export a run's LoRA (final file or a checkpoint) or any LoRA file to either layout, optionally
at a lower rank, without loading a base model.

File layouts name layers in ways that need the model's module tree to resolve (kohya names turn
``.`` into ``_``). Instead of loading weights, the UNet and text encoder of the file's model family
are built on the meta device from the configs shipped in ``sdlora/models/configs`` (no memory,
about a second).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LoraFileError
from ..targets import Component
from ..variants.dylora import is_dylora_metadata, truncate_rank
from ..weights import LoraWeights, ModuleLora, resize_rank
from ...models.shipped import meta_models
from . import diffusers_format
from .inspect import file_entries, guess_family


def _family_of(metadata: Mapping[str, str], entries: Mapping[str, Any]) -> tuple[str, str]:
    family, _ = guess_family(entries, metadata)
    version = metadata.get("ss_base_model_version", "")
    pred = metadata.get("modelspec.prediction_type") or ("v" if version.endswith("_v") else "epsilon")
    return family, pred


def models_for(family: str, prediction_type: str, base: str | os.PathLike[str] | None):
    """(UNet, text encoder) whose module tree names the file's layers: the meta-device SD tree for
    SD 1.x / 2.x files; for other shapes (e.g. the bundled demo model) the given base model."""
    if family in ("sd1", "sd2") or base is None:
        if family not in ("sd1", "sd2"):
            raise LoraFileError(
                f"The layer shapes fit no SD 1.x / 2.x model (family: {family}); give the base model the LoRA was "
                "trained on (sdlora export --base MODEL)."
            )
        models = meta_models(family, prediction_type)
        return models["unet"], models["text_encoder"]
    from ...models.loading import load_base

    loaded = load_base(str(base))
    return loaded.unet, loaded.text_encoder


#: methods whose checkpoints hold exactly the plain lora_A / lora_B weights of the exported file
PLAIN_CHECKPOINT_METHODS = ("lora", "lora_fa", "qlora")


def weights_from_checkpoint(state: Mapping[str, torch.Tensor], spec) -> LoraWeights:
    """Plain weights from an adapter checkpoint (``LoraAdapter.state_dict()``) of a method in
    :data:`PLAIN_CHECKPOINT_METHODS`.

    Ranks come from the shapes, alphas from ``spec`` (a ``LoraSpec``) the way injection assigns
    them: Linear and 1x1 layers ``alpha``, larger Conv2d kernels ``conv_alpha``, the text encoder
    ``text_encoder_alpha``; rsLoRA alphas become plain ones (``alpha * sqrt(r)``).
    """
    if spec.method not in PLAIN_CHECKPOINT_METHODS:
        raise LoraFileError(
            f"Checkpoints of method {spec.method!r} are exported by loading them into the base model "
            "(its export hook); export the run's final LoRA file instead."
        )
    parts: dict[tuple[Component, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = diffusers_format.split_key(key)
        if split is None or split[0] is None or split[2] not in ("down", "up"):
            raise LoraFileError(f"Unexpected key {key!r} in the adapter checkpoint.")
        component, path, role = split
        parts.setdefault((component, path), {})[role] = tensor
    from ..variants import get_method

    method = get_method(spec.method)
    weights = LoraWeights(method=spec.method, info={
        "preset": spec.preset, "spec": spec.to_dict(), "network_module": method.kohya_network_module,
        "network_args": method.network_args(spec)})
    for (component, path), tensors in sorted(parts.items()):
        down, up = tensors["down"].float(), tensors["up"].float()
        rank = down.shape[0]
        big_kernel = down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)
        if component == "text_encoder":
            alpha = spec.effective_text_encoder_alpha
        else:
            alpha = spec.effective_conv_alpha if big_kernel else spec.linear_alpha
        if spec.rslora:
            alpha = alpha * rank**0.5
        weights.component(component)[path] = ModuleLora(down=down, up=up, alpha=float(alpha))
    return weights


def export_from(
    source: str | os.PathLike[str],
    *,
    fmt: str = "kohya",
    out: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    dtype: str | torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``source`` as a ``fmt`` ("kohya" / "diffusers") LoRA file and return its path.

    ``source`` is a LoRA file (kohya or diffusers layout; a training run is exported by
    :func:`sdlora.train.export_run`).
    ``rank`` re-ranks every layer above it by truncated SVD of its delta (a DyLoRA file: keeps its first
    ``rank`` components, which DyLoRA trained as the rank-``rank`` adapter). ``out`` defaults to
    ``<source folder>/exports/<name>[-r<rank>][-diffusers].safetensors``. The kohya
    ``ss_*`` metadata of the source file is carried over. ``base`` (a base-model spec) names the
    layers of files whose shapes fit no SD 1.x / 2.x model.
    """
    from . import match_to_model, read_lora_file, save_lora

    src = Path(source).expanduser()
    if src.is_dir() and (src / "config.toml").is_file():
        raise LoraFileError(f"{src} is a training run; export runs with sdlora.train.export_run (sdlora export RUN).")
    file = read_lora_file(src)
    family, pred = _family_of(file.metadata, file_entries(file.tensors, file.format)[0])
    if family == "sdxl":
        raise LoraFileError(f"{src} is a LoRA for {family}; only SD 1.x and SD 2.x files can be exported here.")
    unet, text_encoder = models_for(family, pred, base)
    if family not in ("sd1", "sd2"):
        family = file.metadata.get("ss_base_model_version", "sd_v1").startswith("sd_v2") and "sd2" or "sd1"
    weights, unknown = match_to_model(file, unet, text_encoder)
    if unknown:
        raise LoraFileError(f"{src}: {len(unknown)} key(s) match no {family} layer (e.g. {unknown[0]}); not exporting a partial file.")
    weights.method = file.metadata.get("sdlora_method", "lora")
    if is_dylora_metadata(file.metadata):
        weights.method = "dylora"  # nested ranks: a lower rank is a truncation, not an SVD
    if file.metadata.get("sdlora_preset"):
        weights.info["preset"] = file.metadata["sdlora_preset"]
    carried = {k: v for k, v in file.metadata.items() if k.startswith("ss_") and not k.startswith("ss_network_")}
    title = file.metadata.get("modelspec.title") or src.stem
    if dtype is None:  # keep the source file's precision
        dtypes = {t.dtype for t in file.tensors.values() if t.ndim > 0}
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"
    if rank:
        weights = truncate_rank(weights, int(rank)) if weights.method == "dylora" else resize_rank(weights, int(rank))
    if out is None:
        folder = src if src.is_dir() else src.parent
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.name if src.is_dir() else src.stem).strip("._") or "lora"
        suffix = f"-r{rank}" if rank else ""
        suffix += "-diffusers" if fmt == "diffusers" else ""
        out = folder / "exports" / f"{stem}{suffix}.safetensors"
    carried.update(dict(metadata or {}))
    return save_lora(
        weights, out, format=fmt, metadata=carried if fmt == "kohya" else metadata,  # type: ignore[arg-type]
        family=family, prediction_type=pred, title=title, dtype=dtype or "fp16",
    )
