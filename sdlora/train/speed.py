"""Speed settings applied to the models before training (frozen-weight kernels, attention dispatch).

Each setting here was measured with ``benchmarks/bench_train_step.py`` on the machine at hand;
the numbers are in ``docs/performance.md``. In short, on a CPU:

* **Frozen Conv2d layers run on cached oneDNN weight packs.** A plain ``conv2d`` call reorders its
  weight into oneDNN's blocked layout on every call, forward and backward. For the UNet's deep
  1280-channel layers at 256 px (8x8 and 4x4 latents) that reorder costs 5-10x the convolution
  itself. The base weights do not train, so each layer keeps a forward pack and a pack of the
  input-gradient convolution (the transposed, flipped kernel; a transposed convolution for
  strided layers), made once, and runs on channels-last activations (oneDNN's native layout).
* **Frozen Linear layers run through oneDNN with a cached bf16 weight.** Under bf16 autocast the
  plain path casts every frozen fp32 weight to bf16 on every call (the autocast cache only keeps
  casts of weights that require grad); in fp32, ``torch.mm`` goes to MKL, which on AMD CPUs runs
  at less than half of oneDNN's speed. The input gradient reuses the same weight (a transposed
  view), so fp32 needs no extra memory and bf16 one bf16 copy.
* **No fp32 round trip into the adapters.** PEFT casts a LoRA layer's input to the adapter
  weights' dtype (fp32) and autocast casts it straight back to bf16 for the adapter's matmul:
  two copies of every adapted activation per step, forward and backward. Where the adapter has
  no dropout and no method-specific forward, the cast is switched off (PEFT's
  ``cast_input_dtype_enabled``); the adapter then sees the same bf16 values.
* Neither frozen-layer kind keeps the layer's input for backward (a frozen weight needs no input to get its
  gradient), which also lowers activation memory.
* **Attention by size (bf16)**: PyTorch's CPU flash-attention kernel wins on long sequences
  (self-attention over 32x32 latents and larger) but in bf16 is 2-3x slower than a plain batched
  matmul + softmax on short ones (cross-attention to 77 text tokens, the 16x16 and 8x8 levels).
  A small processor picks diffusers' ``AttnProcessor2_0`` or ``AttnProcessor`` by the size of the
  attention matrix. In fp32 the two are within 10 % of each other and SDPA is kept.

The fast paths compute the same function as the plain layers; only the floating-point summation
order differs (on the SD 1.5 UNet the LoRA gradients differ from the plain step's by 3e-6 in fp32
and 1.4 % in bf16, where plain bf16 itself differs from fp32 by 1.6 %). They are taken for a CPU
tensor, gradients enabled (a training forward), a frozen weight that has not changed since it
was packed, fp32 or bf16-autocast compute, enough work per call (:data:`MIN_MACS`) and no
tracing or compiling. Anything else runs the layer's own ``forward``. A forward without
gradients (sampling previews, which may merge adapters into the base weights) drops the
caches; the next training forward rebuilds them.

On CUDA nothing is changed: cuDNN keeps its own weight layouts and SDPA picks its kernel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

ATTENTION_CHOICES = ("auto", "sdpa", "unchanged")
MEMORY_CHOICES = ("auto", "speed", "low")

#: Calls with fewer multiply-adds than this run the plain layer: below it the fixed cost of a
#: oneDNN call from Python outweighs the gain (measured: a 256x256x256 Linear is 0.9-1.8x, a
#: 320-channel 3x3 convolution at 8x8 2-5x). The tiny test models stay entirely below it.
MIN_MACS = 1 << 24

#: In bf16 on a CPU, attention matrices up to this many entries per head (query length x key
#: length) run as a batched matmul + softmax, larger ones through SDPA's flash kernel. Measured
#: on SD 1.5 shapes (fwd + bwd): 1024x77 and 256x256 are 2.4-3x faster as matmuls, 1024x1024
#: is 1.1x faster with SDPA (and needs far less memory).
SMALL_ATTENTION_ENTRIES = 512 * 512

#: PyTorch's private oneDNN ops the frozen-layer kernels call. They are not a public API and may change
#: or vanish in another release: without any of them the kernels stay off, and a call that fails at run
#: time switches every layer back to the plain path (see :func:`fall_back`).
ONEDNN_OPS = ("_reorder_convolution_weight", "_reorder_convolution_transpose_weight", "_convolution_pointwise",
              "_convolution_transpose_pointwise", "_linear_pointwise", "_is_mkldnn_bf16_supported")


def _op(name: str) -> Any:
    """``torch.ops.mkldnn.<name>`` (one place, so a missing or changed op is found and reported)."""
    return getattr(torch.ops.mkldnn, name)


def missing_onednn_ops() -> list[str]:
    """The ops of :data:`ONEDNN_OPS` this PyTorch build does not have."""
    missing = []
    for name in ONEDNN_OPS:
        try:
            _op(name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    return missing


#: Why the fast paths were switched off while running (None while they work), and who hears about it.
_FALLBACK: str | None = None
_REPORTER: Any = None


def fall_back(reason: str) -> None:
    """Switch every frozen layer to the plain path from now on (a oneDNN op failed), and say so once."""
    global _FALLBACK
    if _FALLBACK is not None:
        return
    _FALLBACK = reason
    message = (f"CPU fast path off: {reason}; training goes on with the plain PyTorch layers (same results, "
               "slower; set speed_mode = \"off\" to skip the fast path from the start)")
    if _REPORTER is not None:
        _REPORTER(message)
    else:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class SpeedOptions:
    """Which settings :func:`prepare_for_training` applies (all on by default).

    ``frozen_convs``: frozen Conv2d layers on cached oneDNN weight packs (CPU).
    ``frozen_linears``: frozen Linear layers through oneDNN with a cached bf16 weight (CPU).
    ``skip_lora_input_cast``: no fp32 copy of the input of LoRA layers without dropout (CPU).
    ``attention``: ``"auto"`` picks the attention kernel by size on the CPU, ``"sdpa"`` uses
    diffusers' SDPA processor everywhere, ``"unchanged"`` leaves the model's processors alone.
    ``memory``: ``"speed"`` keeps a forward and an input-gradient pack per frozen Conv2d (about
    the size of the fp32 weights in bf16, twice that in fp32); ``"low"`` keeps only the forward
    pack and only in bf16 (the input gradient casts the weight per call like the plain layer);
    ``"auto"`` is ``"low"`` when the UNet has gradient checkpointing on (the user asked for less
    memory) and ``"speed"`` otherwise.
    """

    frozen_convs: bool = True
    frozen_linears: bool = True
    skip_lora_input_cast: bool = True
    attention: str = "auto"
    memory: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"SpeedOptions.attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attention!r}")
        if self.memory not in MEMORY_CHOICES:
            raise ValueError(f"SpeedOptions.memory must be one of {', '.join(MEMORY_CHOICES)}, got {self.memory!r}")


@dataclass
class SpeedReport:
    """What :func:`prepare_for_training` changed (for logs and the benchmark)."""

    device: str
    frozen_convs: int = 0
    frozen_linears: int = 0
    lora_layers_without_input_cast: int = 0
    memory: str = "speed"
    attention: str = "unchanged"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.device != "cpu":
            return f"{self.device}: no changes"
        return (f"cpu: {self.frozen_convs} frozen Conv2d and {self.frozen_linears} frozen Linear layers on cached "
                f"oneDNN weights (memory mode {self.memory}); {self.lora_layers_without_input_cast} LoRA layers "
                f"without the fp32 input copy; attention {self.attention}"
                + "".join(f"; {n}" for n in self.notes))


def prepare_for_training(unet: nn.Module, text_encoder: nn.Module | tuple[nn.Module, ...] | None,
                         device: torch.device | str,
                         options: SpeedOptions | None = None, *, warn: Any = None) -> SpeedReport:
    """Apply the measured speed settings to the models (in place) and say what was done.

    Call after the adapters are injected and the base weights frozen. Safe to call twice;
    :func:`restore` undoes it and :func:`suspended` pauses it. Training results do not depend
    on it beyond floating-point summation order. ``warn(text)`` hears of a fall back to the plain
    path (an op missing now, or failing later); without it a ``RuntimeWarning`` is issued.
    """
    global _FALLBACK, _REPORTER
    options = options or SpeedOptions()
    dev = torch.device(device).type
    report = SpeedReport(device=dev)
    _FALLBACK, _REPORTER = None, warn
    if dev != "cpu":
        return report
    missing = missing_onednn_ops() if (options.frozen_convs or options.frozen_linears) else []
    if missing:
        fall_back(f"this PyTorch ({torch.__version__}) lacks the oneDNN op(s) {', '.join(missing)}")
        report.notes.append("frozen-weight kernels off: oneDNN op(s) missing")
        options = SpeedOptions(frozen_convs=False, frozen_linears=False,
                               skip_lora_input_cast=options.skip_lora_input_cast, attention=options.attention,
                               memory=options.memory)
    encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else (text_encoder,)
    models = [m for m in (unet, *encoders) if m is not None]
    report.memory = options.memory
    if options.memory == "auto":
        report.memory = "low" if getattr(unet, "is_gradient_checkpointing", False) else "speed"
    if options.frozen_convs or options.frozen_linears:
        if not torch.backends.mkldnn.is_available():
            report.notes.append("oneDNN not available in this PyTorch build: frozen-weight kernels off")
        else:
            for model in models:
                convs, linears = _install_frozen_kernels(model, options.frozen_convs, options.frozen_linears,
                                                         low_memory=report.memory == "low")
                report.frozen_convs += convs
                report.frozen_linears += linears
    if options.skip_lora_input_cast:
        report.lora_layers_without_input_cast = sum(_skip_lora_input_cast(model) for model in models)
    if options.attention != "unchanged" and hasattr(unet, "set_attn_processor") and hasattr(unet, "attn_processors"):
        report.attention = _set_attention(unet, options.attention)
    return report


def restore(*models: nn.Module | None) -> None:
    """Undo :func:`prepare_for_training`: plain layers, no caches, the attention processors from before."""
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, (FrozenConv2d, FrozenLinear)):
                module.__class__ = nn.Conv2d if isinstance(module, FrozenConv2d) else nn.Linear
                module.__dict__.pop("_sdlora_cache", None)
            if "_sdlora_cast_input" in module.__dict__:
                module.cast_input_dtype_enabled = module.__dict__.pop("_sdlora_cast_input")
        previous = getattr(model, "_sdlora_attn_processors", None)
        if previous is not None:
            model.set_attn_processor(dict(previous))  # diffusers pops from the dict it is given
            del model._sdlora_attn_processors


_SUSPENDED = 0


@contextlib.contextmanager
def suspended(*models: nn.Module | None) -> Iterator[None]:
    """Run the plain layers, PEFT's input casts and the attention processors from before
    :func:`prepare_for_training` inside the block (for ``models``; the plain layers everywhere),
    keeping the caches for afterwards (A/B timings and checks in one process)."""
    global _SUSPENDED
    swapped = []
    casts = []
    for model in models:
        if model is None:
            continue
        previous = getattr(model, "_sdlora_attn_processors", None)
        if previous is not None:
            swapped.append((model, dict(model.attn_processors)))
            model.set_attn_processor(dict(previous))
        for module in model.modules():
            if "_sdlora_cast_input" in module.__dict__:
                casts.append((module, module.cast_input_dtype_enabled))
                module.cast_input_dtype_enabled = module._sdlora_cast_input
    _SUSPENDED += 1
    try:
        yield
    finally:
        _SUSPENDED -= 1
        for model, processors in swapped:
            model.set_attn_processor(processors)
        for module, enabled in casts:
            module.cast_input_dtype_enabled = enabled


# Frozen-weight layers ------------------------------------------------------------------------------


def _install_frozen_kernels(model: nn.Module, conv: bool, linear: bool, *, low_memory: bool) -> tuple[int, int]:
    """Turn the model's plain, frozen nn.Conv2d / nn.Linear layers into their cached-kernel versions."""
    convs = linears = 0
    for module in model.modules():
        if conv and type(module) is nn.Conv2d and _conv_supported(module) and _frozen(module):
            module.__class__ = FrozenConv2d
            module._sdlora_cache = _Cache(low_memory)
            convs += 1
        elif linear and type(module) is nn.Linear and _frozen(module):
            module.__class__ = FrozenLinear
            module._sdlora_cache = _Cache(low_memory)
            linears += 1
        elif isinstance(module, (FrozenConv2d, FrozenLinear)):
            module._sdlora_cache = _Cache(low_memory)  # prepared again: new memory mode, packs rebuilt
            convs += isinstance(module, FrozenConv2d)
            linears += isinstance(module, FrozenLinear)
    return convs, linears


