"""Module paths of the original (LDM / ``sgm``) Stable Diffusion UNet for diffusers' UNet paths.

Some trainers name UNet layers after the original code (``input_blocks.1.1.proj_in`` instead of
``down_blocks.0.attentions.0.proj_in``). To read their files we translate every Linear/Conv2d
path of the loaded diffusers UNet to its LDM path; the block numbering follows from
``layers_per_block`` and which blocks have attentions/samplers. Written for this project
(diffusers' own remapper guesses sampler positions and mislabels up-samplers of blocks without
attention).
"""

from __future__ import annotations

import re

_RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}

_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")

_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers_per_block(unet_config, index: int) -> int:
    lpb = unet_config.get("layers_per_block", 2) if isinstance(unet_config, dict) else unet_config.layers_per_block
    if isinstance(lpb, (list, tuple)):
        return int(lpb[index])
    return int(lpb)


def _resnet_rest(rest: str | None) -> str | None:
    if rest is None:
        return None
    return _RESNET_PARTS.get(rest)


def diffusers_to_ldm(path: str, unet_config, up_block_has_attention: dict[int, bool]) -> str | None:
    """The LDM path of a diffusers UNet module path, or None when there is none."""
    if path in _FIXED:
        return _FIXED[path]
    match = _MID_RE.match(path)
    if match:
        kind, idx, rest = match.group(1), int(match.group(2)), match.group(3)
        slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, idx))
        if slot is None:
            return None
        if kind == "resnets":
            rest = _resnet_rest(rest)
            if rest is None:
                return None
        return f"middle_block.{slot}" + (f".{rest}" if rest else "")
    match = _BLOCK_RE.match(path)
    if not match:
        return None
    side, block, kind, idx, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    if kind == "resnets":
        rest = _resnet_rest(rest)
        if rest is None:
            return None
    if side == "down_blocks":
        layers = _layers_per_block(unet_config, block)
        # input_blocks.0 is conv_in; each down block has `layers` resnet(+attention) slots, then a sampler slot.
        first = 1 + sum(_layers_per_block(unet_config, b) + 1 for b in range(block))
        if kind == "downsamplers":
            return f"input_blocks.{first + layers}.0.op" if rest == "conv" else None
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{first + idx}.{slot}" + (f".{rest}" if rest else "")
    # Up blocks have layers_per_block + 1 slots (a per-block list runs in reverse for up blocks);
    # the sampler sits in the last slot after the resnet (index 1) or resnet + attention (index 2).
    count = len(up_block_has_attention)

    def up_slots(b: int) -> int:
        return _layers_per_block(unet_config, count - 1 - b) + 1

    layers = up_slots(block)
    first = sum(up_slots(b) for b in range(block))
    if kind == "upsamplers":
        if rest != "conv":
            return None
        slot = 2 if up_block_has_attention.get(block, False) else 1
        return f"output_blocks.{first + layers - 1}.{slot}.conv"
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{first + idx}.{slot}" + (f".{rest}" if rest else "")


def ldm_paths(unet) -> dict[str, str]:
    """diffusers path -> LDM path for every Linear/Conv2d layer of ``unet`` that has one."""
    from ..targets import iter_adaptable

    config = unet.config
    up_types = config.get("up_block_types") if isinstance(config, dict) else config.up_block_types
    has_attention = {i: "CrossAttn" in t or "Attn" in t for i, t in enumerate(up_types or ())}
    out: dict[str, str] = {}
    for path, canonical, _ in iter_adaptable(unet, "unet"):
        ldm = diffusers_to_ldm(canonical, config, has_attention)
        if ldm is not None:
            out[canonical] = ldm
    return out
