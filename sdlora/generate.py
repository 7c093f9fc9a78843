"""Preview images from a base model with LoRA adapters at any scale, without reloading.

A :class:`Previewer` holds one loaded ``StableDiffusionPipeline``. Adapters come from files
(:meth:`Previewer.load_lora`, several at once, each with a weight) or are already in the models,
injected by training (:meth:`Previewer.use_adapter`). Changing a weight or the global scale only
rewrites one float per adapted layer; the model stays loaded between calls.

Each call leaves the models' adapter state (scales, active adapters, train/eval mode) as it
found it, so a training loop can call the previewer for samples and carry on training.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .lora import control
from .lora.errors import LoraError
from .lora.formats import LoadReport, load_lora

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# Display name -> (diffusers scheduler class, extra config). Names follow A1111's sampler menu.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
}
_ALIASES = {"eulerancestral": "Euler a", "dpmsolver": "DPM++ 2M", "dpmsolvermultistep": "DPM++ 2M"}

DEFAULT_SCHEDULER = "DPM++ 2M Karras"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("++", "pp"))


def scheduler_names() -> list[str]:
    """Scheduler (sampler) names :meth:`Previewer.generate` accepts, as shown in UIs."""
    return list(_SCHEDULERS)


def resolve_scheduler_name(name: str) -> str:
    """The display name for ``name`` (case, spaces, ``_`` and ``++``/``pp`` do not matter)."""
    table = {_norm(k): k for k in _SCHEDULERS}
    table.update(_ALIASES)
    key = _norm(name)
    if key not in table:
        raise LoraError(f"Unknown scheduler {name!r}; choose one of: {', '.join(_SCHEDULERS)}.")
    return table[key]


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler ``name`` built on the base model's scheduler config.

    The base config keeps the model's noise schedule and ``prediction_type``.
    """
    import diffusers

    display = resolve_scheduler_name(name)
    class_name, extra = _SCHEDULERS[display]
    cls = getattr(diffusers, class_name)
    return cls.from_config(dict(base_config), **extra)


@dataclass
class _Entry:
    weight: float
    from_file: bool


