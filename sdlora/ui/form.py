"""Form values: the training form, generated from :meth:`TrainConfig.field_info`, and the parsing of
the other tabs' typed-in values (numbers, LoRA weights, grid scales, tables).

Main options are shown directly; all other options with ``ui=True`` go into the "Advanced"
accordion, grouped by section. Options that name server paths (base model, data and output
folders) are not free-text fields: the page picks them from lists the app controls.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import gradio as gr

from ..resources import CONFIGS_DIR
from ..train import ConfigError, TrainConfig
from .errors import UIError

#: Options the page sets itself (from lists and the dataset tab), never typed in as text.
PAGE_SET = ("pretrained_model_name_or_path", "output_name", "output_dir", "train_data_dir", "class_data_dir",
            "trigger_word")

#: Labels of the options; options not listed get their name in words ("sample_every_n_steps" ->
#: "Sample every N steps"). Errors name these labels, never the config keys.
LABELS = {
    "max_train_steps": "Steps",
    "network_dim": "Rank (network_dim)",
    "conv_dim": "Conv rank (conv_dim)",
    "learning_rate": "Learning rate (UNet)",
    "text_encoder_lr": "Text encoder learning rate",
    "resolution": "Resolution",
    "train_batch_size": "Batch size",
    "train_text_encoder": "Train text encoder",
    "class_prompt": "Class prompt",
    "with_prior_preservation": "Prior preservation",
    "network_preset": "Layers (network_preset)",
    "network_alpha": "Alpha (network_alpha)",
    "conv_alpha": "Conv alpha (conv_alpha)",
    "text_encoder_dim": "Text encoder rank",
    "unet_lr": "UNet learning rate",
    "text_encoder_2_lr": "Text encoder 2 learning rate (SDXL)",
    "lr_scheduler": "Learning-rate schedule",
    "lr_warmup_steps": "Warm-up steps",
    "loraplus_lr_ratio": "LoRA+ learning-rate ratio",
    "use_rslora": "rsLoRA scaling",
    "min_snr_gamma": "Min-SNR gamma",
    "max_grad_norm": "Gradient clipping norm",
    "network_type": "Method (network_type)",
    "min_bucket_reso": "Smallest bucket side",
    "max_bucket_reso": "Largest bucket side",
    "bucket_reso_steps": "Bucket step",
    "bucket_no_upscale": "No upscaling into buckets",
    "cache_latents_to_disk": "Keep the latent cache on disk",
    "save_last_n_checkpoints": "Checkpoints kept",
    "save_every_n_steps": "Checkpoint every N steps",
    "sample_every_n_steps": "Sample every N steps",
    "sample_steps": "Sampling steps of samples",
    "sample_guidance": "Guidance of samples",
    "log_with": "Also log to",
    "output_name": "Run name",
    "train_data_dir": "Dataset",
    "pretrained_model_name_or_path": "Base model",
    "trigger_word": "Trigger word",
    "num_class_images": "Number of class images",
    "flip_aug": "Flip augmentation",
    "enable_bucket": "Aspect-ratio buckets",
    "embedding_tokens": "Learned trigger tokens (0 = off)",
    "embedding_init": "Start tokens from word/phrase",
    "embedding_only": "Textual inversion only (no LoRA)",
    "embedding_lr": "Token learning rate",
    "embedding_stop_fraction": "Stop tokens after share of steps",
}

SECTION_TITLES = {
    "run": "Run", "data": "Data and captions", "dreambooth": "Prior preservation (DreamBooth)",
    "network": "Network", "optimizer": "Optimizer and schedule", "loss": "Loss", "saving": "Checkpoints and saving",
    "samples": "Samples during training", "model": "Model",
}

#: Presets: a shipped config file whose training options are applied (paths, names and the
#: resolution, which follows the base model, are left alone).
PRESETS = {
    "style": "style_sd15.toml",
    "subject": "dreambooth_sd15.toml",
}
PRESET_CHOICES = [("Style", "style"), ("Subject with prior preservation", "subject"), ("Custom", "custom")]
_PRESET_KEEP = set(PAGE_SET) | {"resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "seed"}


def field(name: str) -> dict[str, Any]:
    """The field description of one config option."""
    for f in TrainConfig.field_info():
        if f["name"] == name:
            return f
    raise ConfigError(name, "unknown option")


def form_fields() -> list[dict[str, Any]]:
    """The fields the form shows, in dataclass order."""
    return [f for f in TrainConfig.field_info() if f.get("ui", True) and f["name"] not in PAGE_SET]


#: Order of the main options on the page (rows of four); main options not listed follow.
MAIN_ORDER = ("max_train_steps", "network_dim", "conv_dim", "network_preset",
              "learning_rate", "text_encoder_lr", "train_batch_size", "resolution",
              "train_text_encoder", "with_prior_preservation", "class_prompt")


def main_fields() -> list[dict[str, Any]]:
    fields = [f for f in form_fields() if f["group"] == "main"]
    rank = {name: i for i, name in enumerate(MAIN_ORDER)}
    return sorted(fields, key=lambda f: rank.get(f["name"], len(rank)))


def advanced_fields() -> list[dict[str, Any]]:
    return [f for f in form_fields() if f["group"] != "main"]


def label(name: str) -> str:
    """The label a person sees for a config option."""
    if name in LABELS:
        return LABELS[name]
    words = name.replace("_", " ").replace(" reso", " resolution").replace(" n ", " N ")
    return words[:1].upper() + words[1:]


def in_words(text: str) -> str:
    """A message with the config keys it names replaced by their labels ("max_train_steps" -> "Steps")."""
    import re

    names = sorted((f.name for f in dataclasses.fields(TrainConfig)), key=len, reverse=True)
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: f"'{label(m.group(1))}'", text)


def _label(info: dict[str, Any]) -> str:
    return label(info["name"])


def bounds(info: dict[str, Any]) -> tuple[float | None, float | None]:
    """(smallest, largest) value of a numeric option: the config field's own range (the CLI checks the same)."""
    return info.get("min"), info.get("max")


