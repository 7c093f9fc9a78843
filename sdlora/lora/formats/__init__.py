"""LoRA files: kohya/A1111 and diffusers/PEFT ``.safetensors``, written atomically, read back.

Public API::

    save_lora(weights_or_adapter, path, format="kohya", metadata=..., family=..., resolution=..., dtype=...)
    read_lora_file(path) -> LoraFile
    match_to_model(lora_file, unet, text_encoder, text_encoder_2=None) -> (LoraWeights, unknown_keys)
    load_lora(path, unet, text_encoder, adapter_name=None, text_encoder_2=None) -> (LoraAdapter, LoadReport)
    convert_lora_file(src, dst, to=..., unet=..., text_encoder=..., text_encoder_2=...)
    export_from(lora_file, fmt=..., out=..., rank=...) -> Path
    inspect_file(path) -> dict ; format_inspection(info) -> str

``family`` ("sd1", "sd2", "sdxl") decides the kohya names and metadata; SDXL weights carry a second
text encoder (``text_encoder_2``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from ..errors import LoraFileError, LoraShapeMismatchError
from ..inject import LoraAdapter, apply_weights, safe_adapter_name
from ..targets import COMPONENTS, Component, base_layer, describe_layer, iter_adaptable, model_path
from ..weights import LoraWeights, ModuleLora
from . import diffusers_format, kohya, lycoris
from .inspect import detect_format, file_entries, format_inspection, guess_family, inspect_file
from .io import DIFFUSERS_WEIGHT_NAME, atomic_save, read_metadata, read_safetensors, resolve_lora_path

Format = Literal["kohya", "diffusers"]
FORMATS: tuple[Format, ...] = ("kohya", "diffusers")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class UnknownKeysWarning(UserWarning):
    """A LoRA file has keys that match no layer of the loaded base model (they were not applied)."""


@dataclass
class LoraFile:
    """A LoRA file read into memory (not yet matched to a model)."""

    path: Path
    format: Format
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@dataclass
class LoadReport:
    """What :func:`load_lora` applied: module counts and every key it could not place."""

    path: str
    format: str
    adapter_name: str
    modules: dict[str, int] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    base_family_guess: str = "unknown"

    def summary(self) -> str:
        counts = ", ".join(f"{n} {c.replace('_', ' ')} layers" for c, n in self.modules.items())
        text = f"{Path(self.path).name}: {self.format} LoRA, {counts}"
        if self.unknown_keys:
            text += f"; {len(self.unknown_keys)} key(s) matched no layer and were NOT applied, e.g. {self.unknown_keys[0]}"
        return text


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise LoraFileError(f"Unknown save dtype {dtype!r}; use one of fp32, fp16, bf16.") from None


# Writing -----------------------------------------------------------------------------------------

def save_lora(
    source: LoraWeights | LoraAdapter,
    path: str | os.PathLike[str],
    *,
    format: Format = "kohya",
    metadata: Mapping[str, Any] | None = None,
    family: str = "sd1",
    prediction_type: str = "epsilon",
    title: str | None = None,
    dtype: str | torch.dtype = "fp16",
    resolution: int | tuple[int, int] | str | None = None,
) -> Path:
    """Write a LoRA file atomically and return its path.

    ``format="kohya"``: the A1111/ComfyUI/kohya layout with ``ss_*``/``modelspec.*`` metadata
    (``metadata`` adds or overrides entries: training facts only the caller knows).
    ``format="diffusers"``: the layout ``pipeline.load_lora_weights`` reads; a folder ``path``
    gets ``pytorch_lora_weights.safetensors`` inside it.
    ``family``/``prediction_type`` describe the base model ("sd1"/"sd2"/"sdxl",
    "epsilon"/"v_prediction"); the family decides the kohya names (SDXL: original-layout UNet
    names, ``lora_te1_``/``lora_te2_``). ``resolution`` is the training resolution written to
    ``modelspec.resolution`` (default: ``metadata``'s ``ss_resolution``, else the family's size).
    """
    weights = source.export() if isinstance(source, LoraAdapter) else source
    if not len(weights):
        raise LoraFileError("Nothing to save: the adapter has no layers.")
    if family not in kohya.FAMILIES:
        raise LoraFileError(f"Unknown model family {family!r}; use one of {', '.join(kohya.FAMILIES)}.")
    if weights.text_encoder_2 and family != "sdxl":
        raise LoraFileError(
            f"These weights adapt a second text encoder (text_encoder_2), which only SDXL has; save them with "
            f"family='sdxl' (got {family!r})."
        )
    torch_dtype = _dtype(dtype)
    target = Path(path).expanduser()
    if format == "kohya":
        if target.suffix.lower() != ".safetensors":
            raise LoraFileError(f"kohya LoRA files end in .safetensors; got {target}.")
        tensors = kohya.to_state_dict(weights, torch_dtype, family)
        meta = kohya.build_metadata(
            weights, tensors, family=family, prediction_type=prediction_type,
            title=title or target.stem, extra=metadata, resolution=resolution,
        )
    elif format == "diffusers":
        lyco = sorted(weights.kinds() & set(lycoris.TITLES))
        if lyco:
            titles = "/".join(lycoris.TITLES[k] for k in lyco)
            raise LoraFileError(
                f"{titles} weights cannot be written in the diffusers/PEFT layout: diffusers loads only LoRA "
                f"factors. Use the kohya/LyCORIS file (A1111/Forge and ComfyUI load it natively), or export with "
                "--rank R for a plain-LoRA approximation (SVD, error recorded) that diffusers loads."
            )
        if any(m.dora_scale is not None for _, _, m in weights.items()):
            raise LoraFileError(
                "DoRA weights cannot be written in the diffusers/PEFT layout: PEFT keeps one magnitude per output "
                "channel, these have one per input channel (the A1111/ComfyUI dora_scale). Save them as kohya."
            )
        if target.is_dir() or target.suffix == "":
            target = target / DIFFUSERS_WEIGHT_NAME
        tensors = diffusers_format.to_state_dict(weights, torch_dtype)
        meta = diffusers_format.build_metadata(weights, extra=metadata)
    else:
        raise LoraFileError(f"Unknown LoRA file format {format!r}; use one of {', '.join(FORMATS)}.")
    return atomic_save(tensors, target, meta)


# Reading -----------------------------------------------------------------------------------------

def read_lora_file(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA file; :class:`LoraFileError` if missing, unreadable or not a LoRA layout."""
    file = resolve_lora_path(path)
    tensors, metadata = read_safetensors(file)
    fmt = detect_format(list(tensors))
    if fmt == "unknown":
        sample = ", ".join(sorted(tensors)[:3])
        raise LoraFileError(
            f"{file} is a safetensors file but not a LoRA this tool reads (keys such as {sample}); "
            "expected kohya names (lora_unet_..., lora_te_...) or diffusers/PEFT names (...lora_A.weight)."
        )
    return LoraFile(file, fmt, tensors, metadata)  # type: ignore[arg-type]


