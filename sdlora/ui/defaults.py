"""What the page starts with, per base model: the training form's values, the trigger word and the
Preview tab's prompt and size.

A first-time user trains with the form as it comes, so the defaults must show a style on the chosen
base. The "Style" preset is the shipped style config of the base's kind: ``demo_style.toml`` on the
bundled demo model (the values that make its outline style appear), ``style_sdxl.toml`` on SDXL and
``style_sd15.toml`` on SD 1.x / 2.x. Below a preset lie the base's own settings
(:func:`sdlora.train.base_settings`: its native size, buckets and learning rates) and below those the
config's defaults.
"""

from __future__ import annotations

import math
import tomllib
from typing import Any

from ..resources import CONFIGS_DIR
from ..train import TrainConfig, base_settings
from . import form

#: Preset -> config file, by kind of base ("demo", "sdxl", or "sd" for SD 1.x / 2.x and others).
PRESET_FILES: dict[str, dict[str, str]] = {
    "style": {"demo": "demo_style.toml", "sdxl": "style_sdxl.toml", "sd": "style_sd15.toml"},
    "subject": {"demo": "dreambooth_sd15.toml", "sdxl": "dreambooth_sd15.toml", "sd": "dreambooth_sd15.toml"},
}
DEFAULT_PRESET = "style"
#: Options a preset never sets: paths and names come from the page's lists, the seed stays.
_NEVER = set(form.PAGE_SET) | {"seed"}
#: Options that follow the base's native size; a preset made for one base (the demo model's) sets them too.
SIZE_FIELDS = ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "enable_bucket")
#: The trigger word each bundled style set was made for (``demo_style.toml`` names them).
STYLE_TRIGGERS = {"outline": "outlined", "pastel": "pastelish", "stripes": "stripey"}
#: What the Preview tab draws by default: something the base knows how to draw (the demo model only
#: knows coloured shapes on plain backgrounds, and none of its training captions is this one).
PREVIEW_SUBJECTS = {"demo": "a green circle on a black background", "sd": "a house by a lake",
                    "sdxl": "a house by a lake"}
CAPTION_TEMPLATE = "{caption}, in {trigger} style"


def base_kind(choice: Any) -> str:
    """"demo", "sdxl" or "sd" for a :class:`~sdlora.ui.context.BaseChoice` (None: "sd")."""
    from .context import DEMO_SPEC

    if choice is None:
        return "sd"
    if choice.value == DEMO_SPEC:
        return "demo"
    return "sdxl" if choice.family == "sdxl" else "sd"


def file_options(name: str) -> dict[str, Any]:
    """The options a shipped config file sets itself (sections flattened), as the config reads them."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        return {}
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    cfg = TrainConfig.from_dict(flat, validate=False).to_dict()
    return {k: cfg[k] for k in flat if k in cfg}


def preset_file(preset: str, choice: Any) -> str | None:
    files = PRESET_FILES.get(preset)
    return files.get(base_kind(choice)) if files else None


def training_values(choice: Any, preset: str = DEFAULT_PRESET) -> dict[str, Any]:
    """Config values of every option for a base and a preset ("custom": the config's defaults), and
    the trigger word (``trigger_word``) the preset was made with."""
    values = TrainConfig().to_dict()
    resolution = (choice.resolution if choice is not None else None) or 512
    values.update(base_settings(choice.family if choice is not None else None, resolution))
    name = preset_file(preset, choice)
    if name:
        own_base = name == PRESET_FILES["style"]["demo"]
        for key, value in file_options(name).items():
            if key in _NEVER and key != "trigger_word":
                continue
            if key in SIZE_FIELDS and not own_base:
                continue
            values[key] = value
    return values


def form_values(choice: Any, preset: str = DEFAULT_PRESET) -> dict[str, Any]:
    """What the training form shows for a base and a preset (every form field, as the component shows it)."""
    values = training_values(choice, preset)
    return {info["name"]: form.display_value(info, values[info["name"]]) for info in form.form_fields()}


def trigger_word(choice: Any, preset: str = DEFAULT_PRESET) -> str:
    return str(training_values(choice, preset).get("trigger_word") or "")


def preview_prompt(choice: Any, trigger: str, template: str = CAPTION_TEMPLATE) -> str:
    """The Preview tab's prompt for a base: its subject in the LoRA's caption template and trigger word."""
    subject = PREVIEW_SUBJECTS[base_kind(choice)]
    if not (trigger or "").strip():
        return subject
    if "{caption}" not in template:
        template = CAPTION_TEMPLATE
    return template.replace("{caption}", subject).replace("{trigger}", trigger.strip())


def is_default_prompt(prompt: str | None) -> bool:
    """Whether a prompt is one the page wrote (empty, or a base's default subject), not the user's own."""
    text = (prompt or "").strip()
    return not text or any(text.startswith(s) for s in PREVIEW_SUBJECTS.values())


def page_defaults(choice: Any, preset: str = DEFAULT_PRESET) -> dict[str, Any]:
    """Everything the page sets for a base: the form's values, ``trigger_word`` and the Preview tab's
    ``prompt``, ``width`` and ``height``."""
    out = form_values(choice, preset)
    trigger = trigger_word(choice, preset)
    size = form.base_defaults((choice.resolution if choice is not None else None) or 512,
                              choice.family if choice is not None else None)
    out.update(trigger_word=trigger, prompt=preview_prompt(choice, trigger), width=size["width"],
               height=size["height"])
    return out


def same_value(a: Any, b: Any) -> bool:
    """Whether two form values are the same setting (numbers compared as numbers, text without outer spaces)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) if isinstance(a, bool) and isinstance(b, bool) else False
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return str(a if a is not None else "").strip() == str(b if b is not None else "").strip()
    return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)


def follow_base(current: dict[str, Any], applied: dict[str, Any] | None, new: dict[str, Any],
                keys: Any = None) -> dict[str, Any]:
    """The values to change when the base (or the preset) changes: each key of ``new`` whose current
    value is still the one the page set last (``applied``), so the user's own edits stay. ``keys``
    limits the keys considered."""
    applied = applied or {}
    out = {}
    for key, value in new.items():
        if keys is not None and key not in keys:
            continue
        if key not in current:
            continue
        if key in applied and not same_value(current[key], applied[key]):
            continue  # the user's own value
        if not same_value(current[key], value):
            out[key] = value
    return out
