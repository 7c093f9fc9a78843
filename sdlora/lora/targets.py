"""Target presets and the per-layer plan (which layers get an adapter, at which rank and alpha).

A preset is a set of regular expressions over module paths, one set for the UNet and one for
the text encoders (SDXL's two encoders get the same set). Paths are those of diffusers'
``UNet2DConditionModel`` and of transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``;
transformers 5's ``CLIPTextModel`` has no ``text_model.`` level, older versions and
``CLIPTextModelWithProjection`` do, so text-encoder paths are matched and named without it (see
:func:`canonical_path`).

On SDXL the presets select what kohya sd-scripts' ``networks.lora`` selects by default: the
children of every ``Transformer2DModel`` (attention projections, feed-forward, ``proj_in``/``proj_out``)
and, with ``conv_dim`` (preset ``full``), the Linear/Conv2d layers of ``ResnetBlock2D``,
``Downsample2D`` and ``Upsample2D``; in the text encoders those of ``CLIPAttention`` and ``CLIPMLP``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

from .errors import LoraError
from .spec import LoraSpec

Component = Literal["unet", "text_encoder", "text_encoder_2"]
#: every component an adapter can live in; ``text_encoder_2`` is SDXL's second text encoder
COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS: tuple[Component, ...] = ("text_encoder", "text_encoder_2")


def is_text_encoder(component: str) -> bool:
    return component in TEXT_ENCODERS

_UNET_ATTN = r"(.*\.)?transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_UNET_MLP = (
    r"(.*\.)?transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    r"(.*\.)?attentions\.\d+\.(proj_in|proj_out)",
)
_UNET_CONV = (
    r"(.*\.)?resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)",
    r"(.*\.)?(downsamplers|upsamplers)\.\d+\.conv",
)
_TE_ATTN = r"(.*\.)?layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_MLP = r"(.*\.)?layers\.\d+\.mlp\.(fc1|fc2)"


@dataclass(frozen=True)
class Preset:
    """A named choice of layers; ``unet``/``text_encoder`` are full-match regular expressions
    (``text_encoder`` applies to both text encoders of SDXL)."""

    name: str
    description: str
    unet: tuple[str, ...]
    text_encoder: tuple[str, ...]

    def patterns(self, component: Component) -> tuple[str, ...]:
        return self.unet if component == "unet" else self.text_encoder


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "attn",
            "attention projections: UNet to_q/to_k/to_v/to_out.0, text encoder q/k/v/out_proj",
            (_UNET_ATTN,),
            (_TE_ATTN,),
        ),
        Preset(
            "attn-mlp",
            "attn + feed-forward and proj_in/proj_out (UNet), fc1/fc2 (text encoder); kohya's default LoRA",
            (_UNET_ATTN, *_UNET_MLP),
            (_TE_ATTN, _TE_MLP),
        ),
        Preset(
            "full",
            "attn-mlp + resnet conv1/conv2/conv_shortcut/time_emb_proj and down/up-sampler convs (LoCon)",
            (_UNET_ATTN, *_UNET_MLP, *_UNET_CONV),
            (_TE_ATTN, _TE_MLP),
        ),
    )
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LoraError(
            f"Unknown LoRA target preset {name!r}; allowed presets: {', '.join(PRESETS)}."
        ) from None


def canonical_path(component: Component, path: str) -> str:
    """The module path used in names and files: text-encoder paths lose a leading ``text_model.``.

    PEFT wrappers of different kinds nest (a LoHa layer around a LoRA layer when files of both
    methods are loaded); the inner wrapper's ``.base_layer`` steps are not part of the name."""
    path = path.replace(".base_layer", "")
    if is_text_encoder(component) and path.startswith("text_model."):
        return path[len("text_model.") :]
    return path


def model_path(model: nn.Module, component: Component, canonical: str) -> str:
    """The path of ``canonical`` in ``model`` (adds ``text_model.`` back where the model has it)."""
    if is_text_encoder(component) and hasattr(model, "text_model"):
        return "text_model." + canonical
    return canonical


@dataclass(frozen=True)
class TargetModule:
    """One layer that gets an adapter."""

    component: Component
    path: str  # path in the model (what PEFT sees)
    canonical: str  # path used for names in files
    kind: Literal["linear", "conv"]
    in_features: int
    out_features: int
    kernel_size: tuple[int, int]
    rank: int
    alpha: float

    @property
    def max_rank(self) -> int:
        """The largest useful rank: min(out, in * kh * kw) (the rank of the layer's weight matrix)."""
        return min(self.out_features, self.in_features * self.kernel_size[0] * self.kernel_size[1])

    @property
    def label(self) -> str:
        return f"{self.component}.{self.canonical}"