def _layer_text(kind: str, fan_in: int, fan_out: int, kernel: tuple[int, int]) -> str:
    if kind == "conv":
        return f"Conv2d {fan_in}->{fan_out}, {kernel[0]}x{kernel[1]}"
    return f"Linear {fan_in}->{fan_out}"


def _expected(role: str, kind: str, fan_in: int, fan_out: int, kernel: tuple[int, int], rank: int) -> list[tuple[int, ...]]:
    """Shapes a tensor may have for a layer, the layer's own form first.

    Linear layers and 1x1 convs also accept each other's form (same numbers, other layout).
    """
    if role == "down":
        if kind == "linear":
            return [(rank, fan_in), (rank, fan_in, 1, 1)]
        return [(rank, fan_in, *kernel)] + ([(rank, fan_in)] if kernel == (1, 1) else [])
    if kind == "linear":
        return [(fan_out, rank), (fan_out, rank, 1, 1)]
    return [(fan_out, rank, 1, 1), (fan_out, rank)]


def _base_label(unet: nn.Module | None, text_encoder: nn.Module | None = None) -> str:
    cross = None
    if unet is not None and hasattr(unet, "config"):
        cross = unet.config.get("cross_attention_dim") if isinstance(unet.config, dict) else None
    widths = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    if isinstance(cross, int) and cross in widths:
        return f"{widths[cross]} (cross-attention width {cross})"
    return f"this base (cross-attention width {cross})" if cross else "this base"


