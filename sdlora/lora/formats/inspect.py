"""``inspect_file``: what a LoRA file holds, without loading a model."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch

from . import diffusers_format, kohya, lycoris
from .io import read_safetensors, resolve_lora_path

#: network modules of files no registered method claims (methods name their own: ``describe`` hooks)
_NETWORK_MODULES = {
    "networks.lora": "LoRA",
    "networks.oft": "OFT",
    "lycoris.kohya": "LyCORIS",
}
#: LyCORIS ``algo`` values of files no registered method claims
_LYCORIS_ALGOS = {"lora": "LoCon", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}


#: the parts of a LoRA file, in report order
_PARTS = ("unet", "text_encoder", "text_encoder_2")


def _block_key(name: str) -> tuple[int, list[Any]]:
    """Report order of block labels: UNet first, then the text encoders; numbers by value."""
    part = name.split(".", 1)[0]
    return (_PARTS.index(part) if part in _PARTS else len(_PARTS), _natural(name))


def detect_format(keys: list[str]) -> str:
    """"kohya" (``lora_unet_``/``lora_te*_`` names), "diffusers" (PEFT/diffusers names) or "unknown"."""
    if any(kohya.is_kohya_key(k) for k in keys):
        return "kohya"
    if any(diffusers_format.is_diffusers_key(k) for k in keys):
        return "diffusers"
    return "unknown"


def _kohya_component(name: str) -> str | None:
    if name.startswith("lora_unet_"):
        return "unet"
    if name.startswith("lora_te2_"):
        return "text_encoder_2"
    if name.startswith(("lora_te_", "lora_te1_")):
        return "text_encoder"
    return None


def _block_of(component: str, path: str) -> str:
    """A coarse block label: ``unet.down_blocks.0``, ``unet.input_blocks.4``, ``text_encoder.layers.3``."""
    flat = path.replace(".", "_")
    if component == "unet":
        for pattern in (r"(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)", r"(mid_block|middle_block)"):
            match = re.search(pattern, flat)
            if match:
                return "unet." + ".".join(g for g in match.groups() if g is not None)
        return "unet.other"
    match = re.search(r"layers_(\d+)", flat)
    return f"{component}.layers.{match.group(1)}" if match else f"{component}.other"


def _natural(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value (layers 2 before 10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def guess_family(entries: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str]) -> tuple[str, str]:
    """("sd1" | "sd2" | "sdxl" | "unknown", reason) from module names, shapes and metadata.

    A second text encoder means SDXL; else the UNet's cross-attention input width decides (768
    SD 1.x, 1024 SD 2.x, 2048 SDXL); without UNet modules, the text encoder's width (1280: SDXL's
    OpenCLIP bigG); last, the metadata.
    """
    components = {e["component"] for e in entries.values()}
    cross = Counter()
    te_width = Counter()
    te2_width = Counter()
    for name, entry in entries.items():
        down = entry.get("down_shape")
        fan_in = down[1] if down and len(down) >= 2 else entry.get("fan_in")  # LoHa / LoKr: from their factors
        if not fan_in:
            continue
        flat = name.replace(".", "_")
        if entry["component"] == "unet" and re.search(r"attn2_to_[kv]$", flat):
            cross[fan_in] += 1
        if entry["component"] == "text_encoder" and flat.endswith("q_proj"):
            te_width[fan_in] += 1
        if entry["component"] == "text_encoder_2" and flat.endswith("q_proj"):
            te2_width[fan_in] += 1
    widths = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    if "text_encoder_2" in components:
        width = f", width {te2_width.most_common(1)[0][0]}" if te2_width else ""
        return "sdxl", f"it has a second text encoder (lora_te2_ / text_encoder_2{width})"
    if cross:
        dim = cross.most_common(1)[0][0]
        if dim in widths:
            return widths[dim], f"UNet cross-attention input width is {dim}"
        return "unknown", f"UNet cross-attention input width is {dim}, not that of SD 1.x, 2.x or XL"
    if te_width:
        dim = te_width.most_common(1)[0][0]
        if dim in (768, 1024):
            return widths[dim], f"text-encoder width is {dim}"
        if dim == 1280:
            return "sdxl", "text-encoder width is 1280 (SDXL's OpenCLIP bigG)"
        return "unknown", f"text-encoder width is {dim}, not that of SD 1.x, 2.x or XL"
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or "-xl-" in arch:
        return "sdxl", f"metadata says {version or arch}"
    if version.startswith("sd_v2") or "-v2-" in arch:
        return "sd2", f"metadata says {version or arch}"
    if version.startswith("sd_v1") or "-v1" in arch:
        return "sd1", f"metadata says {version or arch}"
    return "unknown", "no UNet cross-attention or text-encoder layer to measure"


def file_entries(tensors: Mapping[str, torch.Tensor], fmt: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per-module summary {name: component, block, down/up shapes, rank, alpha, kind, suffixes}.

    Returns the entries and the keys that belong to no recognised module.
    """
    entries: dict[str, dict[str, Any]] = {}
    stray: list[str] = []
    for key in sorted(tensors):
        tensor = tensors[key]
        if fmt == "kohya":
            name, suffix = kohya.split_key(key)
            component = _kohya_component(name)
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}.get(suffix, suffix)
            path = name
        else:
            split = diffusers_format.split_key(key)
            if split is None or split[0] is None:
                stray.append(key)
                continue
            component, path, role = split
            name = f"{component}.{path}"
        if component is None:
            stray.append(key)
            continue
        entry = entries.setdefault(name, {"component": component, "block": _block_of(component, path), "suffixes": []})
        entry["suffixes"].append(role)
        if role == "down":
            entry["down_shape"] = list(tensor.shape)
            entry["rank"] = int(tensor.shape[0])
            entry["kind"] = "conv2d" if tensor.ndim == 4 else "linear"
            entry["kernel"] = list(tensor.shape[2:]) if tensor.ndim == 4 else None
            entry["dtype"] = str(tensor.dtype).replace("torch.", "")
        elif role == "up":
            entry["up_shape"] = list(tensor.shape)
        elif role == "alpha":
            entry["alpha"] = float(tensor.float().item()) if tensor.numel() == 1 else None
        elif lycoris.kind_of(role):
            entry.setdefault("lycoris", {})[role] = list(tensor.shape)
            entry.setdefault("dtype", str(tensor.dtype).replace("torch.", ""))
        elif kohya.other_method(role) and tensor.ndim >= 2:
            entry.setdefault("kind", "conv2d" if tensor.ndim == 4 else "linear")
    for name, entry in entries.items():
        shapes = entry.pop("lycoris", None)
        if shapes:
            _lycoris_entry(name, entry, shapes)
    return entries, stray


