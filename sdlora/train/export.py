"""Exporting a run's LoRA: one path for every route.

The final file written at the end of training, ``sdlora export RUN`` and ``sdlora export RUN --step N``
all go through :func:`write_run_lora`: the adapter of a checkpoint is restored into the run's base model
the way a resume restores it (any method), the method's own export hook materialises plain
``lora_down``/``lora_up``/``alpha`` (+ ``dora_scale``), and the run's training facts (kohya ``ss_*``
entries, trigger word, resolution) are written beside the method's own metadata. So every route gives
the same metadata as the run's own file, in the run's ``save_precision`` unless told otherwise.

The training facts are kept in ``<run>/lora_facts.json`` (written with the final file); runs made
before it existed take them from their final file.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from ..data import tag_frequency
from ..paths import atomic_write_text
from .config import TrainConfig
from .process import check_not_training
from .runs import RunDir

FACTS_FILE = "lora_facts.json"
_SAVE_DTYPES = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}


class RunExportError(ValueError):
    """A run's LoRA cannot be exported as asked; the message says why and what to do."""


def save_dtype(cfg: TrainConfig) -> str:
    """The file precision a run asks for (``save_precision``)."""
    return _SAVE_DTYPES.get(cfg.save_precision, "fp32")


def write_run_lora(run: RunDir, weights, out: str | os.PathLike[str], *, facts: Mapping[str, Any], step: int,
                   fmt: str = "kohya", dtype: str | None = None, embeddings=None) -> Path:
    """Write ``weights`` (a ``LoraWeights`` or an adapter) of ``run`` at ``step`` with the run's facts.

    ``embeddings`` (trained token rows per text encoder, pivotal runs) are bundled into a kohya file as
    ``bundle_emb.<name>.*`` (A1111/Forge load them with the LoRA).
    """
    from ..lora import save_lora

    metadata = dict(facts.get("metadata") or {})
    metadata["ss_steps"] = str(step)
    path = save_lora(weights, out, format=fmt,  # type: ignore[arg-type]
                     metadata=metadata, family=facts["family"], prediction_type=facts["prediction_type"],
                     title=facts.get("title") or run.name, dtype=dtype or facts.get("dtype") or "fp32")
    if embeddings is not None and fmt == "kohya":
        path = _bundle_embeddings(path, run, embeddings, family=facts["family"], dtype=dtype or facts.get("dtype"))
    return path


def run_embedding_path(run: RunDir) -> Path:
    """Where a run's embedding file goes: ``<run>/embeddings/<name>.safetensors``. Other tools call an
    embedding by its file name, so the file is named after the trigger word (see ``embedding_name``)."""
    from .config import embedding_name

    return run.path / "embeddings" / f"{embedding_name(run.load_config())}.safetensors"


def run_embedding_file(run: RunDir | str | os.PathLike[str]) -> Path | None:
    """The run's embedding file when training wrote one (runs that learn trigger tokens), else None."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    try:
        path = run_embedding_path(run)
    except Exception:  # noqa: BLE001 - a run without a readable config has no embedding to offer
        return None
    return path if path.is_file() else None


def write_run_embedding(run: RunDir, vectors, *, facts: Mapping[str, Any], step: int,
                        out: str | os.PathLike[str] | None = None, dtype: str | None = None) -> Path:
    """Write a run's trained token embeddings as an A1111/ComfyUI embedding file (atomically)."""
    from ..lora.formats.embedding import save_embedding
    from .config import caption_trigger, embedding_name

    cfg = run.load_config()
    meta = {"sdlora_embedding_name": embedding_name(cfg), "sdlora_trained_tokens": caption_trigger(cfg),
            "sdlora_trigger_word": cfg.trigger_word, "sdlora_base_family": str(facts["family"]),
            "sdlora_steps": str(step), "ss_output_name": cfg.output_name}
    return save_embedding(vectors, out or run_embedding_path(run), family=facts["family"],
                          dtype=_torch_dtype(dtype or facts.get("dtype") or "fp32"), metadata=meta)


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