def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters(recurse=False))


def _conv_supported(module: nn.Conv2d) -> bool:
    return (module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and all(p >= 0 for p in module.padding))


class _Cache:
    """Per-layer cache: the packed/cast weights, the key of the weights they were made from, and
    the memory mode (``low_memory``: forward packs only, bf16 only)."""

    __slots__ = ("key", "items", "low_memory")

    def __init__(self, low_memory: bool = False) -> None:
        self.key: tuple | None = None
        self.items: dict[str, Any] = {}
        self.low_memory = low_memory

    def get(self, key: tuple, build) -> dict[str, Any]:
        if key != self.key:
            self.items = {}          # free the old packs before making new ones
            self.items = build()
            self.key = key
        return self.items

    def clear(self) -> None:
        self.key, self.items = None, {}


def _weights_key(module: nn.Module, dtype: torch.dtype) -> tuple:
    """Identity of the weights a cache was made from: storage, in-place version, dtype asked for."""
    w, b = module.weight, module.bias
    return (dtype, w.data_ptr(), w._version, w.dtype, tuple(w.shape),
            None if b is None else (b.data_ptr(), b._version, b.dtype))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the plain layer would compute in here (bf16 under CPU bf16 autocast), or None
    where the fast path does not apply."""
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or not _bf16_ok():
            return None
        return torch.bfloat16 if x.is_floating_point() else None
    if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16):
        if x.dtype == torch.bfloat16 and not _bf16_ok():
            return None
        return x.dtype
    return None


_BF16_OK: bool | None = None


def _bf16_ok() -> bool:
    global _BF16_OK
    if _BF16_OK is None:
        _BF16_OK = bool(_op("_is_mkldnn_bf16_supported")())
    return _BF16_OK


def _fast_path_allowed(module: nn.Module, x: torch.Tensor) -> bool:
    if _SUSPENDED or _FALLBACK is not None:
        return False
    if not torch.is_grad_enabled():
        # Sampling (possibly with adapters merged into these weights): plain path, drop the packs.
        module._sdlora_cache.clear()
        return False
    if x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    return _frozen(module)


class FrozenConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with a frozen weight whose training forward/backward use cached oneDNN packs.

    Written here (not from a library): PyTorch exposes the packing ops that its compiler uses for
    inference, but no autograd-aware layer for frozen weights. Made by :func:`prepare_for_training`
    by changing the class of an existing layer; the parameters and state dict are untouched.
    """

    _sdlora_cache: _Cache

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's name
        if (input.dim() != 4 or input.shape[0] * (input.shape[2] // self.stride[0]) * (input.shape[3] // self.stride[1])
                * self.weight.numel() < MIN_MACS or not _fast_path_allowed(self, input)):
            return super().forward(input)
        dtype = _compute_dtype(input, self.weight)
        cache = self._sdlora_cache
        if dtype is None or (cache.low_memory and dtype != torch.bfloat16):
            return super().forward(input)
        try:
            packs = cache.get(_weights_key(self, dtype), lambda: self._pack(dtype, input.shape, not cache.low_memory))
            x = input.to(dtype).contiguous(memory_format=torch.channels_last)
            return _PackedConv.apply(x, packs, self)
        except (RuntimeError, TypeError, AttributeError) as e:  # a private op changed in this PyTorch
            fall_back(f"oneDNN convolution failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return super().forward(input)

    def _pack(self, dtype: torch.dtype, input_shape: torch.Size, backward: bool) -> dict[str, Any]:
        w = self.weight.detach().to(dtype)
        stride, padding, dilation = list(self.stride), list(self.padding), list(self.dilation)
        out_hw = [(input_shape[i + 2] + 2 * padding[i] - dilation[i] * (self.kernel_size[i] - 1) - 1) // stride[i] + 1
                  for i in range(2)]
        out_shape = [input_shape[0], self.out_channels, *out_hw]
        fwd = _op("_reorder_convolution_weight")(w, padding, stride, dilation, self.groups,
                                                           list(input_shape))
        items: dict[str, Any] = {"fwd": fwd, "bias": None if self.bias is None else self.bias.detach().to(dtype)}
        if not backward:
            return items
        if stride == [1, 1] and self.groups == 1:
            # Input gradient of a stride-1 convolution: the same convolution with the kernel
            # transposed (in <-> out channels) and flipped, padded by dilation*(k-1) - padding.
            pad_t = [dilation[i] * (self.kernel_size[i] - 1) - padding[i] for i in range(2)]
            if min(pad_t) >= 0:
                wt = w.transpose(0, 1).flip(2, 3).contiguous()
                items["bwd"] = _op("_reorder_convolution_weight")(wt, pad_t, [1, 1], dilation, 1, out_shape)
                items["bwd_kind"] = ("conv", pad_t)
        if "bwd" not in items:
            # Strided layers: the input gradient is a transposed convolution with the same weight.
            out_pad = [input_shape[i + 2] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i]
                                             + dilation[i] * (self.kernel_size[i] - 1) + 1) for i in range(2)]
            items["bwd"] = _op("_reorder_convolution_transpose_weight")(
                w, padding, out_pad, stride, dilation, self.groups, out_shape)
            items["bwd_kind"] = ("transpose", out_pad)
            items["bwd_shape"] = tuple(input_shape[2:])
        return items


