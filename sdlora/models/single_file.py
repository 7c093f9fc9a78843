"""Stable Diffusion checkpoints in the original single-file (LDM / SGM / A1111) layout: SD 1.x, SD 2.x, SDXL.

Reading
    ``.safetensors`` files are opened with ``safetensors`` (the header is validated before any
    weight is read); ``.ckpt`` files only with ``torch.load(weights_only=True)``. A pickle that holds
    anything but tensors and plain containers is refused, never executed. The only exception is the
    PyTorch Lightning callback classes that the original SD 1.x ``.ckpt`` releases reference by
    name: those names are mapped to an inert placeholder class, so the file still loads without
    importing or running Lightning code.

Detecting
    :func:`detect_single_file` reads key names and shapes (plus, for SD 2.x, one small tensor) to
    tell SD 1.x / SD 2.x / SDXL apart and to find the prediction type, without building models.
    SDXL v-prediction fine-tunes are told by a ``v_pred`` marker key (or modelspec metadata), a
    zero-terminal-SNR schedule by ``ztsnr``. SD 3, FLUX, Stable Cascade, Playground v2.5 and the
    SDXL refiner are recognised by their keys and refused with a message naming them.

Converting to diffusers
    The original -> diffusers conversion is diffusers' own single-file code:
    ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file`` with
    ``config=<local folder>, local_files_only=True`` and, for the text encoder, the helper that
    ``StableDiffusionPipeline.from_single_file`` uses (``create_diffusers_clip_model_from_ldm``;
    for SDXL once per encoder). The config folder is one shipped in ``sdlora/models/configs/`` (SD
    1.x, SD 2.x 512, SD 2.x 768-v, SDXL 1.0 base; see :mod:`.shipped`) or, for files this module wrote, the diffusers configs stored in the file itself, so
    tiny and non-standard models load offline too. The file is read once and its state dict is
    handed to those functions (the pipeline-level ``from_single_file`` would read it again).

Converting to the original layout
    diffusers ships no diffusers -> original converter in the library, so
    :func:`to_original_state_dict` is written here. The UNet's key mapping is
    :mod:`sdlora.models.unet_names` (derived from the config: blocks, layers per block, which
    blocks have attention), and the tests check it against diffusers' own original -> diffusers
    mapping on SD 1.5 / SD 2.x / SDXL sized models. The SD 1.x text
    encoder is written with ``cond_stage_model.transformer.text_model.`` keys (the layout
    transformers 4.x, A1111 and kohya read; transformers 5 drops ``text_model.`` from its own keys);
    the SD 2.x text encoder in OpenCLIP's layout (``cond_stage_model.model.``, fused ``in_proj``);
    SDXL's encoders under ``conditioner.embedders.0.transformer.text_model.`` and, in OpenCLIP's
    layout, ``conditioner.embedders.1.model.``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .shipped import CONFIGS_DIR  # noqa: F401  (re-exported: the shipped config folders)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Key prefixes of the original layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel layout
CLIP_TEXT_PREFIX = CLIP_PREFIX + "text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP layout
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL encoder 1: CLIP ViT-L, transformers layout
SDXL_CLIP_TEXT_PREFIX = SDXL_CLIP_PREFIX + "text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL encoder 2: OpenCLIP bigG layout

# Metadata keys this module writes (safetensors header; a ``sdlora_metadata`` dict in .ckpt files).
META_CONFIGS = "sdlora.diffusers_configs"
META_FAMILY = "sdlora.family"
META_PREDICTION = "sdlora.prediction_type"
META_PAD_TOKEN = "sdlora.tokenizer_pad_token"
CKPT_METADATA_KEY = "sdlora_metadata"

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SD2_PAD_TOKEN = "!"  # OpenCLIP pads with "!" (id 0); SD 1.x pads with <|endoftext|>
SDXL_RESOLUTION = 1024
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# Schedulers a stored config may name; anything else falls back to DDIM.
_SCHEDULER_CLASSES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
)

# Classes that the original SD 1.x .ckpt releases reference by name (as dict keys of their
# "callbacks" entry). They are mapped to an inert placeholder for weights_only loading.
_LIGHTNING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
)


class ModelLoadError(Exception):
    """A base model could not be loaded; the message names the spec or file and what to do."""


class _IgnoredPickleGlobal:
    """Inert stand-in for a training-framework class named inside an original ``.ckpt``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