class Previewer:
    """Generate previews from one loaded pipeline with any mix of adapters at any scale.

    ``pipe`` is a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (the same
    calls, the second text encoder included), an object with a ``.pipe`` attribute (such
    as ``sdlora.models.loading.BaseModel``), or a base-model spec for ``load_base`` (a hub id, a
    diffusers folder, a single file, "tiny"; None = the bundled demo model). The effective
    multiplier of adapter ``n`` is ``scale * weight[n]``; ``scale`` 0 gives the base model
    exactly, negative values are allowed.
    """

    def __init__(self, pipe: Any = None) -> None:
        if pipe is None or isinstance(pipe, (str, os.PathLike)):
            from .models.loading import load_base  # a base-model spec: hub id, folder, file, "tiny", None = demo

            pipe = load_base(pipe)
        pipe = getattr(pipe, "pipe", pipe)
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise LoraError(f"Previewer needs a Stable Diffusion pipeline with a {part}; got {type(pipe).__name__}.")
        self.pipe = pipe
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._entries: dict[str, _Entry] = {}
        self._scale = 1.0
        self._enabled = True
        self._merged = False
        self.reports: dict[str, LoadReport] = {}
        self._files: dict[tuple, str] = {}  # (resolved path, mtime, size) -> adapter name, for set_loras
        self._layerset: control.LayerSet | None = None  # PEFT layers, collected once per adapter change
        self._embedding_words: set[tuple[int, tuple[str, ...]]] = set()  # (tokenizer, prompt words) loaded here
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_base(cls, spec: str | os.PathLike[str], **kwargs: Any) -> "Previewer":
        """Load a base model (hub id, diffusers folder, single file, tiny/demo) and wrap it."""
        from .models.loading import load_base  # provided by sdlora.models

        return cls(load_base(spec, **kwargs))

    # Models ---------------------------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def text_encoder(self) -> nn.Module:
        return self.pipe.text_encoder

    @property
    def text_encoder_2(self) -> nn.Module | None:
        """SDXL's second text encoder (None for SD 1.x/2.x)."""
        return getattr(self.pipe, "text_encoder_2", None)

    @property
    def _models(self) -> list[nn.Module]:
        return [m for m in (self.pipe.unet, self.pipe.text_encoder, self.text_encoder_2) if m is not None]

    def _layers(self) -> control.LayerSet:
        if self._layerset is None:
            self._layerset = control.collect(self._models)
        return self._layerset

    # Adapters -------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, float]:
        """Adapter name -> weight, in the order they were added."""
        return {name: e.weight for name, e in self._entries.items()}

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def merged(self) -> bool:
        return self._merged

    def load_lora(
        self, path: str | os.PathLike[str], weight: float = 1.0, name: str | None = None, *, strict: bool = False
    ) -> str:
        """Load a LoRA file (kohya/A1111, diffusers or PEFT layout) as another adapter; returns its name.

        Keys that fit no layer are reported in ``self.reports[name]`` and warned about.
        """
        _check_number("weight", weight)
        taken = set(control.adapter_names(self._models)) | set(self._entries)
        if name is not None and name in taken:
            raise LoraError(f"An adapter named {name!r} is already loaded; pick another name.")
        if self._merged:
            raise LoraError("Unmerge before loading another LoRA (merged weights would be changed).")
        extra = {"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {}
        adapter, report = load_lora(path, self.unet, self.text_encoder, name, strict=strict, taken_names=taken, **extra)
        self._layerset = None
        self._load_bundled(path)
        self._entries[adapter.name] = _Entry(float(weight), True)
        self.reports[adapter.name] = report
        self._files[_file_key(path)] = adapter.name
        return adapter.name

    def load_embedding(self, path: str | os.PathLike[str], token: str | None = None) -> list[str]:
        """Load a textual-inversion embedding file (A1111/ComfyUI ``.safetensors``: ``emb_params``, a single
        tensor, ``string_to_param``, or SDXL's ``clip_l``/``clip_g``) or the embeddings bundled into a LoRA file.

        The prompt word is ``token`` (default: the file's stem, or the bundled name), as in A1111 and ComfyUI;
        an embedding of N vectors becomes ``token token_1 ... token_{N-1}`` the way diffusers'
        ``load_textual_inversion`` (which does the loading, into every text encoder) expands it. Loading a
        name again replaces its vectors. Returns the prompt words loaded.
        """
        from .lora.formats.embedding import own_tokenizers, read_embeddings

        found = read_embeddings(path, token)
        own_tokenizers(self.pipe)
        if token is not None and len(found) == 1:
            found = {token: next(iter(found.values()))}
        encoders = [(self.pipe.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            encoders.append((self.pipe.tokenizer_2, self.text_encoder_2))
        names = []
        for name, vectors in found.items():
            if len(vectors) != len(encoders):
                raise LoraError(f"{path}: embedding {name!r} has vectors for {len(vectors)} text encoder(s); this base "
                                f"model has {len(encoders)}.")
            for (tokenizer, encoder), rows in zip(encoders, vectors):
                width = encoder.get_input_embeddings().weight.shape[-1]
                if rows.shape[-1] != width:
                    raise LoraError(f"{path}: embedding {name!r} has {rows.shape[-1]}-wide vectors; this text "
                                    f"encoder takes {width} (an embedding of another base model).")
                words = [name] + [f"{name}_{i}" for i in range(1, rows.shape[0])]
                if (id(tokenizer), tuple(words)) in self._embedding_words:  # loaded before: replace the vectors
                    table = encoder.get_input_embeddings().weight
                    with torch.no_grad():
                        for w, row in zip(words, rows):
                            table[tokenizer.convert_tokens_to_ids(w)] = row.to(table.device, table.dtype)
                    continue
                self.pipe.load_textual_inversion(rows, token=name, tokenizer=tokenizer, text_encoder=encoder)
                self._embedding_words.add((id(tokenizer), tuple(words)))
            names.append(name)
        return names

    def _load_bundled(self, path: str | os.PathLike[str]) -> None:
        """Load the embeddings bundled into a LoRA file (``bundle_emb.<name>.*``), as A1111/Forge do."""
        from safetensors import safe_open

        from .lora.formats.io import resolve_lora_path

        with safe_open(str(resolve_lora_path(path)), framework="pt") as f:
            has = any(k.startswith("bundle_emb.") for k in f.keys())
        if has:
            self.load_embedding(path)

    def set_loras(self, items: Iterable[tuple[str | os.PathLike[str], float]]) -> list[str]:
        """Use exactly these (file, weight) pairs; returns their adapter names in order.

        Files already loaded (same resolved path, unchanged on disk) only get their new weight;
        files no longer listed are removed from the models; adapters not loaded from files
        (e.g. a training adapter) are left alone.
        """
        wanted = []
        for path, weight in items:
            _check_number("weight", weight)
            wanted.append((_file_key(path), path, float(weight)))
        keep = {key for key, _, _ in wanted}
        for key, name in list(self._files.items()):
            if key not in keep:
                self.remove(name)
        names = []
        for key, path, weight in wanted:
            if key in self._files:
                self.set_weight(self._files[key], weight)
            else:
                self._files[key] = self.load_lora(path, weight)
            names.append(self._files[key])
        return names

    def use_adapter(self, name: str, weight: float = 1.0) -> None:
        """Preview an adapter that is already in the models (e.g. injected by training)."""
        _check_number("weight", weight)
        self._layerset = None  # the adapter may have been injected after the last look
        if name not in control.adapter_names(self._layers()):
            raise LoraError(
                f"No adapter named {name!r} in the models; present: {control.adapter_names(self._models) or 'none'}."
            )
        self._entries[name] = _Entry(float(weight), self._entries.get(name, _Entry(0, False)).from_file)

    def set_weight(self, name: str, weight: float) -> None:
        _check_number("weight", weight)
        if name not in self._entries:
            raise LoraError(f"No adapter {name!r} in this previewer; adapters: {list(self._entries) or 'none'}.")
        self._entries[name].weight = float(weight)

    def set_rank(self, name: str, rank: int | None) -> None:
        """Preview DyLoRA adapter ``name`` at its first ``rank`` components (``None``: full rank).

        For a DyLoRA run's own adapter or a DyLoRA file; the result equals the file
        ``sdlora export --rank`` writes. Not while merged.
        """
        from .lora.variants.dylora import check_dylora_file, set_active_rank

        if name not in self._entries:
            raise LoraError(f"No adapter {name!r} in this previewer; adapters: {list(self._entries) or 'none'}.")
        if self._merged:
            raise LoraError("Unmerge before changing an adapter's rank.")
        report = self.reports.get(name)
        if report is not None:
            check_dylora_file(report.path)
        set_active_rank(self._layers(), name, rank, attach=report is not None)

    def set_scale(self, scale: float) -> None:
        """Set the global multiplier (any finite float). Takes effect at the next generation."""
        _check_number("scale", scale)
        self._scale = float(scale)

    def remove(self, name: str) -> None:
        """Stop using an adapter; one loaded from a file is also removed from the models."""
        entry = self._entries.pop(name, None)
        if entry is None:
            raise LoraError(f"No adapter {name!r} in this previewer; adapters: {list(self._entries) or 'none'}.")
        self.reports.pop(name, None)
        self._files = {k: v for k, v in self._files.items() if v != name}
        if entry.from_file:
            control.delete(self._layers(), name)
            self._layerset = None
        if not self._entries:
            self._merged = False

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        """Generate with the base model only (adapters stay loaded)."""
        if self._merged:
            self.unmerge()
        self._enabled = False

    def merge(self) -> None:
        """Fold the current adapters at the current weights into the base weights (fastest generation).

        Later weight or scale changes re-merge layer by layer. Not for adapters being trained.
        """
        if not self._entries:
            raise LoraError("No adapter to merge.")
        if any(p.requires_grad for _, p in _adapter_params(self._layers(), self._entries)):
            raise LoraError("These adapters are being trained (their weights require grad); merging them is not allowed.")
        self._enabled = True
        self._apply()
        control.merge(self._layers(), list(self._entries))
        self._merged = True

    def unmerge(self) -> None:
        control.unmerge(self._layers())
        self._merged = False

    def apply(self) -> None:
        """Push the current weights/scale to the layers now (generation does this by itself)."""
        self._apply()

    def _apply(self) -> None:
        layers = self._layers()
        present = set(control.adapter_names(layers))
        missing = [n for n in self._entries if n not in present]
        if missing:
            raise LoraError(f"Adapter(s) {missing} are no longer in the models.")
        if not present:
            return
        if not self._enabled or not self._entries:
            control.disable(layers)
            return
        control.enable(layers)
        control.set_adapters(layers, {n: self._scale * e.weight for n, e in self._entries.items()})
        if self._merged:
            control.merge(layers, list(self._entries))

    # Generation -----------------------------------------------------------------------------------
    def _scheduler(self, name: str):
        display = resolve_scheduler_name(name)
        if display not in self._schedulers:
            self._schedulers[display] = make_scheduler(display, self._base_scheduler_config)
        return self._schedulers[display]

    def default_size(self) -> tuple[int, int]:
        """(width, height) the base model was made for."""
        size = int(self.unet.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))
        return size, size

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 7.0,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        scale: float | None = None,
        num_images: int = 1,
        output: Literal["pil", "np", "latent"] = "pil",
    ) -> Any:
        """Generate ``num_images`` images per prompt; image ``i`` uses seed ``seed + i``.

        ``scale`` (if given) becomes the previewer's scale, as :meth:`set_scale` would.
        ``output``: "pil" (list of PIL images), "np" (float array N x H x W x 3 in [0, 1]) or
        "latent" (tensor of latents, no VAE decode).
        """
        if scale is not None:
            self.set_scale(scale)
        if not isinstance(steps, int) or steps < 1:
            raise LoraError(f"steps must be a whole number >= 1, got {steps!r}.")
        _check_number("guidance", guidance)
        default_w, default_h = self.default_size()
        width, height = width or default_w, height or default_h
        multiple = int(getattr(self.pipe, "vae_scale_factor", 8))
        for label, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise LoraError(f"{label} must be a positive multiple of {multiple}, got {value!r}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = [
            torch.Generator("cpu").manual_seed(int(seed) + i) for _ in prompts for i in range(num_images)
        ]
        states = control.snapshot(self._layers())
        modes = [(m, m.training) for m in self._models]
        scheduler_before = self.pipe.scheduler
        try:
            for m in self._models:
                m.eval()
            self._apply()
            self.pipe.scheduler = self._scheduler(scheduler)
            result = self.pipe(
                prompt=prompts,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=float(guidance),
                width=width,
                height=height,
                num_images_per_prompt=num_images,
                generator=generators,
                output_type=output,
            )
        finally:
            self.pipe.scheduler = scheduler_before
            control.restore(states)
            for m, was_training in modes:
                m.train(was_training)
        return result.images

    def scale_grid(self, scales: Iterable[float], prompt: str | Sequence[str], **kwargs: Any) -> list[Any]:
        """One image per scale (in the order given), same seed and settings.

        The previewer's own scale is left unchanged. Pass the images with
        ``labels=[f"{s:g}" for s in scales]`` to :func:`image_grid` for a single picture.
        """
        kept = self._scale
        out = []
        try:
            for s in scales:
                out.append(self.generate(prompt, scale=s, **{**kwargs, "num_images": 1})[0])
        finally:
            self._scale = kept
        return out


def _adapter_params(models: Sequence[nn.Module], names: Iterable[str]):
    from .lora.variants import adapter_parameters

    wanted = list(names)
    for _, layer in control.tuner_layers(models):
        for name in wanted:
            yield from adapter_parameters(layer, name)  # type: ignore[arg-type]


def _file_key(path: str | os.PathLike[str]) -> tuple:
    """Identity of a file's current contents: resolved path, modification time, size."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat() if resolved.is_file() else None
    return (str(resolved), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)


def _check_number(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{label} must be a finite number, got {value!r}.")


def image_grid(
    images: Sequence["Image.Image"], labels: Sequence[str] | None = None, cols: int | None = None,
    *, min_side: int = 256,
) -> "Image.Image":
    """Tile images into one picture, with an optional caption strip under each image.

    Images smaller than ``min_side`` pixels (the demo model draws 64 px) are enlarged by a whole factor
    with nearest-neighbour sampling, so every pixel stays a sharp square and the labels, drawn in a
    font sized to the cell, stay legible. ``min_side=0`` keeps the images' own size.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise LoraError("No images to put in a grid.")
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    factor = max(1, math.ceil(min_side / min(w, h))) if min_side else 1
    w, h = w * factor, h * factor
    font_size = max(12, min(28, w // 10))
    font = ImageFont.load_default(size=font_size)
    strip = font_size + 14 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(img.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = str(labels[i])
            left, _, right, _ = draw.textbbox((0, 0), text, font=font)
            draw.text((x + max(2, (w - (right - left)) // 2), y + h + 6), text, fill="black", font=font)
    return grid


__all__ = [
    "DEFAULT_SCHEDULER",
    "Previewer",
    "image_grid",
    "make_scheduler",
    "resolve_scheduler_name",
    "scheduler_names",
]
