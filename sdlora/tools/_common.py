"""What the tools share: their error type, reports, ``FILE:WEIGHT`` parsing, progress, and reading
a LoRA file into :class:`~sdlora.lora.weights.LoraWeights` with or without a base model."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..lora.errors import LoraError, LoraShapeMismatchError
from ..lora.weights import LoraWeights, ModuleLora

#: ``progress(done, total, label)``: called as per-layer work advances (``label`` names the layer or stage)
Progress = Callable[[int, int, str], None]

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_SHIPPED = ("sd1", "sd2", "sdxl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ToolError(LoraError):
    """Bad input to a tool (a file, an option, a family mismatch); the message says what to do."""


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def check_rank(rank: Any, option: str = "rank") -> int:
    """``rank`` as a whole number >= 1, else :class:`ToolError` naming ``option``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ToolError(f"--{option.replace('_', '-')} {rank}: the rank must be a whole number of 1 or more.")
    return rank


def check_dtype(dtype: str | None, option: str = "dtype") -> str | None:
    if dtype is None or dtype in DTYPES:
        return dtype
    raise ToolError(f"--{option} {dtype}: use one of {', '.join(DTYPES)}.")


def parse_weighted(item: str | tuple[str | os.PathLike[str], float]) -> tuple[Path, float]:
    """``"A.safetensors:0.8"`` -> (path, 0.8); no suffix means weight 1.

    A path that exists as given is taken whole (a file name may contain ``:``). The weight must be a
    finite number; anything else after the last ``:`` is an error naming the item.
    """
    if isinstance(item, tuple):
        path, weight = item
        _check_weight(weight, f"{path}")
        return Path(path).expanduser(), float(weight)
    text = str(item)
    if Path(text).expanduser().exists():
        return Path(text).expanduser(), 1.0
    path, sep, suffix = text.rpartition(":")
    if not sep or not path or any(c in suffix for c in "/\\"):
        return Path(text).expanduser(), 1.0
    try:
        weight = float(suffix)
    except ValueError:
        raise ToolError(
            f"{text!r}: {suffix!r} is not a weight; write FILE:WEIGHT with a number, e.g. {path}:0.8"
        ) from None
    _check_weight(weight, text)
    return Path(path).expanduser(), weight