class _Checkpoint:
    """A single checkpoint file opened for inspection.

    For ``.safetensors`` only the header is read until weights are asked for; a ``.ckpt`` is
    unpickled at once (memory-mapped when it is in PyTorch's zip format).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = "safetensors" if path.suffix.lower() == ".safetensors" else "ckpt"
        self.metadata: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.format == "safetensors":
            self._open_safetensors()
        else:
            self._tensors = self._load_ckpt()
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def _open_safetensors(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"{self.path} is not a readable .safetensors file ({e}). It may be truncated (an "
                "interrupted download or copy) or be another format renamed; download or copy it "
                "again."
            ) from e
        if not self.shapes:
            raise ModelLoadError(f"{self.path} holds no tensors; it is not a model checkpoint.")

    def _load_ckpt(self) -> dict[str, torch.Tensor]:
        path = self.path
        use_mmap = zipfile.is_zipfile(path)
        placeholders = [(_IgnoredPickleGlobal, name) for name in _LIGHTNING_GLOBALS]
        try:
            with torch.serialization.safe_globals(placeholders):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise ModelLoadError(
                    f"{path} is not a readable .ckpt file ({_first_line(e)}); it may be truncated "
                    "or damaged. Download or copy it again."
                ) from e
            unsafe = ""
            if use_mmap:
                try:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                    unsafe = f" It references: {', '.join(names[:8])}."
                except Exception:  # noqa: BLE001 - only enriches the message
                    unsafe = ""
            raise ModelLoadError(
                f"Refused to load {path}: the .ckpt contains pickled Python objects other than "
                f"weights, and loading them could run code.{unsafe} Use a .safetensors version of "
                "this model instead (most model pages offer one), or convert it with a tool you "
                "trust."
            ) from e
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ModelLoadError(
                f"{path} is not a readable .ckpt file ({_first_line(e)}). It may be truncated (an "
                "interrupted download or copy) or not a PyTorch checkpoint; download or copy it again."
            ) from e

        if isinstance(obj, Mapping) and isinstance(obj.get(CKPT_METADATA_KEY), Mapping):
            self.metadata = {
                str(k): v for k, v in obj[CKPT_METADATA_KEY].items() if isinstance(v, str)
            }
        state = obj
        while isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ModelLoadError(f"{path} does not hold a state dict of weights; it is not a model checkpoint.")
        tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if not tensors:
            raise ModelLoadError(f"{path} holds no tensors; it is not a model checkpoint.")
        return tensors

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor (read from disk for safetensors)."""
        if self._tensors is not None:
            return self._tensors[key]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def release(self) -> None:
        """Drop this object's references to the tensors (the models keep what they use)."""
        self._tensors = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors of the file."""
        if self._tensors is None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                self._tensors = load_file(str(self.path), device="cpu")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"Could not read the weights of {self.path} ({e}); copy it again.") from e
        return self._tensors


def _first_line(e: BaseException) -> str:
    """The exception's first line, without library advice that does not apply to users here."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = lines[0].split(" If you want to instead overwrite")[0].strip()
    return f"{type(e).__name__}: {text}"


def _open_checkpoint(path: str | os.PathLike[str]) -> _Checkpoint:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"Model file not found: {p}. Check the path, or put the file there.")
    if not p.is_file():
        raise ModelLoadError(f"{p} is not a file.")
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{p}: single-file models must end in .safetensors or .ckpt.")
    return _Checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@dataclass