#: module names of k x k / 1 x 1 Conv2d layers (diffusers and original UNet names), for LoHa / LoKr
#: modules whose factors are flattened matrices (the shapes alone do not tell a conv from a Linear)
_CONV3_NAME = re.compile(r"(_conv1|_conv2|samplers_\d+_conv|_in_layers_2|_out_layers_3|_\d+_op|_\d+_conv)$")
_CONV1_NAME = re.compile(r"(_conv_shortcut|_skip_connection)$")


def _lycoris_entry(name: str, entry: dict[str, Any], shapes: Mapping[str, list[int]]) -> None:
    """Rank, layer kind and input width of a LoHa / LoKr module (from its shapes and, for flattened
    conv factors, its name), so that inspect and the family guess treat it like a LoRA module."""
    kind = lycoris.kind_of(next(iter(shapes)))
    info = lycoris.entry_info(kind, shapes)  # type: ignore[arg-type]
    if "rank" in info:
        entry["rank"] = info["rank"]
    flat = name.replace(".", "_")
    if "kind" in info:
        entry["kind"], entry["kernel"], entry["fan_in"] = info["kind"], info["kernel"], info["fan_in"]
    elif _CONV3_NAME.search(flat) or _CONV1_NAME.search(flat):
        kernel = [3, 3] if _CONV3_NAME.search(flat) else [1, 1]
        entry["kind"], entry["kernel"] = "conv2d", kernel
        entry["fan_in"] = info["flat_in"] // (kernel[0] * kernel[1])
    else:
        entry["kind"], entry["kernel"], entry["fan_in"] = "linear", None, info.get("flat_in")


