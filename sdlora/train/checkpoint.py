"""Checkpoints for exact resume: adapter weights, optimizer, LR scheduler, every RNG, data position.

A checkpoint is a folder ``checkpoints/step-N/`` written under a temporary name and renamed when
complete, so a loader never sees a half-written one. Tensors are stored with safetensors; the
optimizer state with ``torch.save`` and read back with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..paths import atomic_dir

EMBEDDINGS_FILE = "embeddings.safetensors"


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": _np_state_to_json(np.random.get_state()),
    }
    return st


def set_rng_state(st: dict[str, Any], torch_state: torch.Tensor, cuda_states: list[torch.Tensor]) -> None:
    random.setstate(_lists_to_tuples(st["python"]))
    np.random.set_state(_np_state_from_json(st["numpy"]))
    torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: Path, *, step: int, adapter, optimizer, lr_scheduler,
                    extra: dict[str, Any], embeddings=None) -> Path:
    """Write a complete checkpoint folder atomically. ``extra`` must be JSON-serialisable.

    ``embeddings`` (a run's :class:`~sdlora.train.embeddings.TrainedTokens`) adds ``embeddings.safetensors``,
    the trained rows of the new tokens (their optimizer state is in ``optimizer.pt`` with the rest).
    """
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        if embeddings is not None:
            save_file(embeddings.state_dict(), str(tmp / EMBEDDINGS_FILE))
        extra_tensors, extra_json = _split_extra(adapter.method.extra_state(adapter))
        if extra_tensors:
            save_file(extra_tensors, str(tmp / "method.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda{i}"] = s
        save_file(tensors, str(tmp / "rng.safetensors"))
        state = dict(step=step, rng=rng_state(), lr_scheduler=_jsonable(lr_scheduler.state_dict()), method=extra_json,
                     **extra)
        # Written last: the sizes of every file, so a loader can tell a damaged checkpoint from a good one.
        state["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / "state.json").write_text(json.dumps(state))
    return path


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (a missing, truncated or unreadable file), or None.

    Checks the file sizes recorded when it was written and that every safetensors header reads; cheap (no
    tensor is loaded). Checkpoints written before sizes were recorded get the header checks only.
    """
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({e})"
    for name, size in dict(state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name in ("adapter.safetensors", "rng.safetensors", "optimizer.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as e:
            return f"{f.name} is unreadable ({str(e).splitlines()[0][:100]})"
    return None


def newest_good_checkpoint(run) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint of ``run`` that can be resumed from, [(damaged newer checkpoint, why), ...])."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(run.checkpoints()):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, bad
        bad.append((path, problem))
    return None, bad


def restore_adapter(path: Path, adapter) -> dict[str, Any]:
    """Put the adapter of checkpoint ``path`` (weights and the method's extra state) into ``adapter``,
    an adapter injected with the run's settings; returns the checkpoint's state dict."""
    state = json.loads((path / "state.json").read_text())
    method_state = dict(state.get("method") or {})
    if (path / "method.safetensors").is_file():
        method_state.update(load_file(str(path / "method.safetensors")))
    if method_state:
        adapter.method.load_extra_state(adapter, method_state)
    adapter.load_state_dict(load_file(str(path / "adapter.safetensors")))
    return state


def inject_run_adapter(cfg, base):
    """A fresh adapter with the run's settings in ``base``: the UNet, and every text encoder of the
    family (one for SD 1.x/2.x, two for SDXL) when the run trains them."""
    from ..lora.inject import inject_adapters
    from .config import lora_spec

    encoders = tuple(base.text_encoders) if cfg.train_text_encoder else ()
    extra = {"text_encoder_2": encoders[1]} if len(encoders) > 1 else {}
    return inject_adapters(base.unet, encoders[0] if encoders else None, lora_spec(cfg), **extra)


def load_run_adapter(run_dir: str | Path, *, step: int | None = None, base: Any = None):
    """(base model, adapter) of a run: its base model with the adapter of checkpoint ``step``
    (default: the latest) in it, restored the way a resumed run restores it (any method), frozen.

    ``base`` may be a loaded ``BaseModel`` to put the adapter into (default: load the run's base).
    """
    from ..lora.errors import LoraError
    from ..models.loading import load_base
    from .runs import RunDir

    run = RunDir(run_dir)
    if not run.exists():
        raise LoraError(f"{run_dir} is not a run directory (no config.toml).")
    checkpoint = run.checkpoints_dir / f"step-{step}" if step is not None else newest_good_checkpoint(run)[0]
    if checkpoint is None or not (checkpoint / "adapter.safetensors").is_file():
        which = f"checkpoint step-{step}" if step is not None else "checkpoint"
        raise LoraError(f"{run_dir} has no {which} to load an adapter from.")
    cfg = run.load_config()
    if base is None:
        base = load_base(cfg.pretrained_model_name_or_path)
    adapter = inject_run_adapter(cfg, base)
    restore_adapter(checkpoint, adapter)
    for p in adapter.parameters():
        p.requires_grad_(False)
    return base, adapter


def load_checkpoint(path: Path, *, adapter, optimizer, lr_scheduler, embeddings=None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its state dict (step, extra)."""
    state = restore_adapter(path, adapter)
    if embeddings is not None:
        if not (path / EMBEDDINGS_FILE).is_file():
            from .config import ConfigError

            raise ConfigError("embedding_tokens", f"checkpoint {path.name} has no trained token embeddings")
        embeddings.load_state_dict(load_file(str(path / EMBEDDINGS_FILE)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
    set_rng_state(state["rng"], rng["torch"], cuda)
    return state


def _split_extra(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


def prune_checkpoints(checkpoints: list[Path], keep: int) -> None:
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _tuples_to_lists(x: Any) -> Any:
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def _np_state_to_json(st) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_state_from_json(st: list):
    return (st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4])