def _bundle_embeddings(path: Path, run: RunDir, vectors, *, family: str, dtype: str | None) -> Path:
    """Rewrite the kohya file ``path`` with the embeddings bundled in (atomically; metadata kept)."""
    from ..lora.formats.embedding import bundle_tensors
    from ..lora.formats.io import atomic_save, read_safetensors
    from .config import embedding_name

    tensors, meta = read_safetensors(path)
    torch_dtype = _torch_dtype(dtype or "fp32")
    name = embedding_name(run.load_config())
    tensors.update({k: v.to(torch_dtype) for k, v in bundle_tensors(name, vectors, family).items()})
    meta["sdlora_bundled_embeddings"] = name
    return atomic_save(tensors, path, meta)


def checkpoint_embeddings(run: RunDir, checkpoint: Path):
    """The trained token rows of a checkpoint (per text encoder), or None when the run learns no tokens."""
    from safetensors.torch import load_file

    from .checkpoint import EMBEDDINGS_FILE

    f = checkpoint / EMBEDDINGS_FILE
    if not f.is_file():
        return None
    state = load_file(str(f))
    return [state[f"te{i}"] for i in range(len(state))]


def save_facts(run: RunDir, *, family: str, prediction_type: str, title: str, dtype: str,
               metadata: Mapping[str, str]) -> dict[str, Any]:
    """Record a run's training facts so that later exports write the same metadata."""
    facts = {"family": family, "prediction_type": prediction_type, "title": title, "dtype": dtype,
             "metadata": dict(metadata)}
    atomic_write_text(run.path / FACTS_FILE, json.dumps(facts, indent=1))
    return facts


def load_facts(run: RunDir) -> dict[str, Any]:
    """A run's training facts: ``lora_facts.json``, else those in its final file, else from its config."""
    path = run.path / FACTS_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RunExportError(f"{path} is damaged ({e}); export the run's final file instead.") from None
    cfg = run.load_config()
    facts: dict[str, Any] = {"family": None, "prediction_type": "epsilon", "title": cfg.output_name,
                             "dtype": save_dtype(cfg), "metadata": {}}
    if run.lora_path.is_file():
        from ..lora.formats.io import read_metadata

        meta = read_metadata(run.lora_path)
        facts["metadata"] = {k: v for k, v in meta.items()
                             if (k.startswith("ss_") and not k.startswith("ss_network_")) or k == "sdlora_trigger_word"}
        version = meta.get("ss_base_model_version", "")
        facts["family"] = "sdxl" if version.startswith("sdxl") else "sd2" if version.startswith("sd_v2") else "sd1"
        facts["prediction_type"] = "v_prediction" if meta.get("modelspec.prediction_type") == "v" else "epsilon"
        if meta.get("modelspec.resolution"):
            facts["metadata"]["modelspec.resolution"] = meta["modelspec.resolution"]
    return facts


def checkpoint_weights(run: RunDir, step: int | None = None, base: Any = None):
    """(weights, base, step) of checkpoint ``step`` (default: the newest good one), exported by the run's method.

    The adapter is restored into the run's base model (loaded unless ``base`` is given) exactly as a
    resume restores it; ``base`` is returned so callers can read its family.
    """
    from .checkpoint import load_run_adapter

    from .checkpoint import checkpoint_problem, newest_good_checkpoint

    checkpoint = run.checkpoints_dir / f"step-{int(step)}" if step is not None else newest_good_checkpoint(run)[0]
    if checkpoint is None or not (checkpoint / "adapter.safetensors").is_file():
        available = [p.name for p in run.checkpoints()]
        which = f"checkpoint step-{step}" if step is not None else "checkpoint"
        raise RunExportError(f"Run {run.path} has no {which}; available: {', '.join(available) or 'none'}.")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise RunExportError(f"Checkpoint {checkpoint.name} of run {run.path} is damaged ({problem}); export another step.")
    base, adapter = load_run_adapter(run.path, step=int(checkpoint.name.split("-", 1)[1]), base=base)
    return adapter.export(), base, int(checkpoint.name.split("-", 1)[1])


def _default_out(run: RunDir, step: int | None, rank: int | None, fmt: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name).strip("._") or "lora"
    suffix = (f"-step{step}" if step is not None else "") + (f"-r{rank}" if rank else "")
    suffix += "-diffusers" if fmt == "diffusers" else ""
    return run.path / "exports" / f"{stem}{suffix}.safetensors"