def _mismatch(
    file: LoraFile, key: str, shape: tuple[int, ...], label: str, layer_text: str,
    expected: list[tuple[int, ...]], unet: nn.Module | None, text_encoder: nn.Module | None,
    what: str | None = None,
) -> LoraShapeMismatchError:
    entries, _ = file_entries(file.tensors, file.format)
    family, reason = guess_family(entries, file.metadata)
    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "another base model"}
    needs = "has a weight of shape" if what else "needs"
    return LoraShapeMismatchError(
        f"{file.path}: {what or f'key {key!r} has shape {list(shape)}'}, but layer '{label}' of the loaded base model "
        f"({layer_text}) {needs} {' or '.join(str(list(s)) for s in expected)}. This LoRA looks made for "
        f"{names[family]} ({reason}); the loaded base is {_base_label(unet, text_encoder)}. "
        "Load it with a base model of the same family."
    )


def _layer(models: dict[Component, nn.Module | None], component: Component, canonical: str):
    model = models[component]
    assert model is not None
    layer = base_layer(model.get_submodule(model_path(model, component, canonical)))
    return describe_layer(layer)


def _dora_scale(
    file: LoraFile, entry: tuple[str, torch.Tensor], label: str, layer_text: str, kind: str, fan_in: int,
    fan_out: int, kernel: tuple[int, int], unet: nn.Module | None, text_encoder: nn.Module | None,
) -> torch.Tensor:
    """A kohya ``dora_scale`` in the A1111/ComfyUI layout: one magnitude per input channel.

    Linear ``[1, in]``, Conv2d ``[1, in, 1, 1]`` (a 1x1 conv or Linear also in the other's form).
    Per-output magnitudes (``[out, 1]``, LyCORIS ``wd_on_output=True``) are refused: A1111 and
    ComfyUI read them differently from each other, so no result can match both.
    """
    key, tensor = entry
    own = (1, fan_in) if kind == "linear" else (1, fan_in, 1, 1)
    accepted = [own] + ([(1, fan_in, 1, 1) if kind == "linear" else (1, fan_in)] if kernel == (1, 1) else [])
    shape = tuple(tensor.shape)
    if shape in accepted:
        return tensor.float().reshape(own)
    if shape in ((fan_out, 1), (fan_out, 1, 1, 1), (fan_out,)):
        raise LoraFileError(
            f"{file.path}: '{key}' holds DoRA magnitudes per output channel (shape {list(shape)}, LyCORIS "
            "wd_on_output=True). Only the per-input-channel layout A1111 and ComfyUI apply (dora_scale "
            f"{list(own)} for layer '{label}') is supported."
        )
    raise _mismatch(file, key, shape, label, layer_text, accepted, unet, text_encoder)