class SingleFileInfo:
    """What a single checkpoint file holds, as found from its keys, shapes and metadata."""

    path: Path
    format: str  # "safetensors" | "ckpt"
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int
    notes: list[str] = field(default_factory=list)
    problem: str | None = None  # why it cannot be loaded, or None
    configs: dict[str, dict[str, Any]] | None = None  # diffusers configs stored in the file
    pad_token: str | None = None
    zero_terminal_snr: bool = False  # the file marks a zero-terminal-SNR schedule ("ztsnr" key)

    @property
    def supported(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "supported": self.supported,
            "problem": self.problem,
            "embedded_configs": self.configs is not None,
            "notes": "; ".join(self.notes),
        }


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _not_a_base_model(path: Path, keys: list[str]) -> ModelLoadError:
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        what = "a LoRA file, not a base model. Load a full Stable Diffusion checkpoint as the base and the LoRA on top of it"
    elif _has_prefix(keys, "encoder.") and _has_prefix(keys, "decoder."):
        what = "a VAE on its own, not a full Stable Diffusion checkpoint"
    elif _has_prefix(keys, "down_blocks.") or _has_prefix(keys, "input_blocks."):
        what = "a UNet on its own, not a full Stable Diffusion checkpoint (it has no text encoder or VAE)"
    elif any(k == "emb_params" or k.startswith("string_to_param") for k in keys):
        what = "a textual-inversion embedding, not a base model"
    else:
        what = "not a Stable Diffusion checkpoint in the original single-file layout"
    return ModelLoadError(f"{path} is {what}.")