@dataclass(frozen=True)
class TargetPlan:
    """The layers of one component that get an adapter, with ``r``/``alpha`` defaults for PEFT."""

    component: Component
    modules: tuple[TargetModule, ...]

    @property
    def default_rank(self) -> int:
        return Counter(m.rank for m in self.modules).most_common(1)[0][0]

    @property
    def default_alpha(self) -> float:
        return Counter(m.alpha for m in self.modules).most_common(1)[0][0]

    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern`` for modules whose rank differs from :attr:`default_rank`."""
        default = self.default_rank
        return {_exact_key(m.path): m.rank for m in self.modules if m.rank != default}

    def alpha_pattern(self) -> dict[str, float]:
        default = self.default_alpha
        return {_exact_key(m.path): m.alpha for m in self.modules if m.alpha != default}

    def target_regex(self) -> str:
        """A regular expression PEFT full-matches against module paths: exactly these modules."""
        return "|".join(re.escape(m.path) for m in self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _exact_key(path: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name); a leading "^" pins the key
    # to the start of the name, so a key never matches a longer path that ends the same way.
    return "^" + re.escape(path)


def describe_layer(module: nn.Module) -> tuple[Literal["linear", "conv"], int, int, tuple[int, int]] | None:
    """(kind, in, out, kernel) of a Linear or Conv2d layer; None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features, (1, 1)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return "conv", module.in_channels // module.groups, module.out_channels, (kh, kw)
    return None


def base_layer(module: nn.Module) -> nn.Module:
    """The original layer under a PEFT wrapper, through nested wrappers (or the module itself)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer  # type: ignore[assignment]
    return module


def iter_adaptable(model: nn.Module, component: Component) -> Iterable[tuple[str, str, nn.Module]]:
    """(model path, canonical path, layer) of every Linear/Conv2d layer, PEFT wrappers seen through.

    A layer already wrapped by PEFT is reported once, by the wrapper's path, with its base layer;
    the adapter layers inside a wrapper are not reported.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrappers: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers[-1:]):
            continue
        if isinstance(module, BaseTunerLayer):
            wrappers.append(path)
            yield path, canonical_path(component, path), base_layer(module)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, canonical_path(component, path), module


#: the fields of a UNet config that decide its original-layout (LDM/SGM) block numbering
LAYOUT_KEYS = ("layers_per_block", "down_block_types", "up_block_types")


def unet_layout(unet: nn.Module | None) -> dict[str, object] | None:
    """The config fields of ``unet`` its original-layout module names depend on (recorded in
    ``LoraWeights.info["unet_layout"]`` so that a file writer can name SDXL layers), or None."""
    config = getattr(unet, "config", None)
    if config is None:
        return None
    layout = {k: (config.get(k) if isinstance(config, dict) else getattr(config, k, None)) for k in LAYOUT_KEYS}
    if any(v is None for v in layout.values()):
        return None
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in layout.items()}


def plan_targets(model: nn.Module, component: Component, spec: LoraSpec) -> TargetPlan:
    """Resolve ``spec.preset`` on ``model`` and give each matched layer its rank and alpha.

    Raises :class:`LoraError` for an unknown preset, a preset that matches nothing, or a rank
    larger than a layer allows (the message names the layer).
    """
    preset = get_preset(spec.preset)
    regexes = [re.compile(p) for p in preset.patterns(component)]
    if component == "unet":
        linear = (spec.linear_rank, spec.linear_alpha)
        conv = (spec.effective_conv_rank, spec.effective_conv_alpha)
    else:  # both text encoders
        linear = conv = (spec.effective_text_encoder_rank, spec.effective_text_encoder_alpha)
    modules: list[TargetModule] = []
    for path, canonical, layer in iter_adaptable(model, component):
        if not any(r.fullmatch(canonical) for r in regexes):
            continue
        described = describe_layer(layer)
        if described is None:
            continue
        kind, fan_in, fan_out, kernel = described
        rank, alpha = conv if kind == "conv" and kernel != (1, 1) else linear
        target = TargetModule(component, path, canonical, kind, fan_in, fan_out, kernel, rank, alpha)
        if rank > target.max_rank:
            shape = f"{fan_in} -> {fan_out}" + (f", {kernel[0]}x{kernel[1]}" if kind == "conv" else "")
            raise LoraError(
                f"LoRA rank {rank} is too large for layer '{target.label}' "
                f"({'Conv2d' if kind == 'conv' else 'Linear'} {shape}); its largest useful rank is "
                f"{target.max_rank}. Lower the rank (or conv_rank / text_encoder_rank)."
            )
        modules.append(target)
    if not modules:
        raise LoraError(
            f"LoRA preset {spec.preset!r} matches no layer of the {component.replace('_', ' ')} "
            f"({type(model).__name__}); is this a Stable Diffusion 1.x/2.x/XL model?"
        )
    return TargetPlan(component, tuple(modules))


def plan_from_shapes(
    model: nn.Module, component: Component, entries: dict[str, tuple[int, float]]
) -> TargetPlan:
    """A plan for given canonical paths with given (rank, alpha): used when loading a file."""
    modules = []
    for canonical, (rank, alpha) in entries.items():
        path = model_path(model, component, canonical)
        layer = base_layer(model.get_submodule(path))
        described = describe_layer(layer)
        if described is None:
            raise LoraError(f"Layer '{component}.{canonical}' is neither Linear nor Conv2d.")
        kind, fan_in, fan_out, kernel = described
        modules.append(TargetModule(component, path, canonical, kind, fan_in, fan_out, kernel, rank, float(alpha)))
    return TargetPlan(component, tuple(modules))