class _PackedConv(torch.autograd.Function):
    """Convolution with a frozen, packed weight: gradient for the input only, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packs: dict[str, Any], layer: FrozenConv2d) -> torch.Tensor:  # type: ignore[override]
        ctx.packs, ctx.layer, ctx.in_hw = packs, layer, tuple(x.shape[2:])
        return _op("_convolution_pointwise")(
            x, packs["fwd"], packs["bias"], list(layer.padding), list(layer.stride), list(layer.dilation),
            layer.groups, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        packs, layer = ctx.packs, ctx.layer
        g = grad.contiguous(memory_format=torch.channels_last)
        if "bwd" in packs and _FALLBACK is None:
            try:
                return _PackedConv._packed_input_grad(ctx, g), None, None
            except (RuntimeError, TypeError, AttributeError) as e:  # a private op changed in this PyTorch
                fall_back(f"oneDNN convolution failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        # Low-memory mode (no input-gradient pack) or after a fall back: the weight is cast per call as in
        # the plain layer.
        gx = torch.nn.grad.conv2d_input((g.shape[0], layer.in_channels, *ctx.in_hw), layer.weight.detach().to(g.dtype),
                                        g, layer.stride, layer.padding, layer.dilation, layer.groups)
        return gx, None, None

    @staticmethod
    def _packed_input_grad(ctx, g: torch.Tensor) -> torch.Tensor:
        """The input gradient through the input-gradient pack."""
        packs, layer = ctx.packs, ctx.layer
        kind, extra = packs["bwd_kind"]
        out_pad = extra
        if kind == "transpose" and ctx.in_hw != packs.get("bwd_shape"):
            # Another input size than the one packed for: the output padding depends on it.
            out_pad = [ctx.in_hw[i] - ((g.shape[i + 2] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                       + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1) for i in range(2)]
        if kind == "conv":
            return _op("_convolution_pointwise")(g, packs["bwd"], None, extra, [1, 1], list(layer.dilation), 1,
                                                 "none", [], "")
        return _op("_convolution_transpose_pointwise")(
            g, packs["bwd"], None, list(layer.padding), out_pad, list(layer.stride), list(layer.dilation),
            layer.groups, "none", [], "")


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` with a frozen weight whose training forward/backward run through oneDNN.

    fp32 uses the weight as it is; bf16 autocast uses one cached bf16 copy instead of a new cast
    on every call. The input gradient uses the transposed view of the same weight. Written here
    (not from a library), made by :func:`prepare_for_training` like :class:`FrozenConv2d`.
    """

    _sdlora_cache: _Cache

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name
        if input.dim() < 2 or input.numel() * self.out_features < MIN_MACS or not _fast_path_allowed(self, input):
            return super().forward(input)
        dtype = _compute_dtype(input, self.weight)
        if dtype is None:
            return super().forward(input)
        if dtype == self.weight.dtype:
            weights = {"w": self.weight.detach(), "bias": None if self.bias is None else self.bias.detach()}
        else:
            weights = self._sdlora_cache.get(_weights_key(self, dtype), lambda: {
                "w": self.weight.detach().to(dtype),
                "bias": None if self.bias is None else self.bias.detach().to(dtype)})
        try:
            return _OneDnnLinear.apply(input.to(dtype), weights)
        except (RuntimeError, TypeError, AttributeError) as e:  # a private op changed in this PyTorch
            fall_back(f"oneDNN linear failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return super().forward(input)


class _OneDnnLinear(torch.autograd.Function):
    """``x @ W.T + b`` with a frozen W through oneDNN: gradient for the input only, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        ctx.weights = weights
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _op("_linear_pointwise")(x2, weights["w"], weights["bias"], "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.weights["w"]
        g2 = grad.reshape(-1, grad.shape[-1])
        if not g2.is_contiguous():
            g2 = g2.contiguous()
        gx = None
        if _FALLBACK is None:
            try:
                gx = _op("_linear_pointwise")(g2, w.t(), None, "none", [], "")
            except (RuntimeError, TypeError, AttributeError) as e:  # a private op changed in this PyTorch
                fall_back(f"oneDNN linear failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if gx is None:
            gx = g2 @ w.to(g2.dtype)
        return gx.view(*grad.shape[:-1], gx.shape[-1]), None


# Adapter inputs ------------------------------------------------------------------------------------


def _skip_lora_input_cast(model: nn.Module) -> int:
    """Switch off PEFT's cast of the adapter input to the adapter dtype where it cannot change a value.

    On fp32 weights the cast only matters under bf16 autocast, where it turns the bf16 input into
    an fp32 copy that autocast casts back to the same bf16 values for the adapter's matmul. With
    dropout (its mask and scale would be computed in bf16) or a method-specific forward
    (variants) the cast stays.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "cast_input_dtype_enabled"):
            continue
        plain = not getattr(module, "lora_variant", None) and all(
            isinstance(d, nn.Identity) for d in module.lora_dropout.values())
        # AdaLoRA keeps bare parameters in lora_A, plain LoRA keeps Linear/Conv modules.
        weights = [module.get_base_layer().weight, *(getattr(a, "weight", a) for a in module.lora_A.values())]
        if plain and all(w.dtype == torch.float32 for w in weights):
            if "_sdlora_cast_input" not in module.__dict__:
                module._sdlora_cast_input = module.cast_input_dtype_enabled
            module.cast_input_dtype_enabled = False
            count += 1
    return count