def _other_architecture(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The name of a known model family this app does not load, from distinctive keys."""
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("joint_blocks.") and has("context_block."):
        return "Stable Diffusion 3 / 3.5 (MMDiT)"
    if has("double_blocks.") and has("single_blocks."):
        return "FLUX"
    if any(k.endswith("clip_txt_mapper.weight") for k in keys) or has(".channelwise."):
        return "Stable Cascade (Würstchen)"
    if "edm_mean" in shapes or "edm_std" in shapes:
        return "Playground v2.5 (EDM)"
    if _has_prefix(keys, "conditioner.embedders.0.model.") and not _has_prefix(keys, SDXL_CLIP_PREFIX):
        return "the SDXL refiner"
    return None


def _parse_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]] | None:
    raw = metadata.get(META_CONFIGS)
    if raw is None:
        return None
    try:
        configs = json.loads(raw)
        needed = ("unet", "vae", "text_encoder", "scheduler")
        if metadata.get(META_FAMILY) == "sdxl":
            needed += ("text_encoder_2",)
        ok = isinstance(configs, dict) and all(isinstance(configs.get(k), dict) for k in needed)
    except ValueError:
        ok = False
    if not ok:
        raise ModelLoadError(
            f"{path}: the model configs stored in the file's metadata ({META_CONFIGS}) are damaged; "
            "save the model again."
        )
    return configs


def _normalise_prediction(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower().replace("-", "_")
    if v in ("epsilon", "eps"):
        return "epsilon"
    if v in ("v", "v_prediction", "v_pred", "vpred"):
        return "v_prediction"
    return None


def _inspect(ckpt: _Checkpoint) -> SingleFileInfo:
    path, shapes, metadata = ckpt.path, ckpt.shapes, ckpt.metadata
    keys = list(shapes)
    notes: list[str] = []

    other = _other_architecture(keys, shapes)
    if other is not None:
        raise ModelLoadError(
            f"{path} is a {other} checkpoint; only Stable Diffusion 1.x, 2.x and SDXL base models can be "
            "loaded. Use one of those families."
        )
    if not _has_prefix(keys, UNET_PREFIX):
        raise _not_a_base_model(path, keys)

    configs = _parse_configs(path, metadata)
    sdxl = _has_prefix(keys, "conditioner.embedders.") or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes
    if sdxl:
        family = "sdxl"
        found = [name for name, prefix in (("CLIP ViT-L", SDXL_CLIP_PREFIX), ("OpenCLIP bigG", SDXL_OPENCLIP_PREFIX))
                 if _has_prefix(keys, prefix)]
        layout = "text encoders " + " + ".join(found) if len(found) == 2 else "no text encoder"
        if len(found) == 1:
            layout = "only one text encoder"
    elif _has_prefix(keys, OPENCLIP_PREFIX):
        family, layout = "sd2", "OpenCLIP text encoder (cond_stage_model.model.)"
    elif _has_prefix(keys, CLIP_PREFIX):
        family, layout = "sd1", "CLIP text encoder (cond_stage_model.transformer.)"
    else:
        attn_k = next((k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
        context = shapes[attn_k][-1] if attn_k else None
        family = "sd2" if context == 1024 else "sd1"
        layout = "no text encoder"
    notes.append(f"{FAMILY_NAMES[family]} layout: {layout}")
    stored_family = metadata.get(META_FAMILY)
    if stored_family in FAMILIES and stored_family != family:
        notes.append(f"metadata says {stored_family}, keys say {family}; the keys win")

    problem: str | None = None
    in_key = f"{UNET_PREFIX}input_blocks.0.0.weight"
    in_channels = shapes[in_key][1] if in_key in shapes and len(shapes[in_key]) == 4 else 4
    if configs is not None:
        in_channels = int(configs["unet"].get("in_channels", in_channels))
    if layout in ("no text encoder", "only one text encoder"):
        where = "conditioner.embedders.0 and .1" if family == "sdxl" else "cond_stage_model"
        problem = f"{path} has {layout} weights (expected under {where}); use a full checkpoint."
    elif not _has_prefix(keys, VAE_PREFIX):
        problem = f"{path} has no VAE weights (no first_stage_model.* keys); use a full checkpoint."
    elif in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_channels, "not a text-to-image model")
        problem = f"{path} is {kind} ({in_channels} UNet input channels); only text-to-image models are supported."
    if sum(k.startswith("model_ema.") for k in keys) > 100:
        notes.append("the file also holds EMA weights; the non-EMA weights are used")

    # Prediction type: stored configs > modelspec metadata > "v_pred" marker > family rules.
    prediction: str | None = None
    if configs is not None:
        prediction = _normalise_prediction(configs["scheduler"].get("prediction_type", "epsilon"))
        notes.append("diffusers configs stored in the file are used")
    if prediction is None:
        prediction = _normalise_prediction(metadata.get(META_PREDICTION)) or _normalise_prediction(
            metadata.get("modelspec.prediction_type")
        )
        if prediction is not None:
            notes.append(f"prediction type {prediction} from the file's metadata")
    if prediction is None and "v_pred" in shapes:
        prediction = "v_prediction"
        notes.append("v-prediction marked by the 'v_pred' key")
    if prediction is None and family in ("sd1", "sdxl"):
        prediction = "epsilon"
    if prediction is None:
        prediction = _guess_sd2_prediction(ckpt, in_channels, notes)

    if configs is not None:
        unet_cfg, vae_cfg = configs["unet"], configs["vae"]
        scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        resolution = int(unet_cfg.get("sample_size", 64)) * scale
    elif family == "sdxl":
        resolution = SDXL_RESOLUTION
    else:
        resolution = 768 if (family == "sd2" and prediction == "v_prediction") else 512
    if family == "sdxl" and "ztsnr" in shapes:
        notes.append("trained with zero terminal SNR (the 'ztsnr' key): the noise schedule is rescaled")
    pad = metadata.get(META_PAD_TOKEN)
    return SingleFileInfo(
        path, ckpt.format, family, prediction, resolution, notes=notes, problem=problem,
        configs=configs, pad_token=pad if pad in ("<|endoftext|>", SD2_PAD_TOKEN) else None,
        zero_terminal_snr=family == "sdxl" and "ztsnr" in shapes,
    )


def _guess_sd2_prediction(ckpt: _Checkpoint, in_channels: int, notes: list[str]) -> str:
    """SD 2.x files do not say whether they are 768-v (v-prediction) or 512 (epsilon).

    The spread of one norm bias late in the UNet separates the released v and epsilon models
    (the check ComfyUI uses); SD 2 inpainting models are epsilon.
    """
    key = f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if in_channels != 4:
        return "epsilon"
    if key not in ckpt.shapes:
        notes.append("SD 2.x prediction type not recorded in the file; assuming epsilon (pass prediction_type to override)")
        return "epsilon"
    std = float(torch.std(ckpt.tensor(key).float(), unbiased=False))
    prediction = "v_prediction" if std > 0.09 else "epsilon"
    notes.append(
        f"SD 2.x prediction type guessed from the weights ({prediction}, norm spread {std:.3f}); "
        "pass prediction_type to override"
    )
    return prediction


def detect_single_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a single-file checkpoint without building models.

    Returns ``{"family", "prediction_type", "notes", "resolution", "format", "supported",
    "problem", "embedded_configs", "path"}``; ``family`` is ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    Raises :class:`ModelLoadError` for files that are missing, unreadable, unsafe, or not a full
    Stable Diffusion checkpoint (a LoRA, a VAE, ...).
    """
    return _inspect(_open_checkpoint(path)).as_dict()


# ---------------------------------------------------------------------------------------------
# Original -> diffusers (loading)
# ---------------------------------------------------------------------------------------------


def shipped_config_dir(family: str, prediction_type: str) -> Path:
    """The shipped diffusers config folder for a family and prediction type (see :mod:`.shipped`)."""
    from .shipped import config_dir

    return config_dir(family, prediction_type)


def family_tokenizer(family: str, pad_token: str | None = None):
    """The shipped CLIP tokenizer; SD 2.x (OpenCLIP) pads with "!" instead of <|endoftext|>.

    For SDXL this is the first tokenizer; the second is :func:`sdlora.models.tokenizer.openclip_tokenizer`.
    """
    from .tokenizer import clip_tokenizer, openclip_tokenizer

    pad = pad_token or (SD2_PAD_TOKEN if family == "sd2" else None)
    if pad is None or pad == clip_tokenizer().pad_token:
        return clip_tokenizer()
    if pad == SD2_PAD_TOKEN:
        return openclip_tokenizer()
    from transformers import CLIPTokenizer

    from .tokenizer import MAX_LENGTH, TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_LENGTH, pad_token=pad)


