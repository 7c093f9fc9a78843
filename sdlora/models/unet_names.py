"""The one mapping between diffusers UNet names and the original (LDM / SGM) UNet names.

Original Stable Diffusion code (CompVis ``ldm`` for SD 1.x/2.x, Stability's ``sgm`` for SDXL), and
the tools built on it (single-file checkpoints, kohya sd-scripts, A1111, ComfyUI), number the UNet's
parts as ``input_blocks.N.M`` / ``middle_block.M`` / ``output_blocks.N.M`` instead of diffusers'
``down_blocks.B.resnets.J`` / ``attentions.J`` / ``downsamplers.0``. The numbering follows from the
UNet config alone:

* ``input_blocks.0.0`` is ``conv_in``; each down block then fills one slot per layer
  (slot ``.0`` the resnet, ``.1`` the attention when the block has one) and, except the last, one
  slot for its down-sampler (``input_blocks.N.0.op``);
* ``middle_block.0`` / ``.1`` / ``.2``: resnet, attention, resnet;
* each up block fills ``layers + 1`` slots (a per-block ``layers_per_block`` list runs in reverse
  for up blocks); the up-sampler sits in the block's last slot after the resnet (``.1``) or the
  resnet and attention (``.2``);
* resnet parts are renamed (``conv1`` -> ``in_layers.2``, ``time_emb_proj`` -> ``emb_layers.1``,
  ...); names inside attentions (``transformer_blocks.0.attn1.to_q``, ``proj_in``) are the same;
* SDXL's added embedding ``add_embedding.linear_1/2`` is ``label_emb.0.0/2``.

So SDXL (no attention in its first down block, ``transformer_layers_per_block`` [1, 2, 10]) gives
``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` and ``output_blocks.2.2.conv`` for
``up_blocks.0.upsamplers.0.conv``, the names kohya writes into SDXL LoRA files
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).

Used by single-file saving (state-dict keys) and by the LoRA file formats (module names). Every
function works from names and the config, so meta-device UNets work too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

#: diffusers resnet part -> original resnet part
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# One entry: diffusers prefix -> (original prefix, renames of the first name after the prefix).
_Entry = tuple[str, Mapping[str, str]]


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _as_plain(config: Any) -> dict[str, Any]:
    keys = (
        "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
        "addition_embed_type", "class_embed_type",
    )
    out = {}
    for k in keys:
        v = _get(config, k)
        out[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    return out


def check_config(config: Any) -> None:
    """Raise ``ValueError`` when a UNet config is not an SD 1.x / 2.x / SDXL-style layout."""
    c = _as_plain(config)
    if c["addition_embed_type"] not in (None, "text_time"):
        raise ValueError(f"UNet has addition_embed_type={c['addition_embed_type']!r}: not an SD 1.x/2.x/SDXL UNet")
    if c["class_embed_type"]:
        raise ValueError(f"UNet has class_embed_type={c['class_embed_type']!r}: not an SD 1.x/2.x/SDXL UNet")
    if c["mid_block_type"] not in (None, "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"UNet mid block {c['mid_block_type']!r} is not an SD 1.x/2.x/SDXL layout")
    for kind in (c["down_block_types"] or ()) + (c["up_block_types"] or ()):
        if kind not in ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"):
            raise ValueError(f"UNet block {kind!r} is not an SD 1.x/2.x/SDXL layout")


def _layers(config: Mapping[str, Any], n: int) -> list[int]:
    value = config["layers_per_block"]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * n


@lru_cache(maxsize=32)
def _entries_cached(frozen: tuple[tuple[str, Any], ...]) -> dict[str, _Entry]:
    config = dict(frozen)
    check_config(config)
    m: dict[str, _Entry] = {k: (v, {}) for k, v in _FIXED.items()}
    m["mid_block.resnets.0"] = ("middle_block.0", RESNET_NAMES)
    m["mid_block.attentions.0"] = ("middle_block.1", {})
    m["mid_block.resnets.1"] = ("middle_block.2", RESNET_NAMES)

    down = list(config["down_block_types"])
    layers = _layers(config, len(down))
    index = 1
    for b, kind in enumerate(down):
        for j in range(layers[b]):
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{index}.0", RESNET_NAMES)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if b < len(down) - 1:
            m[f"down_blocks.{b}.downsamplers.0"] = (f"input_blocks.{index}.0", {"conv": "op"})
            index += 1

    up = list(config["up_block_types"])
    up_layers = list(reversed(layers))
    index = 0
    for b, kind in enumerate(up):
        cross = kind.startswith("CrossAttn")
        for j in range(up_layers[b] + 1):
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{index}.0", RESNET_NAMES)
            if cross:
                m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            if j == up_layers[b] and b < len(up) - 1:
                m[f"up_blocks.{b}.upsamplers.0"] = (f"output_blocks.{index}.{2 if cross else 1}", {})
            index += 1
    return m


def block_map(config: Any) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers block prefix -> (original prefix, renames of the part that follows), e.g.
    ``"down_blocks.1.attentions.0" -> ("input_blocks.4.1", {})`` on SDXL. ``config`` is a UNet
    config (a dict or ``unet.config``); raises ``ValueError`` for other UNet layouts."""
    return dict(_entries_cached(tuple(sorted(_as_plain(config).items()))))


def _rename(rest: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def to_original(path: str, config: Any) -> str | None:
    """The original name of a diffusers UNet module path or parameter key, or None when it has none
    (``add_time_proj``, a path outside the UNet's blocks)."""
    entries = _entries_cached(tuple(sorted(_as_plain(config).items())))
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        entry = entries.get(prefix)
        if entry is not None:
            target, renames = entry
            rest = ".".join(parts[n:])
            if not rest:
                return target
            return f"{target}.{_rename(rest, renames)}"
    return None


def _unrename(rest: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def to_diffusers(path: str, config: Any) -> str | None:
    """The diffusers path of an original UNet module path or parameter key (the inverse of
    :func:`to_original`), or None when it names no part of this UNet."""
    entries = _entries_cached(tuple(sorted(_as_plain(config).items())))
    reverse = _reverse_cached(tuple(sorted(_as_plain(config).items())))
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        source = reverse.get(prefix)
        if source is not None:
            rest = ".".join(parts[n:])
            if not rest:
                return source
            return f"{source}.{_unrename(rest, entries[source][1])}"
    return None


@lru_cache(maxsize=32)
def _reverse_cached(frozen: tuple[tuple[str, Any], ...]) -> dict[str, str]:
    return {target: source for source, (target, _) in _entries_cached(frozen).items()}


def original_module_paths(unet: Any, paths: Iterable[str] | None = None) -> dict[str, str]:
    """diffusers module path -> original module path for ``paths`` (default: every named module of
    ``unet``) that have one. Only ``unet.config`` and names are used (meta-device UNets work)."""
    if paths is None:
        paths = [name for name, _ in unet.named_modules() if name]
    out: dict[str, str] = {}
    for path in paths:
        original = to_original(path, unet.config)
        if original is not None:
            out[path] = original
    return out


def to_original_state_dict(state: Mapping[str, Any], config: Any, prefix: str = "") -> dict[str, Any]:
    """A diffusers UNet state dict with original keys (``prefix`` prepended, e.g.
    ``"model.diffusion_model."``). Raises ``ValueError`` naming a key with no original place."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        original = None if (".lora_" in key or ".base_layer." in key) else to_original(key, config)
        if original is None:
            hint = " Merge or unload adapters before saving." if ("lora" in key or "base_layer" in key) else ""
            raise ValueError(f"UNet weight {key!r} has no place in the original single-file layout.{hint}")
        out[prefix + original] = value
    return out
