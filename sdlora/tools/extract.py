"""A LoRA from the difference of two checkpoints of one family (a fine-tune minus its base).

For every layer LoRA adapts (the ``full`` preset: UNet attention, feed-forward, ``proj_in``/``proj_out``,
resnet and sampler convs; in each text encoder the attention and MLP projections, as kohya
sd-scripts' ``extract_lora_from_models.py`` takes them), the difference ``D = W_tuned - W_base`` is
approximated by its truncated SVD at the layer's rank: ``rank`` for Linear and 1x1 layers,
``conv_rank`` for larger Conv2d kernels (default ``rank``; 0 leaves those layers and the other
resnet/sampler layers out, kohya's behaviour without ``--conv_dim``). ``alpha`` equals the rank
(scale 1), as kohya writes it; the singular values are split evenly between ``up`` and ``down``
and no quantile clamping is applied, so a difference of rank <= ``rank`` comes back exactly.

Layers whose largest absolute difference is at most ``threshold`` are left out (an unchanged text
encoder, layers the fine-tune did not touch) and counted in the report.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..lora.targets import COMPONENTS, base_layer, describe_layer, get_preset, iter_adaptable, unet_layout
from ..lora.weights import LoraWeights
from . import _svd
from ._common import Progress, Ticker, ToolError, ToolReport, check_dtype, check_rank, family_label, percent

COLUMNS = ["layer", "kind", "rank", "max |diff|", "rel. error", "note"]
DEFAULT_THRESHOLD = 1e-4


@dataclass
class Extracted:
    weights: LoraWeights
    rows: list[list[Any]]
    overall_error: float
    extracted: int
    below_threshold: int
    identical: int
    per_component: dict[str, int] = field(default_factory=dict)


def _layers(model: torch.nn.Module, component: str, preset: str):
    patterns = [re.compile(p) for p in get_preset(preset).patterns(component)]  # type: ignore[arg-type]
    for path, canonical, layer in iter_adaptable(model, component):  # type: ignore[arg-type]
        if any(p.fullmatch(canonical) for p in patterns) and describe_layer(layer) is not None:
            yield path, canonical, layer


def extract_from_models(
    base: dict[str, torch.nn.Module | None],
    tuned: dict[str, torch.nn.Module | None],
    *,
    rank: int,
    conv_rank: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Progress | None = None,
) -> Extracted:
    """LoRA weights approximating ``tuned - base`` per layer (``{"unet", "text_encoder",
    "text_encoder_2"}`` of each; the same architecture). See the module docstring."""
    check_rank(rank)
    if conv_rank is not None and conv_rank != 0:
        check_rank(conv_rank, "conv_rank")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ToolError(f"--threshold {threshold}: give a number of 0 or more (the largest absolute weight "
                        "difference of a layer that is left out).")
    conv = rank if conv_rank is None else conv_rank
    preset = "full" if conv else "attn-mlp"
    work = []
    for component in COMPONENTS:
        b, t = base.get(component), tuned.get(component)
        if b is None:
            continue
        if t is None:
            raise ToolError(f"the tuned model has no {component.replace('_', ' ')}, the base model has one.")
        for path, canonical, layer in _layers(b, component, preset):
            try:
                other = base_layer(t.get_submodule(path))
            except AttributeError:
                raise ToolError(f"the tuned model has no layer {component}.{canonical}; the two models differ in "
                                "architecture.") from None
            work.append((component, canonical, layer, other))
    ticker = Ticker(progress, len(work))
    weights = LoraWeights(method="lora")
    layout = unet_layout(base.get("unet"))
    if layout is not None:
        weights.info["unet_layout"] = layout
    rows: list[list[Any]] = []
    total_sq = err_sq = 0.0
    below = identical = 0
    counts: dict[str, int] = {}
    with torch.no_grad():
        for component, canonical, layer, other in work:
            label = f"{component}.{canonical}"
            w_base, w_tuned = layer.weight, getattr(other, "weight", None)
            if w_tuned is None or w_tuned.shape != w_base.shape:
                shape = None if w_tuned is None else list(w_tuned.shape)
                raise ToolError(f"layer {label} has shape {list(w_base.shape)} in the base model and {shape} in the "
                                "tuned model; the two models differ in architecture.")
            diff = w_tuned.detach().float() - w_base.detach().float()
            kind, _, _, kernel = describe_layer(layer)  # type: ignore[misc]
            kind_text = "Linear" if kind == "linear" else f"Conv2d {kernel[0]}x{kernel[1]}"
            largest = float(diff.abs().max()) if diff.numel() else 0.0
            if largest <= threshold:
                below += 1
                identical += largest == 0.0
                rows.append([label, kind_text, None, largest, None, "left out: identical" if largest == 0.0
                             else "left out: below threshold"])
                ticker.step(label)
                continue
            r = conv if kind == "conv" and kernel != (1, 1) else rank
            svd = _svd.of_matrix(diff, torch.float32)
            k = min(r, svd.full_rank)
            weights.component(component)[canonical] = svd.module(k)  # type: ignore[arg-type]
            total_sq += svd.norm() ** 2
            err_sq += svd.tail_norm(k) ** 2
            counts[component] = counts.get(component, 0) + 1
            rows.append([label, kind_text, k, largest, svd.relative_error(k), ""])
            ticker.step(label)
    overall = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    return Extracted(weights, rows, overall, len(work) - below, below, identical, counts)


def extract_lora(
    base: Any,
    tuned: Any,
    out: str | os.PathLike[str],
    *,
    rank: int,
    conv_rank: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    format: str = "kohya",
    dtype: str | None = "fp16",
    progress: Progress | None = None,
) -> ToolReport:
    """Extract a LoRA from ``tuned`` minus ``base`` (base-model specs for ``load_base`` or loaded
    ``BaseModel``s of the same family) and write it to ``out`` (kohya or diffusers layout)."""
    from ..lora.formats import save_lora
    from ..models.loading import load_base

    start = time.monotonic()
    check_rank(rank)
    if conv_rank is not None and conv_rank != 0:
        check_rank(conv_rank, "conv_rank")
    check_dtype(dtype)
    if format not in ("kohya", "diffusers"):
        raise ToolError(f"--format {format}: use kohya or diffusers.")
    target = Path(out).expanduser()
    if format == "kohya" and target.suffix.lower() != ".safetensors":
        raise ToolError(f"--out {target}: a kohya LoRA file name ends in .safetensors.")

    def load(spec: Any, what: str):
        if hasattr(spec, "pipe"):
            return spec
        if progress:
            progress(0, 1, f"loading the {what} model")
        return load_base(str(spec))

    b = load(base, "base")
    t = load(tuned, "tuned")
    if b.family != t.family:
        raise ToolError(
            f"--base {b.source} is {family_label(b.family)} but --tuned {t.source} is {family_label(t.family)}; "
            "a LoRA can only be extracted from two models of the same family."
        )
    parts = ("unet", "text_encoder", "text_encoder_2")
    result = extract_from_models(
        {p: getattr(b, p) for p in parts}, {p: getattr(t, p) for p in parts},
        rank=rank, conv_rank=conv_rank, threshold=threshold, progress=progress,
    )
    if not len(result.weights):
        raise ToolError(
            f"--tuned {t.source} and --base {b.source} differ by at most {threshold:g} in every layer LoRA adapts "
            f"({result.below_threshold} layers); nothing to extract (lower --threshold if the difference is real)."
        )
    conv = rank if conv_rank is None else conv_rank
    comment = (f"extracted by sdlora from {Path(str(t.source)).name} minus {Path(str(b.source)).name}: rank {rank}, "
               f"conv rank {conv}, threshold {threshold:g}")
    written = save_lora(
        result.weights, target, format=format, metadata={"ss_training_comment": comment} if format == "kohya" else None,
        family=b.family, prediction_type="v" if t.prediction_type == "v_prediction" else "epsilon",
        title=target.stem if format == "kohya" else None, dtype=dtype or "fp16", resolution=t.resolution,
    )
    parts_text = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in result.per_component.items())
    lines = [
        f"extracted {Path(str(t.source)).name} minus {Path(str(b.source)).name} ({family_label(b.family)}) at rank {rank}"
        + (f", conv rank {conv}" if conv != rank else "") + f": {result.extracted} layers ({parts_text})",
        f"{result.below_threshold} layers left out with differences of at most {threshold:g}"
        + (f" ({result.identical} identical)" if result.identical else ""),
        f"relative error (Frobenius) of the extracted differences: overall {percent(result.overall_error)}",
        f"wrote {written} ({format}, {dtype or 'fp16'}) in {time.monotonic() - start:.1f}s",
    ]
    return ToolReport(
        tool="extract", columns=COLUMNS, rows=result.rows, summary="\n".join(lines), out=written,
        values={"overall_error": result.overall_error, "extracted": result.extracted,
                "below_threshold": result.below_threshold, "identical": result.identical, "family": b.family},
    )


__all__ = ["DEFAULT_THRESHOLD", "extract_from_models", "extract_lora"]
