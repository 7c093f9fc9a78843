"""Bake LoRAs into a base model: ``W = W0 + sum_i w_i * delta_i(W0)`` for every layer they adapt.

``delta_i`` is what LoRA ``i`` adds to the layer at multiplier 1, computed from the *unmerged*
weight ``W0`` (as the preview, A1111 and ComfyUI apply several LoRAs side by side): for plain LoRA
``alpha / rank * up @ down``; for a DoRA module (``dora_scale``, the A1111/ComfyUI layout)
``(W0 + d) * m / ||W0 + d||_c - W0`` with ``d`` the LoRA delta and the norm per input channel.
Module kinds other than plain LoRA that a file reader yields are merged through their ``delta()``.

The result is written as one ``.safetensors`` file in the original A1111/ComfyUI layout (LDM for
SD 1.x/2.x, SGM for SDXL; :func:`sdlora.models.single_file.save_single_file`) or as a diffusers
folder (text encoder weights in the standard ``text_model.`` key layout), always to a temporary
name first and then renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..lora.targets import COMPONENTS, base_layer, model_path
from ..lora.weights import LoraWeights
from ._common import (
    DTYPES, Progress, Ticker, ToolError, ToolReport, check_dtype, family_label, layer_kind, parse_weighted,
)

COLUMNS = ["layer", "kind", "LoRAs", "relative change"]
FORMATS = ("single", "diffusers")


def module_delta(module: Any, weight: torch.Tensor) -> torch.Tensor:
    """What ``module`` adds to a layer with weight ``weight`` at multiplier 1 (float32, weight's shape)."""
    delta = module.delta().float().reshape(weight.shape)
    scale = getattr(module, "dora_scale", None)
    if scale is None:
        return delta
    from ..lora.variants.dora import column_norm, magnitude_shape

    w0 = weight.detach().float()
    adapted = w0 + delta
    magnitude = scale.float().reshape(magnitude_shape(weight.shape))
    return adapted * (magnitude / column_norm(adapted)) - w0


def merge_weights(
    models: dict[str, nn.Module | None],
    items: Sequence[tuple[LoraWeights, float]],
    *,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[list[Any]]:
    """Add ``sum_i w_i * delta_i`` to the layers of ``models`` (``{"unet", "text_encoder",
    "text_encoder_2"}``) in place; every delta is taken against the weights as they were before.

    Returns one row per changed layer: name, kind, the LoRAs that touch it, ``||dW|| / ||W0||``.
    """
    names = list(names or [f"LoRA {i + 1}" for i in range(len(items))])
    per_layer: dict[tuple[str, str], list[tuple[int, Any, float]]] = {}
    for i, (weights, w) in enumerate(items):
        for component, path, module in weights.items():
            if models.get(component) is None:
                raise ToolError(f"{names[i]} adapts the {component.replace('_', ' ')}, which this base model does not have.")
            per_layer.setdefault((component, path), []).append((i, module, float(w)))
    order = sorted(per_layer, key=lambda k: (COMPONENTS.index(k[0]), k[1]))  # type: ignore[arg-type]
    ticker = Ticker(progress, len(order))
    rows: list[list[Any]] = []
    with torch.no_grad():
        for component, path in order:
            model = models[component]
            layer = base_layer(model.get_submodule(model_path(model, component, path)))  # type: ignore[arg-type, union-attr]
            weight = layer.weight
            w0 = weight.detach().float()
            total = torch.zeros_like(w0)
            for _, module, w in per_layer[(component, path)]:
                total += w * module_delta(module, w0)
            weight.copy_((w0 + total).to(weight.dtype))
            base_norm = float(w0.norm())
            change = float(total.norm()) / base_norm if base_norm > 0 else float("inf")
            label = f"{component}.{path}"
            used = ", ".join(f"{names[i]} x{w:g}" for i, _, w in per_layer[(component, path)])
            rows.append([label, layer_kind(per_layer[(component, path)][0][1]), used, change])
            ticker.step(label)
    return rows


def _save_diffusers(pipe: Any, target: Path, dtype: torch.dtype) -> Path:
    """A diffusers folder of ``pipe`` with weights in ``dtype`` (configs say float32, as diffusers
    loads by default) and the first text encoder in the standard ``text_model.`` key layout."""
    from safetensors.torch import save_file

    from ..demo.model import prefixed_text_encoder_state
    from ..paths import atomic_dir

    def write(folder: Path, name: str, state: dict[str, torch.Tensor]) -> None:
        for old in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
            old.unlink()
        tensors = {}
        for k, v in state.items():
            v = v.detach().to("cpu")
            tensors[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})

    with atomic_dir(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write(tmp / "unet", "diffusion_pytorch_model.safetensors", pipe.unet.state_dict())
        write(tmp / "vae", "diffusion_pytorch_model.safetensors", pipe.vae.state_dict())
        write(tmp / "text_encoder", "model.safetensors", prefixed_text_encoder_state(pipe.text_encoder))
        if getattr(pipe, "text_encoder_2", None) is not None:
            state = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
            write(tmp / "text_encoder_2", "model.safetensors", state)
    return target


def _format_for(out: Path, format: str | None) -> str:
    if format is None:
        return "single" if out.suffix.lower() == ".safetensors" else "diffusers"
    if format not in FORMATS:
        raise ToolError(f"--format {format}: use single (one .safetensors file) or diffusers (a folder).")
    if format == "single" and out.suffix.lower() != ".safetensors":
        raise ToolError(f"--out {out}: a single-file model is written as .safetensors; give a name ending in .safetensors.")
    if format == "diffusers" and out.suffix.lower() in (".safetensors", ".ckpt"):
        raise ToolError(f"--out {out}: a diffusers model is a folder; give a folder name (no {out.suffix}).")
    return format


def merge_into(
    base: Any,
    loras: Sequence[str | tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: str = "fp16",
    allow_unknown: bool = False,
    progress: Progress | None = None,
) -> ToolReport:
    """Merge LoRA files (``"A.safetensors:0.8"`` or ``(path, weight)``) into ``base`` and write ``out``.

    ``base``: a base-model spec for :func:`sdlora.models.loading.load_base` ("demo", "tiny", a
    folder, a single file, a cached hub id) or a loaded ``BaseModel`` (changed in place).
    ``format``: "single" (one ``.safetensors``, the A1111/ComfyUI layout) or "diffusers" (a folder);
    by default from ``out`` (a ``.safetensors`` name means single). ``dtype``: fp16 (default), bf16
    or fp32 weights in the output. Keys of a LoRA file that fit no layer of the base are an error
    unless ``allow_unknown`` (then counted in the summary and left out).
    """
    from ..lora.formats import match_to_model, read_lora_file
    from ..models.loading import load_base

    start = time.monotonic()
    check_dtype(dtype)
    if dtype is None:
        dtype = "fp16"
    target = Path(out).expanduser()
    fmt = _format_for(target, format)
    parsed = [parse_weighted(item) for item in loras]
    if not parsed:
        raise ToolError("Nothing to merge: give at least one LoRA file (--lora FILE:WEIGHT).")
    files = [read_lora_file(path) for path, _ in parsed]  # bad files fail before the base model loads
    if fmt == "single" and not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0, 1, "loading the base model")
    loaded = base if hasattr(base, "pipe") else load_base(None if base is None else str(base))
    models = {"unet": loaded.unet, "text_encoder": loaded.text_encoder, "text_encoder_2": loaded.text_encoder_2}
    items: list[tuple[LoraWeights, float]] = []
    skipped: list[str] = []
    for file, (_, w) in zip(files, parsed):
        weights, unknown = match_to_model(file, loaded.unet, loaded.text_encoder, loaded.text_encoder_2)
        if unknown and not allow_unknown:
            raise ToolError(
                f"{file.path}: {len(unknown)} key(s) match no layer of the base model {loaded.source} "
                f"({family_label(loaded.family)}), e.g. {unknown[0]}; is it a LoRA for another model? "
                "(--skip-unknown merges the rest.)"
            )
        skipped += [f"{file.path.name}: {k}" for k in unknown]
        items.append((weights, w))
    names = [f.path.name for f in files]
    rows = merge_weights(models, items, names=names, progress=progress)
    sources = ", ".join(f"{n} x{w:g}" for n, (_, w) in zip(names, parsed))
    if progress:
        progress(0, 1, f"writing {target.name}")
    if fmt == "single":
        metadata = {"sdlora_merged_loras": json.dumps([{"file": n, "weight": w} for n, (_, w) in zip(names, parsed)]),
                    "sdlora_merged_base": str(loaded.source)}
        written = _save_single(loaded, target, DTYPES[dtype], metadata)
    else:
        written = _save_diffusers(loaded.pipe, target, DTYPES[dtype])
    counts = {c: sum(1 for r in rows if r[0].startswith(c + ".")) for c in COMPONENTS}
    parts = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in counts.items() if n)
    lines = [(f"merged {len(files)} LoRA(s) ({sources}) into {loaded.source} ({family_label(loaded.family)}): "
              f"{len(rows)} layers changed ({parts})")]
    if skipped:
        lines.append(f"{len(skipped)} key(s) matched no layer and were left out, e.g. {skipped[0]}")
    lines.append(f"wrote {written} ({'single file' if fmt == 'single' else 'diffusers folder'}, {dtype}) "
                 f"in {time.monotonic() - start:.1f}s")
    return ToolReport(
        tool="merge", columns=COLUMNS, rows=rows, summary="\n".join(lines), out=written,
        values={"layers": len(rows), "skipped_keys": skipped, "family": loaded.family, "format": fmt, "dtype": dtype},
    )


def _save_single(loaded: Any, target: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    from ..models.single_file import save_single_file

    try:
        return save_single_file(loaded.pipe, target, dtype=dtype, metadata=metadata, family=loaded.family)
    except ValueError as exc:
        raise ToolError(f"--out {target}: {exc}") from None


__all__ = ["FORMATS", "merge_into", "merge_weights", "module_delta"]