def FieldNumber(*, minimum: float | None = None, maximum: float | None = None,  # noqa: N802 - used like a class
                **kwargs: Any) -> gr.Number:
    """A ``gr.Number`` for a field with a range (``minimum``..``maximum``, kept as ``.bounds``).

    The range is checked by the handler that reads the field (:func:`settings_from_form` through the
    config, :func:`parse_int`, :func:`parse_float`), whose message names the field's label, and shown in
    the field's help where it has one. gradio's own check is left off: its message ("Value 7 is greater
    than maximum value 5.") names no field, and a replaced check does not survive gradio rebuilding a
    component from its class when an event updates it.
    """
    number = gr.Number(**kwargs)
    number.bounds = (minimum, maximum)  # type: ignore[attr-defined]
    return number


def _num(x: float) -> str:
    """A bound as people write it: 1000000 -> "1,000,000", 0.003 -> "0.003"."""
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:g}"


def _range(lo: float | None, hi: float | None, exclusive: bool = False) -> str:
    if exclusive and lo is not None:
        return f"more than {_num(lo)}" + (f", up to {_num(hi)}" if hi is not None else "")
    if lo is not None and hi is not None:
        return f"{_num(lo)} to {_num(hi)}"
    return f"at least {_num(lo)}" if lo is not None else f"at most {_num(hi)}"


def display_value(info: dict[str, Any], value: Any) -> Any:
    """A config value as the form component shows it."""
    if info["type"] == "list":
        return "\n".join(str(v) for v in value or [])
    if info["type"] == "dict":
        return json.dumps(value or {})
    return value


def make_component(info: dict[str, Any]) -> gr.components.Component:
    """A form component for one field: checkbox, dropdown, number or text, with the help as info."""
    name, typ, default = info["name"], info["type"], info["default"]
    common = dict(label=_label(info), info=info["help"] + _range_text(info), elem_id=f"cfg-{name}", key=f"cfg-{name}")
    if typ == "bool":
        # Wider than gradio's 160 px least width: on a phone a checkbox and its help get a row of their own.
        return gr.Checkbox(value=bool(default), min_width=220, **common)
    if info.get("choices"):
        # Custom values pass to the config's own check, whose message names the option.
        choices = [(c if c else "(none)", c) for c in info["choices"]]
        return gr.Dropdown(choices=choices, value=default, allow_custom_value=True, **common)
    if typ in ("int", "float"):
        lo, hi = bounds(info)
        if info.get("min_exclusive"):
            lo = None  # "> 0": the config's own check says so
        step = 1 if typ == "int" else _float_step(default)
        return FieldNumber(value=default, step=step, minimum=lo, maximum=hi, **common)
    if typ == "list":
        return gr.Textbox(value=display_value(info, default), lines=2, max_lines=8,
                          placeholder="one a line", **common)
    return gr.Textbox(value=display_value(info, default), min_width=220, **common)


def _range_text(info: dict[str, Any]) -> str:
    lo, hi = bounds(info)
    if info["type"] not in ("int", "float") or (lo is None and hi is None):
        return ""
    return f" ({_range(lo, hi, bool(info.get('min_exclusive')))})"


def _float_step(default: float) -> float:
    if not default:
        return 0.01
    return 10 ** math.floor(math.log10(abs(default)))


