"""Loading the Stable Diffusion base model: hub id, diffusers folder, single file, tiny or demo model.

``load_base(spec)`` accepts

* ``None`` or ``"demo"``: the bundled demo model, a diffusers folder at :data:`DEFAULT_BASE`;
* ``"tiny"``: :func:`sdlora.models.tiny.build_tiny_pipeline` (random weights, for tests);
* ``"tiny-sdxl"``: :func:`sdlora.models.tiny.build_tiny_sdxl_pipeline` (random weights, 64 px);
* a diffusers folder (with ``model_index.json``);
* a ``.safetensors`` / ``.ckpt`` file in the original A1111 / LDM / SGM layout (see
  :mod:`sdlora.models.single_file`; loaded offline with shipped configs and tokenizers);
* a Hugging Face hub id (``owner/name``), taken from the local HF cache; when it is not there and
  downloading is off or impossible, :class:`ModelLoadError` says what to download and where to
  put it.

SD 1.x, SD 2.x (including v-prediction 768-v) and SDXL (including v-prediction fine-tunes) load;
SD 1.x/2.x as a ``StableDiffusionPipeline``, SDXL as a ``StableDiffusionXLPipeline`` (two text
encoders and tokenizers; :class:`BaseModel` gives both). SD 3, FLUX, Stable Cascade and other
families are recognised and refused with a message naming them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..resources import DEMO_MODEL
from .single_file import (
    FAMILY_NAMES,
    PREDICTION_TYPES,
    SINGLE_FILE_SUFFIXES,
    ModelLoadError,
    _first_line,
    detect_single_file,
    family_tokenizer,
    load_single_file,
    quiet_dtype_warning,
    save_single_file,
    scheduler_from_config,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

__all__ = [
    "DEFAULT_BASE",
    "BaseModel",
    "ModelLoadError",
    "detect_single_file",
    "list_base_models",
    "load_base",
    "save_single_file",
]

DEFAULT_BASE = DEMO_MODEL
"""The bundled demo model (a diffusers folder), used when no base model is given."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class BaseModel:
    """A loaded base model and what is known about it."""

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    source: str  # what was loaded: a path, a hub id, "tiny"
    resolution: int  # native resolution in pixels
    notes: str = ""  # how family / prediction type were found, when not obvious

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder_2(self):
        """SDXL's second text encoder (``CLIPTextModelWithProjection``); None for SD 1.x/2.x."""
        return getattr(self.pipe, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        return getattr(self.pipe, "tokenizer_2", None)

    @property
    def text_encoders(self) -> tuple:
        """Every text encoder, in the family's order (one for SD 1.x/2.x, two for SDXL)."""
        return tuple(m for m in (self.text_encoder, self.text_encoder_2) if m is not None)

    @property
    def tokenizers(self) -> tuple:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        """A ``DDPMScheduler`` for training, from the pipeline's scheduler config (no clipping)."""
        from diffusers import DDPMScheduler

        config = dict(self.pipe.scheduler.config)
        config.setdefault("clip_sample", False)
        config["prediction_type"] = self.prediction_type
        return DDPMScheduler.from_config(config)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _hf_cache_dir() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _family_from_configs(unet_cfg: dict[str, Any], text_cfg: dict[str, Any] | None) -> str:
    cross = unet_cfg.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    return "sd2" if (text_cfg or {}).get("hidden_act") == "gelu" else "sd1"


_OTHER_PIPELINES = (
    ("StableDiffusion3", "Stable Diffusion 3 / 3.5"),
    ("Flux", "FLUX"),
    ("StableCascade", "Stable Cascade"),
    ("Wuerstchen", "Würstchen / Stable Cascade"),
    ("PixArt", "PixArt"),
    ("Kandinsky", "Kandinsky"),
    ("StableDiffusionXLImg2Img", "the SDXL refiner"),
)


def _index_problem(index: dict[str, Any], what: str) -> tuple[str | None, str | None]:
    """(family, problem) from a pipeline's model_index.json: "sdxl", "sd" (1.x/2.x, told by the
    configs) or a refusal naming a family this app does not load."""
    cls = str(index.get("_class_name", ""))
    for fragment, name in _OTHER_PIPELINES:
        if fragment in cls:
            return None, (
                f"{what} is a {name} model ({cls}); only Stable Diffusion 1.x, 2.x and SDXL base models "
                "can be loaded."
            )
    if "text_encoder_2" in index and "text_encoder" not in index:
        return None, f"{what} is the SDXL refiner ({cls}, no first text encoder); load an SDXL base model."
    if "transformer" in index and "unet" not in index:
        return None, (
            f"{what} is a transformer-based model ({cls or 'unknown pipeline'}), not a Stable Diffusion "
            "1.x/2.x/SDXL UNet model."
        )
    if "XL" in cls or "text_encoder_2" in index:
        return "sdxl", None
    return "sd", None


def _describe_folder(folder: Path) -> dict[str, Any]:
    """Family, prediction type and resolution of a diffusers folder from its configs (no weights)."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no readable model_index.json). Pass the "
            "folder that holds model_index.json, unet/, vae/ and text_encoder/, or a .safetensors/.ckpt file."
        )
    kind, problem = _index_problem(index, str(folder))
    if problem is not None:
        return {"family": None, "problem": problem}
    unet_cfg = _read_json(folder / "unet" / "config.json") or {}
    text_cfg = _read_json(folder / "text_encoder" / "config.json")
    text2_cfg = _read_json(folder / "text_encoder_2" / "config.json") if kind == "sdxl" else {}
    vae_cfg = _read_json(folder / "vae" / "config.json") or {}
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    problem = None
    if not unet_cfg or text_cfg is None or not vae_cfg or text2_cfg is None:
        parts = "unet/, vae/, text_encoder/ or text_encoder_2/" if kind == "sdxl" else "unet/, vae/ or text_encoder/"
        problem = f"{folder} lacks {parts} configs; the model folder is incomplete."
    elif unet_cfg.get("in_channels", 4) != 4:
        problem = f"{folder} is not a text-to-image model ({unet_cfg.get('in_channels')} UNet input channels)."
    return {
        "family": "sdxl" if kind == "sdxl" else _family_from_configs(unet_cfg, text_cfg),
        "prediction_type": sched_cfg.get("prediction_type", "epsilon"),
        "resolution": int(unet_cfg.get("sample_size", 64)) * scale,
        "problem": problem,
    }


def _finish(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    source: str,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    notes: str = "",
    dtype: torch.dtype,
    device: str | torch.device,
) -> BaseModel:
    from .single_file import infer_family

    if pipe.unet.config.in_channels != 4:
        raise ModelLoadError(
            f"{source} is not a text-to-image model ({pipe.unet.config.in_channels} UNet input channels)."
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = scheduler_from_config(pipe.scheduler.config, prediction_type)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelLoadError(f"{source}: prediction type {prediction!r} is not supported (epsilon or v_prediction).")
    try:
        if pipe.unet.dtype != dtype:
            with quiet_dtype_warning():
                pipe.to(dtype=dtype)
        pipe.to(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"Could not move {source} to device {device!r} as {dtype}: {_first_line(e)}") from e
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(
        pipe=pipe,
        family=family or infer_family(pipe),
        prediction_type=prediction,
        source=source,
        resolution=int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# The loaders
# ---------------------------------------------------------------------------------------------


def _pipeline_class(family: str):
    """The diffusers pipeline class of a family and the keyword arguments it is loaded with."""
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline, {"add_watermarker": False}
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[StableDiffusionPipeline | StableDiffusionXLPipeline, str]:
    info = _describe_folder(folder)
    if info.get("problem"):
        raise ModelLoadError(info["problem"])
    family = info["family"]
    cls, kwargs = _pipeline_class(family)
    if not (folder / "tokenizer").is_dir():
        kwargs["tokenizer"] = family_tokenizer(family)
    if family == "sdxl" and not (folder / "tokenizer_2").is_dir():
        from .tokenizer import openclip_tokenizer

        kwargs["tokenizer_2"] = openclip_tokenizer()
    try:
        pipe = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype, **kwargs)
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, EnvironmentError, ...
        encoders = "text_encoder/, text_encoder_2/" if family == "sdxl" else "text_encoder/"
        raise ModelLoadError(
            f"Could not load the diffusers folder {folder}: {_first_line(e)}. Check that unet/, vae/, "
            f"{encoders} and scheduler/ are complete (configs and weights)."
        ) from e
    return pipe, family


def _hub_error(repo_id: str, cache: Path, offline: bool, cause: BaseException | None) -> ModelLoadError:
    owner, name = repo_id.split("/", 1)
    reason = "downloads are switched off (HF_HUB_OFFLINE)" if offline else "it could not be downloaded"
    detail = f" ({_first_line(cause)})" if cause is not None else ""
    return ModelLoadError(
        f"Base model '{repo_id}' is not a local file or folder, is not in the local Hugging Face "
        f"cache ({cache}), and {reason}{detail}.\n"
        f"To use it, on a machine with internet run:\n"
        f"    hf download {repo_id} --cache-dir <folder>\n"
        f"and copy <folder>/models--{owner}--{name} into {cache} (or set HF_HUB_CACHE to <folder>).\n"
        "Or download the model as a diffusers folder, or one .safetensors file, and pass its path "
        "instead of the id."
    )


def _load_hub(repo_id: str, dtype: torch.dtype) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    from diffusers import DiffusionPipeline

    cache = _hf_cache_dir()
    offline = _hub_offline()
    last: BaseException | None = None
    for local_only in (True,) if offline else (True, False):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                index = DiffusionPipeline.load_config(repo_id, cache_dir=str(cache), local_files_only=local_only)
        except Exception as e:  # not cached / no network / no such repo
            last = e
            continue
        kind, problem = _index_problem(index, f"'{repo_id}'")
        if problem is not None:
            raise ModelLoadError(problem)
        cls, kwargs = _pipeline_class("sdxl" if kind == "sdxl" else "sd1")
        try:
            return cls.from_pretrained(repo_id, cache_dir=str(cache), local_files_only=local_only, dtype=dtype, **kwargs)
        except Exception as e:
            last = e
    raise _hub_error(repo_id, cache, offline, last)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.lower().endswith(SINGLE_FILE_SUFFIXES)
        or spec.startswith((".", "~", "/", "\\"))
        or (os.sep in spec and not _HUB_ID.match(spec))
        or (len(spec) > 1 and spec[1] == ":")
    )


def load_base(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
) -> BaseModel:
    """Load a base model; see the module docstring for what ``spec`` may be.

    ``prediction_type`` (``"epsilon"`` / ``"v_prediction"``) overrides what was detected, for SD
    2.x files that do not record it and SDXL v-prediction fine-tunes without a marker (or forces
    epsilon on a file that is marked). Raises :class:`ModelLoadError` with a message that names the
    spec and what to do.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}.")
    text = "demo" if spec is None else str(spec).strip()
    finish = dict(prediction_type=prediction_type, dtype=dtype, device=device)

    if text == "demo":
        if not (DEFAULT_BASE / "model_index.json").is_file():
            raise ModelLoadError(
                f"The bundled demo model is missing: {DEFAULT_BASE} holds no model_index.json. Restore "
                "sdlora/sample_data/demo-model from the project, or pass a base model (a hub id, a diffusers "
                "folder or a .safetensors file)."
            )
        pipe, family = _load_folder(DEFAULT_BASE, dtype)
        return _finish(pipe, str(DEFAULT_BASE), family=family, **finish)
    if text == "tiny":
        from .tiny import build_tiny_pipeline

        return _finish(build_tiny_pipeline(), "tiny", family="sd1", **finish)
    if text == "tiny-sdxl":
        from .tiny import build_tiny_sdxl_pipeline

        return _finish(build_tiny_sdxl_pipeline(), "tiny-sdxl", family="sdxl", **finish)
    if not text:
        raise ModelLoadError("No base model given: pass a hub id, a diffusers folder or a .safetensors/.ckpt file.")

    path = Path(text).expanduser()
    if path.is_dir():
        pipe, family = _load_folder(path, dtype)
        return _finish(pipe, str(path), family=family, **finish)
    if path.is_file():
        pipe, info = load_single_file(path, dtype=dtype, prediction_type=prediction_type)
        return _finish(pipe, str(path), family=info.family, notes="; ".join(info.notes), **finish)
    if _looks_like_path(text) or not _HUB_ID.match(text):
        if _looks_like_path(text):
            raise ModelLoadError(f"Base model not found: {path} does not exist. Check the path.")
        raise ModelLoadError(
            f"Base model '{text}' is not an existing file or folder, nor a Hugging Face model id "
            "(owner/name), nor 'demo', 'tiny' or 'tiny-sdxl'."
        )
    return _finish(_load_hub(text, dtype), text, **finish)