def scheduler_from_config(config: Mapping[str, Any], prediction_type: str | None = None):
    """A diffusers scheduler from a stored config (a known scheduler class, else DDIM)."""
    import diffusers

    cfg = dict(config)
    name = cfg.get("_class_name")
    cls = getattr(diffusers, name) if name in _SCHEDULER_CLASSES else diffusers.DDIMScheduler
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return cls.from_config(cfg)


def _write_config_dir(configs: Mapping[str, Mapping[str, Any]], root: Path) -> Path:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in configs:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(configs[name]), encoding="utf-8")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]), encoding="utf-8")
    return root


def _check_complete(model: torch.nn.Module, what: str, path: Path) -> None:
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{path}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[0]}). "
            "The file does not match the detected architecture or is damaged."
        )


@contextmanager
def quiet_dtype_warning() -> Iterator[None]:
    """Silence diffusers' "modules that should be kept in float32: []" warning.

    diffusers 0.42 logs it on every ``ModelMixin.to(dtype)`` call, including its own call inside
    ``from_single_file``, even when the list of such modules is empty (as for SD UNets and VAEs).
    """
    import logging

    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _own_memory(model: torch.nn.Module) -> None:
    """Give every weight its own freshly allocated memory.

    Tensors read from a file sit at arbitrary offsets of one buffer (or of a memory-mapped file);
    CPU kernels then take other vectorised paths and results differ in the last bits. A copy makes
    the loaded model compute exactly what the saved one did, and frees it from the file.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()


def _normalise_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD 1.x files store the CLIP text model without the ``text_model.`` level; add it."""
    if any(k.startswith(CLIP_TEXT_PREFIX) for k in state) or not any(k.startswith(CLIP_PREFIX) for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(CLIP_PREFIX):
            k = CLIP_TEXT_PREFIX + k[len(CLIP_PREFIX):]
        out[k] = v
    return out


def load_single_file(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
) -> tuple[Any, SingleFileInfo]:
    """Build a ``StableDiffusionPipeline`` (SD 1.x/2.x) or ``StableDiffusionXLPipeline`` (SDXL)
    from an original-layout ``.safetensors`` / ``.ckpt``.

    Offline: configs come from the file's metadata (files written by :func:`save_single_file`) or
    from the shipped folders (:mod:`.shipped`), the tokenizers from ``sdlora/models/tokenizer/``.
    ``prediction_type`` overrides what detection found.
    """
    ckpt = _open_checkpoint(path)
    info = _inspect(ckpt)
    if info.problem:
        raise ModelLoadError(info.problem)
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}.")
        if prediction_type != info.prediction_type:
            info.notes.append(f"prediction type set to {prediction_type} by the caller")
        info.prediction_type = prediction_type
        if info.configs is None and info.family == "sd2":
            info.resolution = 768 if prediction_type == "v_prediction" else 512

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    from .shipped import text_encoder_class

    state = _normalise_clip_keys(ckpt.state_dict())
    label = FAMILY_NAMES[info.family]
    parts = ("text_encoder", "text_encoder_2") if info.family == "sdxl" else ("text_encoder",)
    with tempfile.TemporaryDirectory(prefix="sdlora-configs-") as tmp, quiet_dtype_warning():
        if info.configs is not None:
            config_dir = _write_config_dir(info.configs, Path(tmp))
            scheduler_cfg = dict(info.configs["scheduler"])
        else:
            config_dir = shipped_config_dir(info.family, info.prediction_type)
            scheduler_cfg = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text("utf-8"))
        common = dict(config=str(config_dir), local_files_only=True, dtype=dtype)
        try:
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
            encoders = {
                part: create_diffusers_clip_model_from_ldm(
                    text_encoder_class(info.family, part), checkpoint=state, subfolder=part,
                    config=str(config_dir), torch_dtype=dtype, local_files_only=True,
                )
                for part in parts
            }
        except ModelLoadError:
            raise
        except Exception as e:  # diffusers raises ValueError/RuntimeError/KeyError on mismatches
            raise ModelLoadError(
                f"{ckpt.path}: the weights do not fit the {label} architecture ({_first_line(e)}). "
                "The file may be a variant this app does not support, or damaged."
            ) from e
    del state
    ckpt.release()
    models = {"UNet": unet, "VAE": vae, **{p.replace("_", " "): m for p, m in encoders.items()}}
    for what, model in models.items():
        _check_complete(model, what, ckpt.path)
        _own_memory(model)
    if info.zero_terminal_snr:
        scheduler_cfg["rescale_betas_zero_snr"] = True
    scheduler = scheduler_from_config(scheduler_cfg, info.prediction_type)

    if info.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from .tokenizer import clip_tokenizer, openclip_tokenizer

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders["text_encoder"],
            text_encoder_2=encoders["text_encoder_2"],
            tokenizer=clip_tokenizer(),
            tokenizer_2=openclip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        return pipe, info

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoders["text_encoder"],
        tokenizer=family_tokenizer(info.family, info.pad_token),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, info