def _match_lycoris(
    file: LoraFile, weights: LoraWeights, unknown: list[str], models: dict[Component, nn.Module | None],
    component: Component, canonical: str, parts: dict[str, tuple[str, torch.Tensor]], kinds: set,
    unet: nn.Module | None, text_encoder: nn.Module | None,
) -> None:
    """Place one LoHa / LoKr module of a kohya-named file (see ``formats/lycoris.py``)."""
    first_key = min(k for k, _ in parts.values())
    if len(kinds) > 1 or "down" in parts or "up" in parts:
        raise LoraFileError(f"{file.path}: module of key '{first_key}' mixes LoRA, LoHa and LoKr tensors.")
    kind = next(iter(kinds))
    if "dora_scale" in parts:
        raise LoraFileError(
            f"{file.path}: {lycoris.TITLES[kind]} module of key '{first_key}' has a dora_scale (LyCORIS dora_wd); "
            f"{lycoris.TITLES[kind]} with DoRA is not supported here."
        )
    described = _layer(models, component, canonical)
    if described is None:
        unknown.extend(k for k, _ in parts.values())
        return
    kind_name, fan_in, fan_out, kernel = described
    weight_shape = (fan_out, fan_in) if kind_name == "linear" else (fan_out, fan_in, *kernel)
    label = f"{component}.{canonical}"
    text = _layer_text(kind_name, fan_in, fan_out, kernel)
    alpha = None
    if "alpha" in parts:
        try:
            alpha = kohya.to_float(parts["alpha"][1])
        except ValueError as exc:
            raise LoraFileError(f"{file.path}: '{parts['alpha'][0]}' is not a usable alpha ({exc}).") from None
    name = first_key.partition(".")[0]

    def mismatch(what: str, suffix: str) -> Exception:
        key = f"{name}.{suffix}"
        return _mismatch(file, key, tuple(parts[suffix][1].shape), label, text, [weight_shape], unet, text_encoder,
                         what=f"{lycoris.TITLES[kind]} module '{name}' has {what}")

    tensors = {role: t for role, (_, t) in parts.items() if role != "alpha"}
    weights.component(component)[canonical] = lycoris.build_module(kind, tensors, alpha, weight_shape, mismatch, name)


