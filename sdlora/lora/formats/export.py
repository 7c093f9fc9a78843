"""Export a run's LoRA (final file or a checkpoint) or any LoRA file to either layout, optionally
at a lower rank, without loading a base model.

File layouts name layers in ways that need the model's module tree to resolve (kohya names turn
``.`` into ``_``). Instead of loading weights, the UNet and text encoder(s) of the file's model
family (SD 1.x, SD 2.x, SDXL) are built on the meta device from the configs shipped in
``sdlora/models/configs`` (no memory, about a second).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LoraFileError, LoraShapeMismatchError
from ..targets import Component, is_text_encoder
from ..variants import get_method, method_for_file
from ..weights import LoraWeights, ModuleLora
from ...models.shipped import meta_models
from . import diffusers_format
from .inspect import file_entries, guess_family


def _family_of(metadata: Mapping[str, str], entries: Mapping[str, Any]) -> tuple[str, str]:
    family, _ = guess_family(entries, metadata)
    version = metadata.get("ss_base_model_version", "")
    v = version.endswith("_v") or metadata.get("ss_v_parameterization") == "True"
    pred = metadata.get("modelspec.prediction_type") or ("v" if v else "epsilon")
    return family, pred


_SHIPPED = ("sd1", "sd2", "sdxl")


def models_for(family: str, prediction_type: str, base: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The models whose module trees name the file's layers ({"unet", "text_encoder"[, "text_encoder_2"]}):
    the meta-device tree of the family for SD 1.x / 2.x / XL files; for other shapes (e.g. the
    bundled demo model) the given base model."""
    if family in _SHIPPED or base is None:
        if family not in _SHIPPED:
            raise LoraFileError(
                f"The layer shapes fit no SD 1.x / 2.x / XL model (family: {family}); give the base model the LoRA "
                "was trained on (sdlora export --base MODEL)."
            )
        return meta_models(family, prediction_type)
    return _base_models(base)


def _base_models(base: str | os.PathLike[str]) -> dict[str, Any]:
    from ...models.loading import load_base

    loaded = load_base(str(base))
    models = {"unet": loaded.unet, "text_encoder": loaded.text_encoder}
    if getattr(loaded, "text_encoder_2", None) is not None:
        models["text_encoder_2"] = loaded.text_encoder_2
    return models


def weights_from_checkpoint(state: Mapping[str, torch.Tensor], spec) -> LoraWeights:
    """Plain weights from an adapter checkpoint (``LoraAdapter.state_dict()``) of a method whose
    checkpoints are plain LoRA weights (``AdapterMethod.checkpoint_is_plain``).

    Ranks come from the shapes, alphas from ``spec`` (a ``LoraSpec``) the way injection assigns
    them: Linear and 1x1 layers ``alpha``, larger Conv2d kernels ``conv_alpha``, the text encoders
    ``text_encoder_alpha``; rsLoRA alphas become plain ones (``alpha * sqrt(r)``).
    """
    method = get_method(spec.method)
    if not method.checkpoint_is_plain:
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
    weights = LoraWeights(method=spec.method, info={
        "preset": spec.preset, "spec": spec.to_dict(), "network_module": method.kohya_network_module,
        "network_args": method.network_args(spec)})
    for (component, path), tensors in sorted(parts.items()):
        down, up = tensors["down"].float(), tensors["up"].float()
        rank = down.shape[0]
        big_kernel = down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)
        if is_text_encoder(component):
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
    ``rank`` components, which DyLoRA trained as the rank-``rank`` adapter: each method's
    ``reduce_rank`` decides). ``out`` defaults to
    ``<source folder>/exports/<name>[-r<rank>][-diffusers].safetensors``. The kohya
    ``ss_*`` metadata of the source file is carried over. ``base`` (a base-model spec) names the
    layers of files whose shapes fit no SD 1.x / 2.x / XL model.
    """
    from . import match_to_model, read_lora_file, save_lora

    src = Path(source).expanduser()
    if src.is_dir() and (src / "config.toml").is_file():
        raise LoraFileError(f"{src} is a training run; export runs with sdlora.train.export_run (sdlora export RUN).")
    file = read_lora_file(src)
    entries = file_entries(file.tensors, file.format)[0]
    family, pred = _family_of(file.metadata, entries)
    models = models_for(family, pred, base)
    if family not in _SHIPPED:  # named by the given base model
        family = "sdxl" if "text_encoder_2" in models else (
            file.metadata.get("ss_base_model_version", "sd_v1").startswith("sd_v2") and "sd2" or "sd1")
    try:
        weights, unknown = match_to_model(file, models["unet"], models["text_encoder"], models.get("text_encoder_2"))
    except LoraShapeMismatchError:
        if base is None or family not in _SHIPPED:
            raise
        # The family's layout with other widths (e.g. a small SDXL-architecture model): the base names it.
        models = _base_models(base)
        weights, unknown = match_to_model(file, models["unet"], models["text_encoder"], models.get("text_encoder_2"))
    if unknown:
        raise LoraFileError(f"{src}: {len(unknown)} key(s) match no {family} layer (e.g. {unknown[0]}); not exporting a partial file.")
    # The method the file belongs to decides how it is re-ranked (DyLoRA: truncation, not SVD).
    method = method_for_file(file.metadata, {s for e in entries.values() for s in e["suffixes"]})
    weights.method = method.name
    if file.metadata.get("sdlora_preset"):
        weights.info["preset"] = file.metadata["sdlora_preset"]
    carried = {k: v for k, v in file.metadata.items() if k.startswith("ss_") and not k.startswith("ss_network_")}
    title = file.metadata.get("modelspec.title") or src.stem
    if dtype is None:  # keep the source file's precision
        dtypes = {t.dtype for t in file.tensors.values() if t.ndim > 0}
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"
    if rank:
        weights = method.reduce_rank(weights, int(rank))
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
        resolution=file.metadata.get("modelspec.resolution"),
    )