def export_run(run_dir: str | os.PathLike[str], *, fmt: str = "kohya", out: str | os.PathLike[str] | None = None,
               step: int | None = None, rank: int | None = None, dtype: str | None = None) -> Path:
    """Export a run's LoRA as ``fmt`` ("kohya" / "diffusers"): its last checkpoint, or ``step``.

    ``rank`` re-ranks every layer above it (SVD of its delta; a DyLoRA run keeps its leading
    components). ``dtype`` defaults to the run's ``save_precision``. ``out`` defaults to
    ``<run>/exports/<name>[-step<N>][-r<rank>][-diffusers].safetensors``.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise RunExportError(f"{run.path} is not a run directory (no config.toml).")
    cfg = run.load_config()
    if step is None:
        # "the run's LoRA" of a run that is still training is not decided yet; a checkpoint is.
        check_not_training(run, "export the run's final LoRA (give --step N to export a saved checkpoint)")
    facts = load_facts(run)
    if run.checkpoints():
        weights, base, at = checkpoint_weights(run, step)
        if facts.get("family") is None:
            facts["family"], facts["prediction_type"] = base.family, base.prediction_type
    elif step is None and run.lora_path.is_file():
        # No checkpoint is left (removed by hand): the final file is all there is.
        from ..lora.formats import export_from

        return export_from(run.lora_path, fmt=fmt, out=out or _default_out(run, None, rank, fmt), rank=rank,
                           dtype=dtype or save_dtype(cfg), base=cfg.pretrained_model_name_or_path)
    else:
        raise RunExportError(f"Run {run.path} has no checkpoint and no final LoRA file to export yet.")
    if rank:
        weights = _resize(weights, int(rank))
    target = Path(out).expanduser() if out is not None else _default_out(run, step, rank, fmt)
    embeddings = checkpoint_embeddings(run, run.checkpoints_dir / f"step-{at}")
    return write_run_lora(run, weights, target, facts=facts, step=at, fmt=fmt, dtype=dtype, embeddings=embeddings)


def _resize(weights, rank: int):
    """The method's own lower-rank copy (DyLoRA truncates its nested ranks, the others take an SVD)."""
    from ..lora.variants import get_method

    return get_method(weights.method).reduce_rank(weights, rank)


def save_merged_checkpoint(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype=None) -> Path:
    """Write a Delta-LoRA run's exact result (base + total change) as an A1111 single-file checkpoint.

    Loads the run's base model, rebuilds the adapter from the run's newest good checkpoint (weights and
    ``A_K``/``B_K``), folds it in (``delta_lora.merge_into_base``) and saves with ``save_single_file``.
    """
    from ..lora.errors import LoraError
    from ..lora.variants.delta_lora import merge_into_base
    from ..models.single_file import save_single_file
    from .checkpoint import load_run_adapter

    base, adapter = load_run_adapter(run_dir)
    if adapter.method.name != "delta_lora":
        raise LoraError(f"{run_dir} is a {adapter.method.name!r} run; a merged checkpoint here is for Delta-LoRA runs.")
    merge_into_base(adapter)
    return save_single_file(base.pipe, out, dtype=dtype, metadata={"sdlora_merged_from": Path(run_dir).name})


def training_facts(cfg: TrainConfig, data, step: int, t_start: float) -> dict[str, str]:
    """kohya ``ss_*`` facts of the run (the file writer adds the network and model fields)."""
    return {
        "ss_num_train_images": str(data.num_items),
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.effective_unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_optimizer": cfg.optimizer_type,
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma or None),
        "ss_noise_offset": str(cfg.noise_offset or None),
        "ss_seed": str(cfg.seed),
        "ss_sd_model_name": Path(cfg.pretrained_model_name_or_path).name,
        # kohya counts the tags of the caption files (not the templated training captions).
        "ss_tag_frequency": json.dumps(tag_frequency(data.scan.items)),
        "ss_dataset_dirs": json.dumps({g: {"n_repeats": n["repeats"], "img_count": n["images"]}
                                       for g, n in data.scan.groups().items()}),
        "ss_training_started_at": str(t_start),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.output_name,
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_flip_aug": str(cfg.flip_aug),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "sdlora_trigger_word": cfg.trigger_word,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
    }
