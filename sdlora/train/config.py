"""``TrainConfig``: the one source of truth for TOML files, ``--set key=value`` overrides and the UI form.

Option names follow kohya sd-scripts where it has an option for the same thing (``network_dim``,
``network_alpha``, ``conv_dim``, ``learning_rate``, ``text_encoder_lr``, ``max_train_steps``,
``min_snr_gamma``, ``noise_offset``, ``caption_dropout_rate``, ``shuffle_caption``, ``keep_tokens``, ...),
so a kohya user finds what they know. Unknown keys and bad values raise :class:`ConfigError`, whose
message names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..resources import resolve_config, resolve_data_dir

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy")
PRECISIONS = ("auto", "no", "fp16", "bf16")
PRESETS = ("attn", "attn-mlp", "full")
SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras")
SAVE_PRECISIONS = ("float", "fp16", "bf16")


class ConfigError(ValueError):
    """A configuration problem; ``key`` names the option at fault."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _f(default: Any = dataclasses.MISSING, *, help: str, group: str = "advanced", section: str = "",
       choices: tuple | None = None, min: float | None = None, max: float | None = None,
       min_exclusive: bool = False, factory: Any = None, ui: bool = True) -> Any:
    meta = dict(help=help, group=group, section=section, choices=choices, min=min, max=max,
                min_exclusive=min_exclusive, ui=ui)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run. See ``configs/*.toml`` for commented examples."""

    # --- model -----------------------------------------------------------------------------
    pretrained_model_name_or_path: str = _f(
        "demo", group="main", section="model",
        help="Base model: 'demo' (bundled), 'tiny' (test model), a diffusers folder, a .safetensors/.ckpt file or a hub id.")
    # --- run -------------------------------------------------------------------------------
    output_name: str = _f("my-style", group="main", section="run", help="Run name; the run directory is output_dir/output_name.")
    output_dir: str = _f("runs", section="run", help="Folder that holds run directories.")
    seed: int = _f(42, section="run", min=0, max=2**32 - 1, help="Random seed (noise, timesteps, data order, init).")
    # --- data ------------------------------------------------------------------------------
    train_data_dir: str = _f("", group="main", section="data",
                             help="Folder of training images (+ same-name .txt captions); kohya 'N_name' subfolders set repeats.")
    trigger_word: str = _f("", group="main", section="data", help="Word that calls up the style; used by caption_template.")
    caption_template: str = _f("{caption}, in {trigger} style", section="data",
                               help="How a caption is built: {caption} = the .txt text, {trigger} = trigger_word.")
    caption_extension: str = _f(".txt", section="data", help="Extension of caption files next to the images.")
    shuffle_caption: bool = _f(False, section="data", help="Shuffle comma-separated tags of each caption every step.")
    keep_tokens: int = _f(0, section="data", min=0, max=75, help="Number of leading tags kept in place when shuffling.")
    caption_dropout_rate: float = _f(0.0, section="data", min=0.0, max=1.0, help="Share of steps that train with an empty caption.")
    resolution: int = _f(512, group="main", section="data", min=64, max=4096, help="Training resolution (pixels per side; multiple of 8).")
    enable_bucket: bool = _f(True, section="data", help="Aspect-ratio bucketing instead of square crops.")
    min_bucket_reso: int = _f(256, section="data", min=64, max=4096, help="Smallest bucket side in pixels.")
    max_bucket_reso: int = _f(1024, section="data", min=64, max=8192, help="Largest bucket side in pixels.")
    bucket_reso_steps: int = _f(64, section="data", min=8, max=1024, help="Bucket side step in pixels (multiple of 8).")
    bucket_no_upscale: bool = _f(False, section="data", help="Never upscale small images to fill a bucket.")
    random_crop: bool = _f(False, section="data", help="Random instead of centre crop (disables latent caching).")
    flip_aug: bool = _f(False, section="data", help="Random horizontal flips (both flips are cached).")
    cache_latents: bool = _f(True, section="data", help="Encode images with the VAE once instead of every step.")
    cache_latents_to_disk: bool = _f(False, section="data", help="Keep the latent cache in the run directory for later runs.")
    # --- DreamBooth prior preservation ------------------------------------------------------
    with_prior_preservation: bool = _f(False, group="main", section="dreambooth",
                                       help="DreamBooth prior preservation: also train on class images.")
    class_prompt: str = _f("", group="main", section="dreambooth", help="Prompt of the class images, e.g. 'a photo of a dog'.")
    class_data_dir: str = _f("", section="dreambooth", help="Folder of class images; missing ones are generated with the base model.")
    num_class_images: int = _f(100, section="dreambooth", min=0, max=10_000, help="How many class images to use (generated when missing).")
    prior_loss_weight: float = _f(1.0, section="dreambooth", min=0.0, max=100.0, help="Weight of the prior-preservation loss.")
    # --- network ---------------------------------------------------------------------------
    network_type: str = _f("lora", section="network", help="Adapter method (see `sdlora variants`).")
    network_preset: str = _f("attn-mlp", group="main", section="network", choices=PRESETS,
                             help="Which layers get adapters: attn, attn-mlp (+ feed-forward, proj_in/out) or full (+ convs).")
    network_dim: int = _f(16, group="main", section="network", min=1, max=1024, help="LoRA rank of Linear layers.")
    network_alpha: float = _f(16.0, section="network", min=0.0, max=4096.0, min_exclusive=True, help="LoRA alpha; scale = alpha / rank.")
    conv_dim: int = _f(8, group="main", section="network", min=1, max=1024, help="LoRA rank of Conv2d layers (preset 'full').")
    conv_alpha: float = _f(4.0, section="network", min=0.0, max=4096.0, min_exclusive=True, help="LoRA alpha of Conv2d layers.")
    network_dropout: float = _f(0.0, section="network", min=0.0, max=1.0, help="Dropout on the adapter input.")
    use_rslora: bool = _f(False, section="network", help="rsLoRA scaling alpha / sqrt(rank) instead of alpha / rank.")
    train_text_encoder: bool = _f(True, group="main", section="network", help="Also train a LoRA on the text encoder.")
    text_encoder_dim: int = _f(0, section="network", min=0, max=1024, help="Text-encoder LoRA rank (0 = network_dim).")
    text_encoder_alpha: float = _f(0.0, section="network", min=0.0, max=4096.0, help="Text-encoder LoRA alpha (0 = network_alpha).")
    loraplus_lr_ratio: float = _f(0.0, section="network", min=0.0, max=1000.0, help="LoRA+: lr of B = ratio x lr of A (0 = off, 16 suggested).")
    network_args: dict = _f(factory=dict, section="network", ui=False, help="Extra options of the adapter method (TOML table).")
    # --- trigger tokens that learn (textual inversion / pivotal tuning) ------------------------
    embedding_tokens: int = _f(0, section="network", min=0, max=32,
                               help="Learn N new tokens <s0><s1>... where {trigger} goes in captions (0 = off).")
    embedding_init: str = _f("", section="network",
                             help="Word or phrase the new tokens start from (empty = random, scaled like real tokens).")
    embedding_only: bool = _f(False, section="network",
                              help="Textual inversion: train only the new tokens, no LoRA (else pivotal: both).")
    embedding_lr: float = _f(1e-3, section="optimizer", min=0.0, max=1.0, min_exclusive=True,
                             help="Learning rate of the new token embeddings.")
    embedding_stop_fraction: float = _f(1.0, section="optimizer", min=0.0, max=1.0, min_exclusive=True,
                                        help="Stop training the new tokens after this share of the steps (1 = all).")
    # --- optimisation ----------------------------------------------------------------------
    max_train_steps: int = _f(1000, group="main", section="optimizer", min=1, max=1_000_000, help="Number of optimizer steps.")
    train_batch_size: int = _f(1, group="main", section="optimizer", min=1, max=4096, help="Images per step (per process).")
    gradient_accumulation_steps: int = _f(1, section="optimizer", min=1, max=1024, help="Micro-batches per optimizer step.")
    learning_rate: float = _f(1e-4, group="main", section="optimizer", min=0.0, max=1.0, help="Base learning rate (UNet unless unet_lr is set).")
    unet_lr: float = _f(0.0, section="optimizer", min=0.0, max=1.0, help="UNet learning rate (0 = learning_rate).")
    text_encoder_lr: float = _f(5e-5, group="main", section="optimizer", min=0.0, max=1.0,
                                help="Text-encoder learning rate (SDXL: both encoders unless text_encoder_2_lr is set).")
    text_encoder_2_lr: float = _f(0.0, section="optimizer", min=0.0, max=1.0,
                                  help="SDXL only: learning rate of text encoder 2, OpenCLIP bigG (0 = text_encoder_lr).")
    optimizer_type: str = _f("AdamW", section="optimizer", choices=OPTIMIZERS, help="AdamW, AdamW8bit (CUDA) or Prodigy.")
    optimizer_args: dict = _f(factory=dict, section="optimizer", ui=False, help="Extra optimizer keyword arguments (TOML table).")
    weight_decay: float = _f(1e-2, section="optimizer", min=0.0, max=10.0, help="Weight decay.")
    lr_scheduler: str = _f("constant", section="optimizer", choices=SCHEDULERS, help="Learning-rate schedule.")
    lr_warmup_steps: int = _f(0, section="optimizer", min=0, max=1_000_000, help="Warm-up steps of the schedule.")
    max_grad_norm: float = _f(1.0, section="optimizer", min=0.0, max=1000.0, help="Gradient clipping norm (0 = off).")
    mixed_precision: str = _f("auto", section="optimizer", choices=PRECISIONS,
                              help="auto picks what is fast here (fp32 on CPUs without native bf16).")
    gradient_checkpointing: bool = _f(False, section="optimizer", help="Recompute activations to save memory.")
    speed_mode: str = _f("auto", section="optimizer", choices=("auto", "off"),
                         help="CPU fast paths for frozen layers and attention (auto: on where this PyTorch has the "
                              "oneDNN ops they use, with a fall back to the plain path; off: the plain path).")
    # --- loss ------------------------------------------------------------------------------
    min_snr_gamma: float = _f(0.0, section="loss", min=0.0, max=100.0, help="Min-SNR-gamma loss weighting (0 = off, 5 suggested).")
    noise_offset: float = _f(0.0, section="loss", min=0.0, max=1.0, help="Noise offset (e.g. 0.05) for darker/brighter images.")
    # --- checkpoints, samples, logs ---------------------------------------------------------
    save_every_n_steps: int = _f(100, section="saving", min=0, max=1_000_000, help="Checkpoint every N steps (0 = only at the end and on stop).")
    save_last_n_checkpoints: int = _f(3, section="saving", min=1, max=1000, help="How many checkpoints to keep.")
    save_precision: str = _f("float", section="saving", choices=SAVE_PRECISIONS, help="Precision of the exported LoRA file.")
    sample_every_n_steps: int = _f(0, section="samples", min=0, max=1_000_000, help="Generate samples every N steps (0 = only at the end).")
    sample_at_end: bool = _f(True, section="samples", help="Generate samples when training ends (off: the run ends with its LoRA file, as kohya's does without sample options).")
    sample_prompts: list = _f(factory=list, section="samples", help="Prompts for samples; {trigger} is replaced.")
    sample_negative_prompt: str = _f("", section="samples", help="Negative prompt of the samples.")
    sample_seed: int = _f(1234, section="samples", min=0, max=2**32 - 1, help="Seed of the samples (fixed, so samples are comparable).")
    sample_steps: int = _f(20, section="samples", min=1, max=1000, help="Sampling steps of the samples.")
    sample_guidance: float = _f(7.0, section="samples", min=0.0, max=50.0, help="Guidance scale of the samples.")
    sample_sampler: str = _f("euler_a", section="samples", choices=SAMPLERS, help="Sampler of the samples.")
    log_with: str = _f("", section="saving", choices=("", "tensorboard"), help="Also log to TensorBoard (run_dir/logs).")

    # ------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.output_name

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr or self.learning_rate

    @classmethod
    def field_info(cls) -> list[dict]:
        """Field descriptions for UIs: name, type name, default, help, group, section, choices, bounds."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(dict(name=f.name, type=hints[f.name].__name__, default=default, **f.metadata))
        return out

    # ---- building -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, validate: bool = True) -> "TrainConfig":
        """Build from a (possibly nested-by-section) dict. Unknown keys are errors."""
        flat = _flatten(data)
        known = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in flat.items():
            if key not in known:
                raise ConfigError(key, f"unknown option. Known options: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(key, value, hints[key])
        if isinstance(kwargs.get("train_data_dir"), str):
            try:  # "style:NAME" names a bundled style set
                kwargs["train_data_dir"] = resolve_data_dir(kwargs["train_data_dir"])
            except FileNotFoundError as e:
                raise ConfigError("train_data_dir", str(e)) from None
        cfg = cls(**kwargs)
        if validate:
            cfg.validate()
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                  *, validate: bool = True) -> "TrainConfig":
        """Read a TOML file (optional) and apply ``key=value`` overrides, then validate."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                p = resolve_config(path)  # a file, or a bundled config by name (sdlora/configs)
            except FileNotFoundError as e:
                raise ConfigError("config", str(e)) from None
            try:
                data = _flatten(tomllib.loads(p.read_text(encoding="utf-8")))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError("config", f"{p} is not valid TOML: {e}") from None
        for item in overrides or []:
            key, value = parse_override(item)
            data[key] = value
        return cls.from_dict(data, validate=validate)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some options changed (validated)."""
        data = self.to_dict()
        data.update(changes)
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        sections: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            sections.setdefault(f.metadata["section"], {})[f.name] = getattr(self, f.name)
        return tomli_w.dumps(sections)

    # ---- validation ---------------------------------------------------------------------
    def validate(self, *, check_paths: bool = True) -> "TrainConfig":
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            m = f.metadata
            _check_type(f.name, v, hints[f.name])
            if m["choices"] is not None and v not in m["choices"]:
                raise ConfigError(f.name, f"{v!r} is not allowed; choose one of: {', '.join(map(repr, m['choices']))}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f.name, f"{v!r} is not a finite number")
                lo, hi = m["min"], m["max"]
                if lo is not None and (v < lo or (m["min_exclusive"] and v <= lo)):
                    bound = f"> {lo:g}" if m["min_exclusive"] else f">= {lo:g}"
                    raise ConfigError(f.name, f"{v!r} is out of range; must be {bound}")
                if hi is not None and v > hi:
                    raise ConfigError(f.name, f"{v!r} is out of range; must be <= {hi:g}")
        for key in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, key) % 8:
                raise ConfigError(key, f"{getattr(self, key)} is not a multiple of 8")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError("min_bucket_reso", f"{self.min_bucket_reso} is larger than max_bucket_reso {self.max_bucket_reso}")
        if "{caption}" not in self.caption_template and "{trigger}" not in self.caption_template:
            raise ConfigError("caption_template", "must contain {caption} and/or {trigger}")
        from ..lora.variants import method_names  # registry of adapter methods

        names = method_names()
        if self.network_type not in names:
            raise ConfigError("network_type", f"{self.network_type!r} is not a known method; choose one of: {', '.join(names)}")
        from ..paths import safe_name

        if len(self.output_name) > 128:
            raise ConfigError("output_name", f"is {len(self.output_name)} characters long; use at most 128")
        if not self.output_name or self.output_name.startswith("."):
            raise ConfigError("output_name", f"{self.output_name!r} must not be empty or start with '.'")
        if safe_name(self.output_name) != self.output_name:
            raise ConfigError("output_name", f"{self.output_name!r} may only contain letters, digits, '-', '_' and '.'"
                              f" (try {safe_name(self.output_name)!r})")
        if self.log_with == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                raise ConfigError("log_with", "tensorboard is not installed: pip install tensorboard, or set log_with = \"\"")
        if self.embedding_tokens:
            if "{trigger}" not in self.caption_template:
                raise ConfigError("embedding_tokens", f"needs {{trigger}} in caption_template (now {self.caption_template!r}):"
                                  " the new tokens go where the trigger goes")
            if self.embedding_stop_fraction * self.max_train_steps < 1:
                raise ConfigError("embedding_stop_fraction", f"{self.embedding_stop_fraction:g} of {self.max_train_steps} "
                                  "steps is less than one step; raise it")
        elif self.embedding_only:
            raise ConfigError("embedding_only", "needs embedding_tokens > 0 (the tokens to train instead of a LoRA)")
        if self.embedding_init.strip() and not self.embedding_tokens:
            raise ConfigError("embedding_init", "is only used with embedding_tokens > 0")
        if self.with_prior_preservation and not self.class_prompt.strip():
            raise ConfigError("class_prompt", "is required when with_prior_preservation is on")
        if check_paths:
            if not self.train_data_dir:
                raise ConfigError("train_data_dir", "is required: the folder with your training images")
            if not Path(self.train_data_dir).is_dir():
                raise ConfigError("train_data_dir", f"folder not found: {self.train_data_dir}")
        return self


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as TOML when it parses, else as a string."""
    if "=" not in item:
        raise ConfigError(item, "overrides must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Sections of a TOML file are only for reading; options are unique across sections."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in names:
            flat.update(_flatten(v))
        else:
            flat[k] = v
    return flat


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ is list and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = [value] if value else []
        return parsed
    return value


def _check_type(key: str, value: Any, typ: Any) -> None:
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(key, f"{value!r} has the wrong type; expected {typ.__name__}")


def lora_spec(cfg: TrainConfig):
    """The adapter settings of a run, from the config's kohya-named options."""
    from ..lora import LoraSpec

    options = dict(cfg.network_args)
    if cfg.loraplus_lr_ratio:
        options["loraplus_lr_ratio"] = cfg.loraplus_lr_ratio
    return LoraSpec(method=cfg.network_type, preset=cfg.network_preset, rank=cfg.network_dim, alpha=cfg.network_alpha,
                    conv_rank=cfg.conv_dim if cfg.network_preset == "full" else None,
                    conv_alpha=cfg.conv_alpha if cfg.network_preset == "full" else None,
                    text_encoder=cfg.train_text_encoder, text_encoder_rank=cfg.text_encoder_dim or None,
                    text_encoder_alpha=cfg.text_encoder_alpha or None, dropout=cfg.network_dropout,
                    rslora=cfg.use_rslora, options=options)


def learning_rates(cfg: TrainConfig) -> dict[str, float | None]:
    """The adapter's learning rates by part (keyword arguments of ``LoraAdapter.param_groups``)."""
    return {"unet_lr": cfg.effective_unet_lr, "text_encoder_lr": cfg.text_encoder_lr,
            "text_encoder_2_lr": cfg.text_encoder_2_lr or None}


def embedding_token_strings(cfg: TrainConfig) -> list[str]:
    """The new tokens of a run (``<s0>``, ``<s1>``, ...: the convention of diffusers' advanced DreamBooth-LoRA
    scripts); empty when the run learns none."""
    return [f"<s{i}>" for i in range(cfg.embedding_tokens)]


def caption_trigger(cfg: TrainConfig) -> str:
    """What ``{trigger}`` becomes in captions and sample prompts: the new tokens when the run learns them
    (``<s0><s1>``), else the trigger word."""
    return "".join(embedding_token_strings(cfg)) if cfg.embedding_tokens else cfg.trigger_word.strip()


def embedding_name(cfg: TrainConfig) -> str:
    """The name of a run's embedding in other tools: A1111/Forge and ComfyUI call an embedding by its file
    name, and a bundled one by its ``bundle_emb.<name>`` key. The trigger word when it is one plain word,
    else the run name."""
    import re

    word = cfg.trigger_word.strip()
    return word if re.fullmatch(r"[A-Za-z0-9_-]+", word or "") else cfg.output_name