def parse_value(info: dict[str, Any], value: Any) -> Any:
    """A form component's value as the config expects it; a value that makes no sense is a ConfigError."""
    name, typ = info["name"], info["type"]
    if typ == "bool":
        return bool(value)
    if typ in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError(name, "is empty; enter a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(name, f"{value!r} is not a finite number")
        lo, hi = bounds(info)
        if (lo is not None and (number < lo or (info.get("min_exclusive") and number <= lo))) or (
                hi is not None and number > hi):
            raise ConfigError(name, f"{number:g} is out of range; use "
                                    f"{_range(lo, hi, bool(info.get('min_exclusive')))}")
        if typ == "int":
            if number != int(number):
                raise ConfigError(name, f"{value!r} is not a whole number")
            return int(number)
        return number
    if typ == "list":
        if isinstance(value, list):
            return [str(v) for v in value]
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if typ == "dict":
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError:
            raise ConfigError(name, "is not a JSON object") from None
        if not isinstance(parsed, dict):
            raise ConfigError(name, "is not a JSON object")
        return parsed
    return "" if value is None else str(value)


def settings_from_form(values: dict[str, Any]) -> dict[str, Any]:
    """Config options from the form's values (only the fields the form shows)."""
    fields = {f["name"]: f for f in form_fields()}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(name, "is not an option of the form")
        out[name] = parse_value(fields[name], value)
    return out


def configs_dir() -> Path:
    return CONFIGS_DIR


def preset_values(preset: str) -> dict[str, Any]:
    """Form values of a preset (every shown field: the preset's value where it sets one, else the default)."""
    if preset not in PRESETS:
        return {}
    path = configs_dir() / PRESETS[preset]
    if not path.is_file():
        return {}
    cfg = TrainConfig.from_toml(path, validate=False).to_dict()
    defaults = TrainConfig().to_dict()
    out: dict[str, Any] = {}
    for info in form_fields():
        name = info["name"]
        if name in _PRESET_KEEP:
            continue
        out[name] = display_value(info, cfg.get(name, defaults[name]))
    return out


def available_presets() -> list[tuple[str, str]]:
    """Preset choices whose config file ships with the project, plus "custom"."""
    return [(label, value) for label, value in PRESET_CHOICES
            if value == "custom" or (configs_dir() / PRESETS[value]).is_file()]


# ---- values typed into the other tabs ---------------------------------------------------------------
DEFAULT_GRID = "0, 0.25, 0.5, 0.75, 1, 1.25"
MAX_SEED = 2**32 - 1
MAX_PREVIEW_STEPS = 150
MAX_PREVIEW_SIZE = 2048
#: Largest rank of an export (the config's own largest network_dim).
MAX_RANK = 1024


def parse_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    """A whole number from a form field, within ``lo``..``hi``; otherwise a message naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name}: {value!r} is not a number.", title="Invalid value") from None
    if not math.isfinite(number) or number != int(number):
        raise UIError(f"{name}: {value!r} is not a whole number.", title="Invalid value")
    n = int(number)
    if n < lo or (hi is not None and n > hi):
        raise UIError(f"{name}: {n} is out of range; use {_range(lo, hi)}.", title="Invalid value")
    return n


def parse_float(value: Any, name: str, lo: float, hi: float, title: str = "Invalid value") -> float:
    """A number from a form field, within ``lo``..``hi``; otherwise a message naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name}: {value!r} is not a number.", title=title) from None
    if not lo <= number <= hi:
        raise UIError(f"{name}: {number:g} is out of range; use {_range(lo, hi)}.", title=title)
    return number


def parse_weight(value: Any, lora: str) -> float:
    """The weight of one LoRA in a mix (-4 to 4)."""
    return parse_float(value, f"The weight of {lora}", -4.0, 4.0, title="LoRA weight")


def parse_scales(text: str | None) -> list[float]:
    """LoRA scales of a grid, written as ``0, 0.5, 1`` (1 to 12 numbers, each -4 to 4)."""
    values = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise UIError(f"Grid scales: {part!r} is not a number; write e.g. {DEFAULT_GRID}.",
                          title="Scale grid") from None
        if not -4 <= v <= 4:
            raise UIError(f"Grid scales: {v:g} is outside -4 to 4.", title="Scale grid")
        values.append(v)
    if not values or len(values) > 12:
        raise UIError(f"Grid scales: give 1 to 12 numbers, e.g. {DEFAULT_GRID}.", title="Scale grid")
    return values


def table_rows(value: Any) -> list[list[Any]]:
    """Rows of a Dataframe value as the API or the page sends it (list of lists, dict or DataFrame)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.get("data") or [])
    if hasattr(value, "values") and hasattr(value, "columns"):
        return value.values.tolist()
    return list(value)


def base_defaults(resolution: int, family: str | None = None) -> dict[str, Any]:
    """Form values that suit a base model of ``family`` and native size ``resolution``: the training
    options of :func:`sdlora.train.base_settings` and the preview size (``width``, ``height``)."""
    from ..train import base_settings

    values = base_settings(family, resolution)
    return dict(values, width=values["resolution"], height=values["resolution"])