# ---------------------------------------------------------------------------------------------
# Diffusers -> original (saving); written here, see the module docstring
# ---------------------------------------------------------------------------------------------

_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# A prefix map: diffusers prefix (ending in ".") -> (original prefix, renaming of the next name).
_PrefixMap = dict[str, tuple[str, dict[str, str]]]


def _int_layers(config: Mapping[str, Any], name: str) -> int:
    value = config["layers_per_block"]
    if not isinstance(value, int):
        raise ValueError(f"{name}: layers_per_block={value!r} per block is not a Stable Diffusion 1.x/2.x layout")
    return value


def _vae_prefix_map(config: Mapping[str, Any]) -> _PrefixMap:
    """Diffusers ``AutoencoderKL`` module prefixes -> LDM ``encoder.down`` / ``decoder.up`` names."""
    layers = _int_layers(config, "VAE")
    m: _PrefixMap = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        m[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        m[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        m[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET_NAMES)
        m[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET_NAMES)
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION_NAMES)
    n = len(config["down_block_types"])
    for i in range(n):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET_NAMES)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
    n = len(config["up_block_types"])
    for i in range(n):
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET_NAMES)
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n - 1 - i}.upsample.", {})
    return m


def _map_key(key: str, prefixes: _PrefixMap, what: str) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in prefixes:
            target, renames = prefixes[prefix]
            rest = key[len(prefix):]
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):] if new else rest[len(old) + 1:]
                    break
            return target + rest
    hint = " Merge or unload adapters before saving." if ("lora" in key or "base_layer" in key) else ""
    raise ValueError(f"{what} weight {key!r} has no place in the Stable Diffusion single-file layout.{hint}")