def _check_weight(weight: Any, what: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(float(weight)):
        raise ToolError(f"{what}: the weight must be a finite number, got {weight!r}.")


def check_input_file(path: str | os.PathLike[str], what: str = "LoRA file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ToolError(f"{what} not found: {p}. Check the path.")
    return p


def check_out_file(out: str | os.PathLike[str], suffix: str = ".safetensors", option: str = "--out") -> Path:
    p = Path(out).expanduser()
    if p.suffix.lower() != suffix:
        raise ToolError(f"{option} {p}: the file name must end in {suffix}.")
    if p.is_dir():
        raise ToolError(f"{option} {p} is a folder; give a file name ending in {suffix}.")
    return p


class Ticker:
    """Calls ``progress`` for each step of a loop (the callback decides how often to draw)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def step(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)


# Reports --------------------------------------------------------------------------------------------

@dataclass
class ToolReport:
    """What a tool did: one row per layer (``columns`` name the fields) and a summary.

    ``rows`` are lists of plain values (str / int / float / None) in the order of ``columns``, ready
    for a table widget; :meth:`table` renders them as text and :attr:`summary` says the result in a
    few lines. ``out`` is the written file or folder (None when nothing was written).
    """

    tool: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    summary: str = ""
    out: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def table(self, limit: int | None = None) -> str:
        """The rows as aligned text (``limit``: at most that many rows, then a count of the rest)."""
        rows = self.rows if limit is None else self.rows[:limit]
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        if limit is not None and len(self.rows) > limit:
            lines.append(f"... {len(self.rows) - limit} more rows")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "columns": self.columns, "rows": self.rows, "summary": self.summary,
                "out": str(self.out) if self.out else None, "values": self.values}

    def __str__(self) -> str:
        return self.summary


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def percent(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


# Layers ----------------------------------------------------------------------------------------------

def layer_kind(module: Any) -> str:
    """"Linear", "Conv2d 1x1" or "Conv2d 3x3" for a module of :class:`LoraWeights`."""
    if not getattr(module, "is_conv", False):
        return "Linear"
    shape = tuple(module.down.shape[2:]) if isinstance(module, ModuleLora) else tuple(module.delta().shape[2:])
    return f"Conv2d {shape[0]}x{shape[1]}"


def module_kind(module: Any) -> str:
    """A module's method in words: "LoRA", "DoRA", "LoHa", "LoKr", ..."""
    if isinstance(module, ModuleLora):
        return "LoRA" if module.dora_scale is None else "DoRA"
    kind = str(getattr(module, "kind", type(module).__name__))
    return {"loha": "LoHa", "lokr": "LoKr"}.get(kind, kind)


def rank_text(module: Any) -> int | str:
    """The rank of a plain module, else the kind and its own rank (e.g. "LoHa 8")."""
    if isinstance(module, ModuleLora):
        return module.rank
    rank = getattr(module, "rank", None)
    return f"{module_kind(module)} {rank}" if rank is not None else module_kind(module)


def is_plain(module: Any) -> bool:
    """A plain LoRA module (``down``/``up``/``alpha``, no DoRA magnitude)."""
    return isinstance(module, ModuleLora) and module.dora_scale is None


def most_common(values: Sequence[Any], default: Any = None) -> Any:
    from collections import Counter

    return Counter(values).most_common(1)[0][0] if values else default


def with_alpha(module: ModuleLora, alpha: float) -> ModuleLora:
    """The same delta written with another ``alpha`` (the scale change folded into ``up``)."""
    if module.alpha == alpha:
        return module
    factor = module.scale / (alpha / module.rank)
    return ModuleLora(module.down, module.up * factor, float(alpha), module.dora_scale)


def uniform_alpha(weights: LoraWeights) -> LoraWeights:
    """The same deltas with one alpha for every module: the most common rank.

    Per-module alphas are the part of the format some loaders get wrong (diffusers ignores
    per-module alphas of attention and text-encoder layers), so files the tools write keep one.
    """
    ranks = [m.rank for _, _, m in weights.items()]
    alpha = float(most_common(ranks, 1))
    return weights.map_modules(lambda m: with_alpha(m, alpha))


# Reading LoRA files without a base model ------------------------------------------------------------

@dataclass
class LoadedLora:
    """A LoRA file read into weights: its family, prediction type, method and metadata."""

    path: Path
    weights: LoraWeights
    family: str
    prediction_type: str  # "epsilon" | "v"
    method: str
    metadata: dict[str, str]
    dtype: str  # "fp32" | "fp16" | "bf16": the precision of the file's tensors
    unknown: list[str] = field(default_factory=list)
    family_reason: str = ""


def _file_family(metadata: Mapping[str, str], entries: Mapping[str, Any]) -> tuple[str, str, str]:
    from ..lora.formats.inspect import guess_family

    family, reason = guess_family(entries, metadata)
    version = metadata.get("ss_base_model_version", "")
    v = version.endswith("_v") or metadata.get("ss_v_parameterization") == "True"
    pred = metadata.get("modelspec.prediction_type") or ("v" if v else "epsilon")
    return family, ("v" if pred in ("v", "v_prediction") else "epsilon"), reason


def _file_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    kinds = {t.dtype for t in tensors.values() if t.ndim > 0 and t.is_floating_point()}
    if len(kinds) == 1:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(kinds.pop(), "fp32")
    return "fp32"


class ModelCache:
    """Module trees that name a file's layers: the meta-device models of a family, or a given base
    model (loaded once)."""

    def __init__(self, base: Any = None) -> None:
        self.base = base
        self._meta: dict[tuple[str, str], dict[str, Any]] = {}
        self._base_models: dict[str, Any] | None = None

    def meta(self, family: str, prediction_type: str) -> dict[str, Any]:
        from ..lora.formats.export import models_for

        key = (family, prediction_type)
        if key not in self._meta:
            self._meta[key] = models_for(family, prediction_type, None)
        return self._meta[key]

    def base_models(self) -> dict[str, Any]:
        if self._base_models is None:
            base = self.base
            if not hasattr(base, "unet"):
                from ..models.loading import load_base

                base = load_base(str(base))
            models = {"unet": base.unet, "text_encoder": base.text_encoder}
            if getattr(base, "text_encoder_2", None) is not None:
                models["text_encoder_2"] = base.text_encoder_2
            self._base_models = models
        return self._base_models


def read_weights(path: str | os.PathLike[str], models: ModelCache | None = None, *, allow_unknown: bool = False) -> LoadedLora:
    """Read a LoRA file (kohya or diffusers layout) into weights, without loading a base model when
    its layer shapes are those of SD 1.x / 2.x / XL (the family's module tree is built on the meta
    device); other shapes (the demo model, tiny models) are named by ``models.base``.

    Keys that fit no layer are an error unless ``allow_unknown`` (then listed in ``unknown``).
    """
    from ..lora.formats import match_to_model, read_lora_file
    from ..lora.formats.inspect import file_entries
    from ..lora.variants import method_for_file

    models = models or ModelCache()
    src = check_input_file(path)
    if src.is_dir() and (src / "config.toml").is_file():
        raise ToolError(f"{src} is a training run; give its LoRA file ({src.name}.safetensors inside it) "
                        "or export it first (sdlora export).")
    file = read_lora_file(src)
    entries = file_entries(file.tensors, file.format)[0]
    family, pred, reason = _file_family(file.metadata, entries)
    suffixes = {s for e in entries.values() for s in e["suffixes"]}

    def match(trees: Mapping[str, Any]):
        return match_to_model(file, trees["unet"], trees["text_encoder"], trees.get("text_encoder_2"))

    if family in _SHIPPED:
        try:
            weights, unknown = match(models.meta(family, pred))
        except LoraShapeMismatchError as exc:
            if models.base is None:
                raise ToolError(
                    f"{file.path.name} names {family_label(family)} layers ({reason}) but its shapes are not those of "
                    f"the full-size model; if it was made for a smaller model of that architecture, give that model "
                    f"with --base. ({str(exc).split('. ')[0]}.)"
                ) from None
            # The family's layout with other widths (a small SDXL-architecture model): the base names it.
            weights, unknown = match(models.base_models())
    else:
        if models.base is None:
            raise ToolError(
                f"{file.path}: its layer shapes fit no SD 1.x / 2.x / XL model ({reason}); give the base model it "
                "was trained on with --base (e.g. demo, or the model's folder or file)."
            )
        trees = models.base_models()
        weights, unknown = match(trees)
        if "text_encoder_2" in trees:
            family = "sdxl"
        else:
            version = file.metadata.get("ss_base_model_version", "sd_v1")
            family = "sd2" if version.startswith("sd_v2") else "sd1"
        reason = f"its layers fit the base model {getattr(models.base, 'source', models.base)}"
    if unknown and not allow_unknown:
        raise ToolError(
            f"{file.path}: {len(unknown)} key(s) match no {family_label(family)} layer (e.g. {unknown[0]}); "
            "it may be a LoRA for another model or a damaged file."
        )
    method = method_for_file(file.metadata, suffixes)
    weights.method = method.name
    return LoadedLora(
        path=file.path, weights=weights, family=family, prediction_type=pred, method=method.name,
        metadata=dict(file.metadata), dtype=_file_dtype(file.tensors), unknown=unknown, family_reason=reason,
    )


def same_family(loaded: Sequence[LoadedLora]) -> tuple[str, str]:
    """The one family (and prediction type) of several files, else :class:`ToolError` naming both."""
    first = loaded[0]
    for other in loaded[1:]:
        if other.family != first.family:
            raise ToolError(
                f"{first.path.name} is made for {family_label(first.family)} ({first.family_reason}) but "
                f"{other.path.name} for {family_label(other.family)} ({other.family_reason}); "
                "only LoRAs of one model family can be combined."
            )
    return first.family, first.prediction_type


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The kohya training facts of a source file that stay true for a file derived from it."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_") and not k.startswith("ss_network_")}


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"


__all__ = [
    "LoadedLora",
    "ModelCache",
    "Progress",
    "ToolError",
    "ToolReport",
    "check_rank",
    "parse_weighted",
    "read_weights",
    "uniform_alpha",
]