def match_to_model(
    file: LoraFile, unet: nn.Module | None, text_encoder: nn.Module | None,
    text_encoder_2: nn.Module | None = None,
) -> tuple[LoraWeights, list[str]]:
    """Place every module of ``file`` on a layer of the given models and check its shapes.

    ``text_encoder_2`` is SDXL's second text encoder (``lora_te2_…`` / ``text_encoder_2.…`` keys);
    without it those keys are unknown.

    Returns the weights and the keys that match no layer (``unknown`` keys: reported by callers,
    never applied). Raises :class:`LoraShapeMismatchError` naming the first key (in key order) whose
    shape does not fit, and :class:`LoraFileError` for modules of methods that cannot be applied
    (OFT, GLoRA, ...), incomplete modules, or a file with no matching key at all. LoHa / LoKr modules
    (LyCORIS layout) become ``ModuleLoha`` / ``ModuleLokr``.
    """
    models: dict[Component, nn.Module | None] = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    # Group tensors by module: {(component, canonical): {role: (key, tensor)}}
    grouped: dict[tuple[Component, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    if file.format == "kohya":
        index = kohya.name_index(unet, text_encoder, text_encoder_2)
        for key in sorted(file.tensors):
            if key.startswith("bundle_emb."):  # embeddings bundled with the LoRA (see formats/embedding.py)
                continue
            name, suffix = kohya.split_key(key)
            other = kohya.other_method(suffix)
            if other and lycoris.kind_of(suffix) is None:
                raise LoraFileError(
                    f"{file.path} is a {other} file (key '{key}'); only LoRA / LoCon (lora_down/lora_up), LoHa and "
                    "LoKr files can be applied. `sdlora inspect` shows what it holds."
                )
            target = index.get(name)
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                    "dora_scale": "dora_scale"}.get(suffix) or (suffix if lycoris.kind_of(suffix) else None)
            if target is None or role is None:
                unknown.append(key)
                continue
            grouped.setdefault(target, {})[role] = (key, file.tensors[key])
    else:
        available = {
            comp: {c for _, c, _ in iter_adaptable(m, comp)}
            for comp, m in models.items() if m is not None
        }
        for key in sorted(file.tensors):
            split = diffusers_format.split_key(key)
            if split is None or split[0] is None or split[1] not in available.get(split[0], set()):
                unknown.append(key)
                continue
            component, canonical, role = split
            grouped.setdefault((component, canonical), {})[role] = (key, file.tensors[key])

    info: dict[str, Any] = {"source": str(file.path)}
    layout = kohya.unet_layout(unet)
    if layout is not None:
        info["unet_layout"] = layout
    weights = LoraWeights(method="lora", info=info)
    diffusers_ranks: dict[Component, dict[str, int]] = {c: {} for c in COMPONENTS}
    for (component, canonical), parts in sorted(grouped.items(), key=lambda kv: min(k for k, _ in kv[1].values())):
        if "dora_scale" in parts and file.format != "kohya":
            raise LoraFileError(
                f"{file.path} is a diffusers/PEFT DoRA file (key '{parts['dora_scale'][0]}'): its magnitudes are per "
                "output channel, which this tool does not apply. DoRA files in the kohya/A1111 layout (dora_scale "
                "[1, in]) are supported."
            )
        lyco = {lycoris.kind_of(role) for role in parts} - {None}
        if lyco:
            _match_lycoris(file, weights, unknown, models, component, canonical, parts, lyco, unet, text_encoder)
            continue
        if "down" not in parts or "up" not in parts:
            have = next(iter(parts.values()))[0]
            raise LoraFileError(f"{file.path}: module of key '{have}' lacks its lora_down or lora_up tensor.")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        described = _layer(models, component, canonical)
        if described is None:
            unknown.extend(k for k, _ in parts.values())
            continue
        kind, fan_in, fan_out, kernel = described
        rank = int(down.shape[0]) if down.ndim >= 2 else -1
        label = f"{component}.{canonical}"
        text = _layer_text(kind, fan_in, fan_out, kernel)
        for role, key, tensor in (("down", down_key, down), ("up", up_key, up)):
            expected = _expected(role, kind, fan_in, fan_out, kernel, rank)
            if tuple(tensor.shape) not in expected:
                raise _mismatch(file, key, tuple(tensor.shape), label, text, expected, unet, text_encoder)
        if "alpha" in parts:
            try:
                alpha = kohya.to_float(parts["alpha"][1])
            except ValueError as exc:
                raise LoraFileError(f"{file.path}: '{parts['alpha'][0]}' is not a usable alpha ({exc}).") from None
        else:
            alpha = float("nan")  # filled below (diffusers metadata, or alpha = rank)
            diffusers_ranks[component][canonical] = rank
        down = down.float().reshape(_expected("down", kind, fan_in, fan_out, kernel, rank)[0])
        up = up.float().reshape(_expected("up", kind, fan_in, fan_out, kernel, rank)[0])
        dora_scale = None
        if "dora_scale" in parts:
            dora_scale = _dora_scale(file, parts["dora_scale"], label, text, kind, fan_in, fan_out, kernel, unet, text_encoder)
        weights.component(component)[canonical] = ModuleLora(down=down, up=up, alpha=alpha, dora_scale=dora_scale)

    for component, ranks in diffusers_ranks.items():
        if not ranks:
            continue
        if file.format == "diffusers":
            alphas = diffusers_format.alphas_from_metadata(file.metadata, component, ranks)
        else:
            alphas = {p: float(r) for p, r in ranks.items()}  # kohya: no alpha means alpha = rank
        for path, alpha in alphas.items():
            weights.component(component)[path].alpha = alpha

    kinds = weights.kinds()
    if len(kinds) == 1 and kinds <= set(lycoris.TITLES):
        weights.method = next(iter(kinds))  # a LoHa / LoKr file: its modules decide the method
    if not len(weights):
        sample = unknown[0] if unknown else "none"
        raise LoraFileError(
            f"{file.path}: none of its {len(file.tensors)} keys matches a layer of the loaded base model "
            f"(e.g. '{sample}'); it is a LoRA for another kind of model."
        )
    return weights, unknown


def load_lora(
    path: str | os.PathLike[str],
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    adapter_name: str | None = None,
    *,
    strict: bool = False,
    taken_names: set[str] | None = None,
    text_encoder_2: nn.Module | None = None,
) -> tuple[LoraAdapter, LoadReport]:
    """Read a LoRA file (any supported layout) and add it to the models as a new adapter.

    ``text_encoder_2`` is SDXL's second text encoder. Keys matching no layer are listed in the
    report and raised as :class:`UnknownKeysWarning` (an error with ``strict=True``). The adapter
    starts active at scale 1.
    """
    file = read_lora_file(path)
    weights, unknown = match_to_model(file, unet, text_encoder, text_encoder_2)
    if unknown and strict:
        raise LoraFileError(
            f"{file.path}: {len(unknown)} key(s) match no layer of the loaded base model, e.g. {unknown[:3]}."
        )
    name = adapter_name or safe_adapter_name(file.path.stem, taken_names)
    if len(weights.kinds()) > 1:
        raise LoraFileError(
            f"{file.path} mixes module kinds ({', '.join(sorted(weights.kinds()))}: e.g. LoRA and LoHa modules); "
            "such files are not applied here."
        )
    dora = [m.dora_scale is not None for _, _, m in weights.items()]
    if any(dora) and not all(dora):
        raise LoraFileError(
            f"{file.path} mixes DoRA modules (with dora_scale) and plain LoRA modules; such files are not applied here."
        )
    adapter = apply_weights(unet, text_encoder, weights, name, text_encoder_2=text_encoder_2)
    if any(dora):
        from ..variants.dora import apply_dora_scales

        apply_dora_scales(adapter, weights)
    entries, _ = file_entries(file.tensors, file.format)
    report = LoadReport(
        path=str(file.path),
        format=file.format,
        adapter_name=name,
        modules=weights.counts(),
        unknown_keys=unknown,
        base_family_guess=guess_family(entries, file.metadata)[0],
    )
    if unknown:
        warnings.warn(report.summary(), UnknownKeysWarning, stacklevel=2)
    return adapter, report


def convert_lora_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Format,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    metadata: Mapping[str, Any] | None = None,
    family: str = "sd1",
    prediction_type: str = "epsilon",
    dtype: str | torch.dtype = "fp16",
    text_encoder_2: nn.Module | None = None,
) -> tuple[Path, list[str]]:
    """Rewrite a LoRA file in another layout (names resolved against the given base model).

    Returns the written path and the source keys that matched no layer (not written).
    """
    file = read_lora_file(src)
    weights, unknown = match_to_model(file, unet, text_encoder, text_encoder_2)
    method = file.metadata.get("sdlora_method")
    if method:
        weights.method = method
    carried = {k: v for k, v in file.metadata.items() if to == "kohya" and (k.startswith("ss_") and k not in (
        "ss_network_dim", "ss_network_alpha", "ss_network_args"))}
    carried.update(dict(metadata or {}))
    out = save_lora(weights, dst, format=to, metadata=carried, family=family,
                    prediction_type=prediction_type, dtype=dtype)
    return out, unknown


from .export import export_from, meta_models, weights_from_checkpoint  # noqa: E402  (uses the names above)

__all__ = [
    "FORMATS",
    "export_from",
    "format_inspection",
    "meta_models",
    "weights_from_checkpoint",
    "LoadReport",
    "LoraFile",
    "UnknownKeysWarning",
    "convert_lora_file",
    "detect_format",
    "inspect_file",
    "load_lora",
    "match_to_model",
    "read_lora_file",
    "read_metadata",
    "save_lora",
]