def list_base_models(models_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Base models found directly in ``models_dir``, for the UI; nothing is loaded.

    Each entry: ``name``, ``path``, ``kind`` (``"diffusers"``, ``"safetensors"`` or ``"ckpt"``),
    ``family``, ``prediction_type``, ``resolution``, ``size_bytes``, ``usable`` and ``error``
    (why it cannot be used, e.g. a LoRA file or an SD 3 model), ``notes``. SD 1.x, 2.x and SDXL
    bases are usable. A missing folder gives
    an empty list.
    """
    root = Path(models_dir).expanduser()
    if not root.exists():
        return []
    if not root.is_dir():
        raise ModelLoadError(f"The models folder {root} is a file, not a folder.")
    found: list[dict[str, Any]] = []
    for child in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if child.name.startswith("."):
            continue
        entry: dict[str, Any] = {
            "name": child.name, "path": str(child), "family": None, "prediction_type": None,
            "resolution": None, "usable": False, "error": None, "notes": "",
        }
        if child.is_dir() and (child / "model_index.json").is_file():
            entry["kind"] = "diffusers"
            entry["size_bytes"] = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
            try:
                info = _describe_folder(child)
            except ModelLoadError as e:
                info = {"problem": str(e)}
            entry.update({k: info.get(k) for k in ("family", "prediction_type", "resolution")})
            entry["error"] = info.get("problem")
        elif child.is_file() and child.suffix.lower() in SINGLE_FILE_SUFFIXES:
            entry["kind"] = child.suffix.lower().lstrip(".")
            entry["size_bytes"] = child.stat().st_size
            try:
                info = detect_single_file(child)
            except ModelLoadError as e:
                entry["error"] = str(e)
            else:
                entry.update({k: info[k] for k in ("family", "prediction_type", "resolution", "notes")})
                entry["error"] = info["problem"]
        else:
            continue
        entry["usable"] = entry["error"] is None
        if entry["family"] in FAMILY_NAMES and entry["usable"]:
            entry["label"] = f"{child.name} ({FAMILY_NAMES[entry['family']]}, {entry['resolution']}px)"
        else:
            entry["label"] = child.name
        found.append(entry)
    return found
