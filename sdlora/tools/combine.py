"""Several LoRAs into one file ("LoRA composition"): the weighted sum of their deltas, per layer.

Two ways:

* exact (no ``rank``): the ranks are concatenated. A layer adapted by files 1..n gets
  ``down = [down_1; ...; down_n]`` and ``up = [w_1 s_1 up_1, ..., w_n s_n up_n]`` (``s_i`` the
  module's ``alpha / rank``), so ``up @ down`` is exactly ``sum_i w_i * delta_i``. The rank of the
  result is the sum of the ranks; only plain LoRA modules can be concatenated.
* ``rank=R``: the best rank-``R`` approximation of that sum (truncated SVD, Eckart-Young), computed
  from the QR of the stacked thin factors (no ``out x in`` matrix for plain LoRA modules; other
  module kinds are summed as full deltas). The relative Frobenius error
  ``||sum - approx|| / ||sum||`` is reported per layer and over all layers.

Layers present in only some files take the sum of those files (the union of modules). Every module
of the written file has the same ``alpha`` (per-module scales are folded into ``up``), which every
loader reads the same way. DoRA files are refused: a DoRA layer's output is its magnitude times a
normalised direction of the *full* weight, which is not a sum of deltas.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..lora.targets import COMPONENTS
from ..lora.weights import LoraWeights, ModuleLora
from . import _svd
from ._common import (
    ModelCache, Progress, Ticker, ToolError, ToolReport, carried_metadata, check_dtype, check_rank, family_label,
    is_plain, layer_kind, module_kind, parse_weighted, percent, rank_text, read_weights, same_family, uniform_alpha,
)

COLUMNS = ["layer", "kind", "files", "ranks in", "rank out", "rel. error"]


@dataclass
class Combined:
    """The combined weights and the per-layer rows / overall numbers of :func:`combine_weights`."""

    weights: LoraWeights
    rows: list[list[Any]]
    overall_error: float | None  # relative Frobenius error over all layers (rank mode), None when exact
    layers: int


def _refuse_dora(weights: LoraWeights, name: str) -> None:
    for component, path, module in weights.items():
        if getattr(module, "dora_scale", None) is not None or weights.method == "dora":
            raise ToolError(
                f"{name} is a DoRA LoRA (layer {component}.{path} has a dora_scale): a DoRA layer rescales the "
                "full adapted weight by its magnitudes, so its effect is not a delta that can be added to "
                "another LoRA's. Merge it into a base model with sdlora merge-into instead."
            )


def combine_weights(
    items: Sequence[tuple[LoraWeights, float]],
    rank: int | None = None,
    *,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Combined:
    """Combine ``(weights, weight)`` pairs (all named by the same model tree) into one set of weights.

    ``rank=None`` concatenates ranks (exact; plain LoRA modules only); ``rank=R`` keeps the best
    rank-``R`` approximation of each layer's weighted sum. ``names`` label the inputs in messages.
    Raises :class:`ToolError` for DoRA inputs, a rank below 1, or (exact mode) modules that are not
    plain LoRA.
    """
    if not items:
        raise ToolError("Nothing to combine: give at least one LoRA file.")
    if rank is not None:
        check_rank(rank)
    names = list(names or [f"input {i + 1}" for i in range(len(items))])
    for (weights, _), name in zip(items, names):
        _refuse_dora(weights, name)
    layers: dict[tuple[str, str], list[tuple[int, Any, float]]] = {}
    for i, (weights, w) in enumerate(items):
        for component, path, module in weights.items():
            layers.setdefault((component, path), []).append((i, module, float(w)))
    order = sorted(layers, key=lambda k: (COMPONENTS.index(k[0]), k[1]))  # type: ignore[arg-type]
    out = LoraWeights(method="lora", info=_info(items))
    rows: list[list[Any]] = []
    ticker = Ticker(progress, len(order))
    total_sq = tail_sq = 0.0
    for component, path in order:
        parts = layers[(component, path)]
        label = f"{component}.{path}"
        plain = all(is_plain(m) for _, m, _ in parts)
        ranks_in = "+".join(str(rank_text(m)) for _, m, _ in parts)
        kind = layer_kind(parts[0][1])
        if plain:
            shape = (parts[0][1].up.shape[0], *parts[0][1].down.shape[1:])
            ups = [m.up.reshape(m.up.shape[0], m.rank).double() * (w * m.scale) for _, m, w in parts]
            downs = [m.down.reshape(m.rank, -1).double() for _, m, _ in parts]
            up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
            total_rank = up.shape[1]
        elif rank is None:
            bad = next(m for _, m, _ in parts if not is_plain(m))
            who = names[next(i for i, m, _ in parts if m is bad)]
            raise ToolError(
                f"{who}: layer {label} is a {module_kind(bad)} module, not plain LoRA; exact combination "
                "concatenates LoRA ranks, which only plain LoRA modules have. Give --rank R to combine by SVD."
            )
        if rank is None or (plain and total_rank <= rank):
            module = _concatenated(up, down, shape)
            rows.append([label, kind, len(parts), ranks_in, module.rank, 0.0 if rank is not None else None])
            if rank is not None:
                total_sq += _svd.of_factors(up, down, shape).norm() ** 2
        else:
            if plain:
                svd = _svd.of_factors(up, down, shape)
            else:
                delta = sum(w * m.delta().double() for _, m, w in parts)
                svd = _svd.of_matrix(delta)
            k = max(1, min(rank, int((svd.s > 0).sum()) or 1))
            module = svd.module(k)
            total_sq += svd.norm() ** 2
            tail_sq += svd.tail_norm(k) ** 2
            rows.append([label, kind, len(parts), ranks_in, k, svd.relative_error(k)])
        out.component(component)[path] = module  # type: ignore[arg-type]
        ticker.step(label)
    overall = math.sqrt(tail_sq / total_sq) if rank is not None and total_sq > 0 else (0.0 if rank is not None else None)
    return Combined(uniform_alpha(out), rows, overall, len(order))


def _concatenated(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> ModuleLora:
    r = up.shape[1]
    if len(shape) == 4:
        return ModuleLora(down.float().reshape(r, *shape[1:]), up.float().reshape(shape[0], r, 1, 1), float(r))
    return ModuleLora(down.float().contiguous(), up.float().contiguous(), float(r))


def _info(items: Sequence[tuple[LoraWeights, float]]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for weights, _ in items:
        if weights.info.get("unet_layout") is not None:
            info["unet_layout"] = weights.info["unet_layout"]
            break
    return info


def combine_loras(
    items: Sequence[str | tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    format: str = "kohya",
    dtype: str | None = None,
    base: Any = None,
    progress: Progress | None = None,
) -> ToolReport:
    """Combine LoRA files (``"A.safetensors:0.8"`` strings or ``(path, weight)`` pairs) into ``out``.

    No base model is loaded for SD 1.x / 2.x / XL files; ``base`` (a base-model spec or a loaded
    ``BaseModel``) names the layers of files made for other shapes (the demo model, tiny models).
    Files of different families are refused with both named. ``dtype`` (fp32/fp16/bf16) defaults
    to the inputs' own precision when they agree, else fp32. Returns the report (per-layer rows;
    ``values["overall_error"]`` in rank mode).
    """
    from ..lora.formats import save_lora

    start = time.monotonic()
    if format not in ("kohya", "diffusers"):
        raise ToolError(f"--format {format}: use kohya or diffusers.")
    check_dtype(dtype)
    if rank is not None:
        check_rank(rank)
    parsed = [parse_weighted(item) for item in items]
    if not parsed:
        raise ToolError("Nothing to combine: give at least one LoRA file (FILE:WEIGHT).")
    target = Path(out).expanduser()
    if format == "kohya" and target.suffix.lower() != ".safetensors":
        raise ToolError(f"--out {target}: a kohya LoRA file name ends in .safetensors.")
    cache = ModelCache(base)
    loaded = []
    for path, _ in parsed:
        if progress:
            progress(0, 1, f"reading {Path(path).name}")
        loaded.append(read_weights(path, cache))
    family, pred = same_family(loaded)
    combined = combine_weights(
        [(lo.weights, w) for lo, (_, w) in zip(loaded, parsed)], rank,
        names=[lo.path.name for lo in loaded], progress=progress,
    )
    sources = ", ".join(f"{lo.path.name} x{w:g}" for lo, (_, w) in zip(loaded, parsed))
    how = f"best rank-{rank} approximation (SVD)" if rank is not None else "ranks concatenated (exact)"
    metadata = {"ss_training_comment": f"combined by sdlora: {sources}; {how}"}
    shared = [carried_metadata(lo.metadata) for lo in loaded]
    for key in ("ss_sd_model_name", "ss_resolution", "ss_sd_model_hash"):
        values = {m.get(key) for m in shared}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()  # type: ignore[assignment]
    resolutions = {lo.metadata.get("modelspec.resolution") for lo in loaded}
    resolution = resolutions.pop() if len(resolutions) == 1 else None
    if dtype is None:
        kinds = {lo.dtype for lo in loaded}
        dtype = kinds.pop() if len(kinds) == 1 else "fp32"
    written = save_lora(
        combined.weights, target, format=format, metadata=metadata if format == "kohya" else None,  # type: ignore[arg-type]
        family=family, prediction_type=pred, title=target.stem if format == "kohya" else None, dtype=dtype,
        resolution=resolution,
    )
    ranks = sorted({r[4] for r in combined.rows})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    lines = [
        f"combined {len(loaded)} {family_label(family)} LoRAs ({sources}): {combined.layers} layers, {rank_text}, {how}",
    ]
    if rank is not None:
        errors = [r[5] for r in combined.rows if r[5] is not None]
        worst = max(combined.rows, key=lambda r: r[5] or 0.0)
        lines.append(
            f"relative error (Frobenius) overall {percent(combined.overall_error)}, mean per layer "
            f"{percent(sum(errors) / len(errors))}, largest {percent(worst[5])} ({worst[0]})"
        )
    lines.append(f"wrote {written} ({format}, {dtype}) in {time.monotonic() - start:.1f}s")
    return ToolReport(
        tool="combine", columns=COLUMNS, rows=combined.rows, summary="\n".join(lines), out=written,
        values={"overall_error": combined.overall_error, "layers": combined.layers, "family": family,
                "rank": rank, "format": format, "dtype": dtype},
    )


__all__ = ["Combined", "combine_loras", "combine_weights"]