def _unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from .unet_names import to_original_state_dict

    return to_original_state_dict(state, config, UNET_PREFIX)


def _vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        new = _map_key(k, prefixes, "VAE")
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # the original VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = v
    return out


def _text_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The CLIP text model's weights with keys relative to ``text_model`` (transformers 4 or 5)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue  # a buffer, not a weight
        out[k] = v
    return out


def _clip_to_original(text_encoder: torch.nn.Module, prefix: str = CLIP_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _text_state(text_encoder).items()}


def _openclip_to_original(text_encoder: torch.nn.Module, prefix: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` -> OpenCLIP text tower keys
    as SD 2.x files (``prefix`` ``cond_stage_model.model.``) and SDXL files (encoder 2,
    ``conditioner.embedders.1.model.``) store them.

    q/k/v projections are fused into ``in_proj_weight`` / ``in_proj_bias``. A model with a
    projection (SDXL's encoder 2) stores it as ``text_projection`` transposed (OpenCLIP multiplies
    ``x @ text_projection``). SD 2.x runs 23 of the 24 OpenCLIP layers and never uses
    ``text_projection``; a 23-layer encoder without projection gets a copy of its last layer as
    layer 23 and an identity ``text_projection``. ``logit_scale`` is CLIP's initial value, so that
    loaders expecting the full OpenCLIP key set find it (none of these change the output).
    """
    state = _text_state(text_encoder)
    projection = state.pop("text_projection.weight", None)
    hidden = int(text_encoder.config.hidden_size)
    out: dict[str, torch.Tensor] = {}
    names = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_parts = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    pattern = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k in names:
            out[names[k]] = v
            continue
        m = pattern.match(k)
        if m is None:
            raise ValueError(f"text encoder weight {k!r} has no place in the OpenCLIP layout")
        layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[part[-6]] = v
        elif part in layer_parts:
            out[f"transformer.resblocks.{layer}.{layer_parts[part]}.{kind}"] = v
        else:
            raise ValueError(f"text encoder weight {k!r} has no place in the OpenCLIP layout")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {layer} lacks one of q/k/v {kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])

    num_layers = int(text_encoder.config.num_hidden_layers)
    if num_layers == 23 and projection is None:
        last = f"transformer.resblocks.{num_layers - 1}."
        for k in [k for k in out if k.startswith(last)]:
            out[f"transformer.resblocks.{num_layers}." + k[len(last):]] = out[k].clone()
    ref = out["ln_final.weight"]
    if projection is not None:
        out["text_projection"] = projection.T
    else:
        out["text_projection"] = torch.eye(hidden, dtype=ref.dtype, device=ref.device)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=ref.dtype, device=ref.device)
    return {prefix + k: v for k, v in out.items()}


def infer_family(pipe: Any) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a diffusers pipeline (ValueError for other UNets)."""
    added = pipe.unet.config.get("addition_embed_type")
    if getattr(pipe, "text_encoder_2", None) is not None or added == "text_time":
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError("SDXL refiner pipelines (no first text encoder) are not supported")
        return "sdxl"
    if added:
        raise ValueError(f"UNet with addition_embed_type={added!r} is not an SD 1.x/2.x/SDXL model")
    cross = pipe.unet.config.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    # Tiny or custom models: OpenCLIP (SD 2.x) uses GELU, OpenAI CLIP (SD 1.x) quick GELU.
    return "sd2" if getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def to_original_state_dict(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    family: str,
    text_encoder_2: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Diffusers UNet + VAE + text encoder(s) -> one state dict in the original single-file layout.

    SD 1.x: CLIP under ``cond_stage_model.transformer.text_model.``; SD 2.x: OpenCLIP under
    ``cond_stage_model.model.``; SDXL (``text_encoder_2`` required): CLIP under
    ``conditioner.embedders.0.transformer.text_model.`` and OpenCLIP bigG under
    ``conditioner.embedders.1.model.``. Tensors are the models' own (no copies, except fused q/k/v,
    the transposed projection and the filler weights described in :func:`_openclip_to_original`);
    works on the meta device too.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if (family == "sdxl") != (text_encoder_2 is not None):
        raise ValueError("text_encoder_2 is required for SDXL and only for SDXL")
    state = _unet_to_original(unet.state_dict(), unet.config)
    state.update(_vae_to_original(vae.state_dict(), vae.config))
    if family == "sd1":
        state.update(_clip_to_original(text_encoder))
    elif family == "sd2":
        state.update(_openclip_to_original(text_encoder))
    else:
        state.update(_clip_to_original(text_encoder, SDXL_CLIP_TEXT_PREFIX))
        state.update(_openclip_to_original(text_encoder_2, SDXL_OPENCLIP_PREFIX))
    return state


def _configs_of(pipe: Any) -> dict[str, dict[str, Any]]:
    configs = {
        "unet": json.loads(pipe.unet.to_json_string()),
        "vae": json.loads(pipe.vae.to_json_string()),
        "text_encoder": json.loads(pipe.text_encoder.config.to_json_string(use_diff=False)),
        "scheduler": json.loads(pipe.scheduler.to_json_string()),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        configs["text_encoder_2"] = json.loads(pipe.text_encoder_2.config.to_json_string(use_diff=False))
    return configs


def _modelspec(family: str, prediction: str, resolution: int, title: str) -> dict[str, str]:
    arch = {
        ("sd1", "epsilon"): "stable-diffusion-v1",
        ("sd1", "v_prediction"): "stable-diffusion-v1",
        ("sd2", "epsilon"): "stable-diffusion-v2-512",
        ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
        ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
        ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
    }[(family, prediction)]
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_single_file(
    pipe: Any,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    family: str | None = None,
) -> Path:
    """Write a pipeline's UNet, VAE and text encoder(s) as one original-layout checkpoint (SD 1.x /
    2.x in the LDM layout, SDXL in the SGM layout, see :func:`to_original_state_dict`).

    ``.safetensors`` or ``.ckpt`` by suffix; written to a temp name and renamed. ``dtype`` casts
    floating-point weights (e.g. ``torch.float16``). ``metadata`` adds string entries to the
    safetensors header (stored in a ``sdlora_metadata`` dict in ``.ckpt`` files). ``family`` is
    inferred when omitted (:func:`infer_family`). The diffusers configs, family, prediction type and
    tokenizer pad token are stored too, so tiny and non-standard models load back exactly; SAI
    ``modelspec.*`` entries describe the model to other tools, and v-prediction models get the
    ``v_pred`` marker key.
    """
    out = Path(path).expanduser()
    suffix = out.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{out}: the file name must end in .safetensors or .ckpt")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: the folder {out.parent} does not exist")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
    family = family or infer_family(pipe)
    prediction = _normalise_prediction(pipe.scheduler.config.get("prediction_type", "epsilon")) or "epsilon"
    resolution = int(pipe.unet.config.sample_size) * (2 ** (len(pipe.vae.config.block_out_channels) - 1))

    state = to_original_state_dict(
        pipe.unet, pipe.vae, pipe.text_encoder, family, getattr(pipe, "text_encoder_2", None) if family == "sdxl" else None
    )
    if prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.numel():
            ptr = v.untyped_storage().data_ptr()
            if ptr in storages:
                v = v.clone()  # safetensors refuses tensors that share memory
            storages.add(v.untyped_storage().data_ptr())
        tensors[k] = v

    meta = _modelspec(family, prediction, resolution, out.stem)
    meta.update(
        {
            META_CONFIGS: json.dumps(_configs_of(pipe), separators=(",", ":")),
            META_FAMILY: family,
            META_PREDICTION: prediction,
            META_PAD_TOKEN: str(getattr(pipe.tokenizer, "pad_token", "") or ""),
        }
    )
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata entries must be strings; got {k!r}: {type(v).__name__}")
        meta[k] = v

    if suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    else:
        _atomic_write(out, lambda tmp: torch.save({"state_dict": tensors, CKPT_METADATA_KEY: meta}, tmp))
    return out
