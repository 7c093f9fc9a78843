"""Change the rank of a LoRA file: one fixed rank, or a rank per layer chosen from its singular values
(the choices of kohya sd-scripts' ``networks/resize_lora.py``).

Each layer's delta at scale 1 is ``s * up @ down`` with singular values ``S`` (descending, of the
layer's full ``out x in*kh*kw`` matrix: zeros past the LoRA's rank). With ``n = len(S)``:

* ``sv_ratio=T``: keep the singular values above ``S[0] / T``; ``k`` = how many there are.
* ``sv_cumulative=T``: ``k`` = the first position where ``cumsum(S) / sum(S)`` reaches ``T``, plus 1.
* ``sv_fro=T``: ``k`` = the first position where ``cumsum(S^2) / sum(S^2)`` reaches ``T^2``
  (the share ``T`` of the Frobenius norm is kept), plus 1.

As in kohya's script, ``k`` is clamped to ``[1, n - 1]`` and the new rank is ``k + 1`` (one more
than the count), a zero layer (``S[0] <= 1e-6``) gets rank 1, and the new rank is capped by the
maximum rank (``rank``, when given with a dynamic method). Unlike the script, a layer is never
given more than its own rank (the extra components would be zeros): such layers are kept as they
are, so resizing to the file's own rank changes nothing.

Fixed ranks go through the file's method (``AdapterMethod.reduce_rank``: truncated SVD for LoRA,
keeping the first components for DyLoRA); per-layer ranks through
:func:`sdlora.lora.weights.resize_rank`. Both keep every layer's scale ``alpha / rank``. DoRA
files are refused (their magnitudes belong to the full-rank direction).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora.errors import LoraError
from ..lora.variants import get_method
from ..lora.weights import LoraWeights, ModuleLora, resize_rank
from . import _svd
from ._common import (
    ModelCache, Progress, Ticker, ToolError, ToolReport, carried_metadata, check_dtype, check_rank, family_label,
    is_plain, layer_kind, percent, rank_text, read_weights, uniform_alpha,
)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
#: kohya's MIN_SV: a layer whose largest singular value is at most this is a zero layer (rank 1)
MIN_SV = 1e-6
COLUMNS = ["layer", "kind", "rank in", "rank out", "alpha out", "fro retained", "rel. error"]


def parse_dynamic(text: str | tuple[str, float]) -> tuple[str, float]:
    """``"sv_fro=0.9"`` -> ("sv_fro", 0.9), checked: ratios >= 1, shares in (0, 1]."""
    if isinstance(text, tuple):
        method, value = text
    else:
        method, sep, raw = str(text).partition("=")
        method = method.strip()
        if not sep:
            raise ToolError(f"--dynamic {text}: write METHOD=VALUE, e.g. sv_fro=0.9 ({', '.join(DYNAMIC_METHODS)}).")
        try:
            value = float(raw)
        except ValueError:
            raise ToolError(f"--dynamic {text}: {raw!r} is not a number; e.g. {method}=0.9.") from None
    if method not in DYNAMIC_METHODS:
        raise ToolError(f"--dynamic {method}: unknown method; use one of {', '.join(DYNAMIC_METHODS)} (e.g. sv_fro=0.9).")
    if not math.isfinite(value):
        raise ToolError(f"--dynamic {method}={value}: give a finite number.")
    if method == "sv_ratio" and value < 1:
        raise ToolError(f"--dynamic sv_ratio={value}: the ratio of the largest to the smallest kept singular value is >= 1 (e.g. sv_ratio=10).")
    if method != "sv_ratio" and not 0 < value <= 1:
        raise ToolError(f"--dynamic {method}={value}: give the share to keep, above 0 and at most 1 (e.g. {method}=0.9).")
    return method, float(value)


def dynamic_rank(s: torch.Tensor, full_rank: int, method: str, value: float) -> int:
    """The rank kohya's ``rank_resize`` picks for singular values ``s`` (before the max-rank cap).

    ``s``: the nonzero part of the spectrum, descending; ``full_rank``: the number of singular
    values of the full matrix (the rest are zeros).
    """
    s = s.double()[:full_rank]
    if s.numel() < full_rank:
        s = torch.cat([s, s.new_zeros(full_rank - s.numel())])
    n = s.numel()
    if n == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method == "sv_ratio":
        index = int((s > s[0] / value).sum())
    elif method == "sv_cumulative":
        share = torch.cumsum(s, 0) / s.sum()
        index = int(torch.searchsorted(share, torch.tensor([value], dtype=share.dtype))) + 1
    elif method == "sv_fro":
        squares = s.pow(2)
        share = torch.cumsum(squares, 0) / squares.sum()
        index = int(torch.searchsorted(share, torch.tensor([value * value], dtype=share.dtype))) + 1
    else:
        raise ToolError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    index = max(1, min(index, n - 1))
    return index + 1


def _big_kernel(module: Any) -> bool:
    kind = layer_kind(module)
    return kind.startswith("Conv2d") and kind != "Conv2d 1x1"


@dataclass
class Resized:
    weights: LoraWeights
    rows: list[list[Any]]
    overall_error: float
    changed: int


def resize_weights(
    weights: LoraWeights,
    rank: int | None = None,
    *,
    dynamic: str | tuple[str, float] | None = None,
    conv_rank: int | None = None,
    progress: Progress | None = None,
) -> Resized:
    """Resize ``weights`` to ``rank`` (fixed) or per layer by ``dynamic`` (``"sv_fro=0.9"``, with
    ``rank`` as the maximum). ``conv_rank`` is the (maximum) rank of Conv2d layers with kernels
    larger than 1x1 (default: ``rank``). Layers at or below their target rank stay as they are."""
    if weights.method == "dora" or any(getattr(m, "dora_scale", None) is not None for _, _, m in weights.items()):
        raise ToolError("DoRA LoRAs cannot be resized: their magnitudes are tied to the full-rank direction of "
                        "each layer, which a lower rank changes.")
    if rank is None and dynamic is None:
        raise ToolError("Give --rank R, --dynamic METHOD=VALUE, or both (then R is the largest rank a layer gets).")
    if rank is not None:
        check_rank(rank)
    if conv_rank is not None:
        check_rank(conv_rank, "conv_rank")
    choice = parse_dynamic(dynamic) if dynamic is not None else None
    items = list(weights.items())
    ticker = Ticker(progress, len(items))
    rows: list[list[Any]] = []
    result = LoraWeights(method=weights.method, info=dict(weights.info))
    fixed: dict[int, LoraWeights] = {}
    if choice is None:  # the method decides how a file of its kind gets a fixed rank
        method = get_method(weights.method) if weights.method else get_method("lora")
        for target in {conv_rank or rank, rank}:  # type: ignore[union-attr]
            part = LoraWeights(method=weights.method, info=dict(weights.info))
            for component, path, module in items:
                if ((conv_rank or rank) if _big_kernel(module) else rank) == target:
                    part.component(component)[path] = module
            if len(part) == 0:
                continue
            try:
                fixed[target] = method.reduce_rank(part, target) if all(is_plain(m) for _, _, m in part.items()) \
                    else _reduce_any(part, target)
            except LoraError as exc:
                raise ToolError(str(exc)) from None
    total_sq = err_sq = 0.0
    changed = 0
    for component, path, module in items:
        label = f"{component}.{path}"
        cap = (conv_rank or rank) if _big_kernel(module) else rank
        rank_in = module.rank if isinstance(module, ModuleLora) else None
        if choice is None:
            new = fixed[cap].component(component)[path]  # type: ignore[index]
        else:
            svd = _svd.of_any(module)
            k = dynamic_rank(svd.s, svd.full_rank, *choice)
            limit = cap if cap is not None else (rank_in or k)
            k = min(k, limit)
            if is_plain(module) and k >= module.rank:
                new = module
            elif is_plain(module):
                single = LoraWeights(info=dict(weights.info))
                single.component(component)[path] = module
                new = resize_rank(single, k).component(component)[path]
            else:
                new = svd.module(k)
        if new is module:
            err, norm = 0.0, math.sqrt(max(0.0, _svd.inner(module, module)))
        else:
            err, norm = _svd.difference(module, new)
            changed += 1
        total_sq += norm * norm
        err_sq += err * err
        rel = err / norm if norm > 0 else 0.0
        retained = math.sqrt(max(0.0, 1 - rel * rel))
        rows.append([label, layer_kind(module), rank_in if rank_in is not None else rank_text(module),
                     new.rank, float(new.alpha), retained, rel])
        result.component(component)[path] = new
        ticker.step(label)
    if choice is not None:
        result = uniform_alpha(result)
        for row, (_, _, m) in zip(rows, result.items()):
            row[4] = float(m.alpha)
    overall = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    return Resized(result, rows, overall, changed)


def _reduce_any(weights: LoraWeights, rank: int) -> LoraWeights:
    """Fixed rank for weights with module kinds other than plain LoRA (LoHa, LoKr, ...): SVD of each delta."""

    def reduce(m):
        if is_plain(m):
            single = LoraWeights()
            single.unet["x"] = m
            return resize_rank(single, rank).unet["x"]
        return _svd.of_matrix(m.delta()).module(rank)

    return weights.map_modules(reduce, method="lora")


def resize_lora(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    dynamic: str | tuple[str, float] | None = None,
    conv_rank: int | None = None,
    format: str = "kohya",
    dtype: str | None = None,
    base: Any = None,
    progress: Progress | None = None,
) -> ToolReport:
    """Resize the LoRA file ``path`` and write it to ``out``; see the module docstring for the choices.

    ``base`` names the layers of files made for models other than SD 1.x / 2.x / XL (the demo model,
    tiny models). ``dtype`` defaults to the file's own precision. The report has one row per layer
    (rank in/out, alpha, share of the Frobenius norm kept, relative error) and a summary.
    """
    from ..lora.formats import save_lora

    start = time.monotonic()
    if format not in ("kohya", "diffusers"):
        raise ToolError(f"--format {format}: use kohya or diffusers.")
    check_dtype(dtype)
    if rank is not None:
        check_rank(rank)
    if dynamic is not None:
        dynamic = parse_dynamic(dynamic)
    if rank is None and dynamic is None:
        raise ToolError("Give --rank R, --dynamic METHOD=VALUE, or both (then R is the largest rank a layer gets).")
    target = Path(out).expanduser()
    if format == "kohya" and target.suffix.lower() != ".safetensors":
        raise ToolError(f"--out {target}: a kohya LoRA file name ends in .safetensors.")
    loaded = read_weights(path, ModelCache(base))
    if loaded.method == "dora":
        raise ToolError(f"{loaded.path.name} is a DoRA LoRA; DoRA files cannot be resized (their magnitudes are "
                        "tied to the full-rank direction of each layer, which a lower rank changes).")
    resized = resize_weights(loaded.weights, rank, dynamic=dynamic, conv_rank=conv_rank, progress=progress)
    old_ranks = sorted({r[2] for r in resized.rows if isinstance(r[2], int)})
    new_ranks = [r[3] for r in resized.rows]
    metadata = carried_metadata(loaded.metadata)
    comment = loaded.metadata.get("ss_training_comment", "")
    old_text = "/".join(str(r) for r in old_ranks) or "?"
    if dynamic is not None:
        cap = f", max rank {rank}" if rank else ""
        metadata["ss_training_comment"] = f"dynamic resize with {dynamic[0]}={dynamic[1]:g}{cap} from {old_text}; {comment}".rstrip("; ")
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv = f" (conv: {conv_rank})" if conv_rank and conv_rank != rank else ""
        metadata["ss_training_comment"] = f"dimension is resized from {old_text} to {rank}{conv}; {comment}".rstrip("; ")
    resized.weights.method = loaded.method if dynamic is None and all(is_plain(m) for _, _, m in loaded.weights.items()) else "lora"
    written = save_lora(
        resized.weights, target, format=format, metadata=metadata if format == "kohya" else None,  # type: ignore[arg-type]
        family=loaded.family, prediction_type=loaded.prediction_type,
        title=loaded.metadata.get("modelspec.title") or target.stem, dtype=dtype or loaded.dtype,
        resolution=loaded.metadata.get("modelspec.resolution"),
    )
    retained = [r[5] for r in resized.rows]
    mean = sum(retained) / len(retained)
    std = math.sqrt(sum((x - mean) ** 2 for x in retained) / len(retained))
    how = f"{dynamic[0]}={dynamic[1]:g}" + (f", max rank {rank}" if rank else "") if dynamic else f"rank {rank}"
    if conv_rank and conv_rank != rank:
        how += f", conv rank {conv_rank}"
    summary = "\n".join([
        (f"resized {loaded.path.name} ({family_label(loaded.family)}, rank {old_text}) with {how}: "
         f"{len(resized.rows)} layers, {resized.changed} changed, {len(resized.rows) - resized.changed} kept as they were"),
        (f"new ranks {min(new_ranks)}-{max(new_ranks)} (mean {sum(new_ranks) / len(new_ranks):.1f}); Frobenius norm "
         f"retained per layer: mean {percent(mean)} (std {std:.3f}); relative error overall {percent(resized.overall_error)}"),
        f"wrote {written} ({format}, {dtype or loaded.dtype}) in {time.monotonic() - start:.1f}s",
    ])
    return ToolReport(
        tool="resize", columns=COLUMNS, rows=resized.rows, summary=summary, out=written,
        values={"overall_error": resized.overall_error, "changed": resized.changed, "layers": len(resized.rows),
                "family": loaded.family, "mean_retained": mean},
    )


__all__ = ["DYNAMIC_METHODS", "dynamic_rank", "parse_dynamic", "resize_lora", "resize_weights"]