def _network_type(entries: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str]) -> str:
    from ..variants import describe_file

    suffixes = {s for e in entries.values() for s in e["suffixes"]}
    for suffix in sorted(suffixes):
        label = kohya.other_method(suffix)
        if label:
            return label
    claimed = describe_file(metadata, suffixes)  # a registered method's own file (DoRA, DyLoRA, ...)
    if claimed:
        return claimed
    module = metadata.get("ss_network_module", "")
    args = kohya.parse_network_args(metadata)
    if module == "lycoris.kohya" and args.get("algo"):
        return _LYCORIS_ALGOS.get(str(args["algo"]).lower(), f"LyCORIS {args['algo']}")
    has_conv3 = any(e.get("kind") == "conv2d" and e.get("kernel") not in (None, [1, 1]) for e in entries.values())
    base = _NETWORK_MODULES.get(module, "LoRA")
    if base == "LoRA" and has_conv3:
        return "LoCon (LoRA with Conv2d 3x3)"
    return base


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of a LoRA file for ``sdlora inspect``; raises ``LoraFileError`` for unreadable files.

    Keys: ``path``, ``file_size``, ``format``, ``method`` (sdlora method name, or the file's network
    type in lower case), ``network_type``, ``network_module``, ``network_args``, ``base_family``,
    ``base_family_reason``, ``modules`` (per component), ``layers`` (linear / conv2d /
    conv2d_3x3 counts), ``rank``/``alpha`` (most common) and ``ranks``/``alphas`` (all values),
    ``blocks`` (per block: modules, ranks, alphas), ``dtypes``, ``num_tensors``, ``stray_keys``
    (keys of no LoRA module), ``metadata`` (all header entries, JSON ones decoded), and for LoHa /
    LoKr files ``loaders`` (which tools load it) and ``diffusers_loads`` (False; None otherwise).
    """
    from .embedding import split_bundled

    file = resolve_lora_path(path)
    tensors, metadata = read_safetensors(file)
    bundled = split_bundled(tensors)  # textual-inversion embeddings bundled with the LoRA (bundle_emb.<name>.*)
    all_tensors = len(tensors)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    fmt = detect_format(list(tensors))
    entries, stray = file_entries(tensors, fmt) if fmt != "unknown" else ({}, sorted(tensors))
    if fmt == "diffusers":
        for component in ("unet", "text_encoder", "text_encoder_2"):
            ranks = {n.split(".", 1)[1]: e["rank"] for n, e in entries.items() if e["component"] == component and "rank" in e}
            for sub, alpha in diffusers_format.alphas_from_metadata(metadata, component, ranks).items():  # type: ignore[arg-type]
                entries[f"{component}.{sub}"].setdefault("alpha", alpha)
    for entry in entries.values():
        if "rank" in entry and entry.get("alpha") is None:
            entry["alpha"] = float(entry["rank"])
        if "rank" not in entry and entry.get("alpha") is not None and "fan_in" in entry:
            entry.pop("alpha")  # a LoKr module of two full matrices: no rank, its alpha is not applied

    family, reason = guess_family(entries, metadata)
    blocks: dict[str, dict[str, Any]] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set()})
    for entry in entries.values():
        block = blocks[entry["block"]]
        block["modules"] += 1
        if "rank" in entry:
            block["ranks"].add(entry["rank"])
            block["alphas"].add(entry["alpha"])
    layers = Counter()
    for entry in entries.values():
        kind = entry.get("kind", "unknown")
        layers[kind] += 1
        if kind == "conv2d" and entry.get("kernel") not in (None, [1, 1]):
            layers["conv2d_3x3"] += 1
    ranks = [e["rank"] for e in entries.values() if "rank" in e]
    alphas = [e["alpha"] for e in entries.values() if "alpha" in e]
    network_type = _network_type(entries, metadata)
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        if value[:1] in "{[":
            try:
                decoded[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        decoded[key] = value
    method = metadata.get("sdlora_method") or re.sub(r"[^a-z0-9]+", "-", network_type.lower().split(" (")[0]).strip("-")
    lyco = network_type in lycoris.TITLES.values()
    return {
        "loaders": lycoris.LOADERS if lyco else None,
        "diffusers_loads": False if lyco else None,
        "path": str(file),
        "file_size": Path(file).stat().st_size,
        "format": fmt,
        "method": method,
        "network_type": network_type,
        "network_module": metadata.get("ss_network_module"),
        "network_args": kohya.parse_network_args(metadata),
        "base_family": family,
        "base_family_reason": reason,
        "modules": {c: n for c in _PARTS if (n := sum(1 for e in entries.values() if e["component"] == c))},
        "layers": {"linear": layers.get("linear", 0), "conv2d": layers.get("conv2d", 0), "conv2d_3x3": layers.get("conv2d_3x3", 0)},
        "rank": Counter(ranks).most_common(1)[0][0] if ranks else None,
        "alpha": Counter(alphas).most_common(1)[0][0] if alphas else None,
        "ranks": sorted(set(ranks)),
        "alphas": sorted(set(alphas)),
        "blocks": {
            name: {"modules": b["modules"], "ranks": sorted(b["ranks"]), "alphas": sorted(b["alphas"])}
            for name, b in sorted(blocks.items(), key=lambda kv: _block_key(kv[0]))
        },
        "dtypes": sorted({e["dtype"] for e in entries.values() if "dtype" in e}),
        "num_tensors": all_tensors,
        "stray_keys": stray,
        "embeddings": {name: {part: list(t.shape) for part, t in sorted(parts.items())}
                       for name, parts in sorted(bundled.items())},
        "metadata": decoded,
    }


def format_inspection(info: Mapping[str, Any]) -> str:
    """A human-readable report of :func:`inspect_file`'s result (for ``sdlora inspect``)."""
    families = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown"}
    lines = [
        f"file:         {info['path']} ({info['file_size'] / 1e6:.2f} MB, {info['num_tensors']} tensors, {', '.join(info['dtypes']) or '-'})",
        f"format:       {info['format']}",
        f"network:      {info['network_type']}" + (f" ({info['network_module']})" if info.get("network_module") else ""),
        f"method:       {info['method']}",
        f"base model:   {families.get(info['base_family'], info['base_family'])} ({info['base_family_reason']})",
        "modules:      " + ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in info["modules"].items()),
        f"layers:       {info['layers']['linear']} Linear, {info['layers']['conv2d']} Conv2d "
        f"({info['layers']['conv2d_3x3']} with 3x3 kernels)",
        f"rank / alpha: {info['rank']} / {info['alpha']:g}" if info.get("alpha") is not None else f"rank:         {info['rank']}",
    ]
    if len(info.get("ranks", [])) > 1 or len(info.get("alphas", [])) > 1:
        lines.append(f"              all ranks {info['ranks']}, all alphas {[float(f'{a:g}') for a in info['alphas']]}")
    if info.get("network_args"):
        lines.append(f"network args: {json.dumps(info['network_args'])}")
    if info.get("loaders"):
        lines.append(f"loads in:     {info['loaders']}")
    for name, parts in (info.get("embeddings") or {}).items():
        shapes = ", ".join(f"{part} {'x'.join(map(str, shape))}" for part, shape in parts.items())
        vectors = next(iter(parts.values()))[0] if parts else 0
        lines.append(f"embedding:    {name} ({vectors} vector(s): {shapes}; bundled, A1111/Forge load it with the LoRA)")
    lines.append("blocks:")
    for name, block in info["blocks"].items():
        ranks = ",".join(str(r) for r in block["ranks"])
        alphas = ",".join(f"{a:g}" for a in block["alphas"])
        lines.append(f"  {name:28s} {block['modules']:4d} modules  rank {ranks:8s} alpha {alphas}")
    if info.get("stray_keys"):
        lines.append(f"keys of no LoRA module ({len(info['stray_keys'])}): {', '.join(info['stray_keys'][:5])}")
    meta = info.get("metadata") or {}
    shown = [k for k in sorted(meta) if k.startswith(("ss_", "modelspec.", "sdlora_")) and k != "ss_tag_frequency"]
    if shown:
        lines.append("metadata:")
        for key in shown:
            value = meta[key]
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"  {key:34s} {text if len(text) <= 100 else text[:97] + '...'}")
    if "ss_tag_frequency" in meta:
        lines.append("  ss_tag_frequency                   (present; see --json)")
    return "\n".join(lines)