# Attention -----------------------------------------------------------------------------------------


class SizeDispatchAttnProcessor:
    """diffusers attention processor that picks the faster kernel by the attention matrix's size.

    In bf16 on a CPU, up to :data:`SMALL_ATTENTION_ENTRIES` entries per head: ``AttnProcessor``
    (batched matmul + softmax); otherwise ``AttnProcessor2_0`` (``scaled_dot_product_attention``).
    Both are diffusers' own processors; this class only chooses between them.
    """

    def __init__(self, max_small_entries: int = SMALL_ATTENTION_ENTRIES) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.max_small_entries = max_small_entries
        self.small = AttnProcessor()
        self.large = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if hidden_states.ndim == 4:
            q_len = hidden_states.shape[2] * hidden_states.shape[3]
        else:
            q_len = hidden_states.shape[1]
        k_len = q_len if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        bf16 = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                or hidden_states.dtype == torch.bfloat16)
        small = hidden_states.device.type == "cpu" and bf16 and q_len * k_len <= self.max_small_entries
        proc = self.small if small else self.large
        return proc(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _set_attention(unet: nn.Module, choice: str) -> str:
    """Install the attention processors for ``choice`` where the model uses plain ones; keep the
    previous ones for :func:`restore`."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    current = unet.attn_processors
    plain = (AttnProcessor, AttnProcessor2_0, SizeDispatchAttnProcessor)
    if not current or not all(isinstance(p, plain) for p in current.values()):
        return "unchanged (the model has custom attention processors)"
    if not hasattr(unet, "_sdlora_attn_processors"):
        unet._sdlora_attn_processors = dict(current)
    if choice == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
        return "sdpa"
    unet.set_attn_processor(SizeDispatchAttnProcessor())
    return f"by size (bf16: matmul up to {SMALL_ATTENTION_ENTRIES} entries per head, SDPA above)"


def frozen_layers(models: Iterable[nn.Module | None]) -> list[nn.Module]:
    """The layers :func:`prepare_for_training` switched to cached kernels (for tests and reports)."""
    return [m for model in models if model is not None for m in model.modules()
            if isinstance(m, (FrozenConv2d, FrozenLinear))]
