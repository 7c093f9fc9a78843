"""The training loop: ``train(config, callbacks=[...])``.

Read top to bottom: preflight checks (before any model is loaded), run directory, accelerate,
base model, adapters, data (+ cached latents / text embeddings), class images for prior
preservation, optimizer and schedule, resume, then the loop with samples, checkpoints and events.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (inject_run_adapter, load_checkpoint, newest_good_checkpoint, prune_checkpoints,
                         save_checkpoint)
from .config import ConfigError, TrainConfig, learning_rates
from .export import run_embedding_path, save_dtype, save_facts, training_facts, write_run_embedding, write_run_lora
from .events import Callback, Checkpoint, Done, EventLog, Failed, Message, Start, Step, Stopped, Warning_
from .measure import count_flops, matmul_peak_flops
from .precision import resolve_precision
from .speed import prepare_for_training
from .process import STOP_REQUEST_NAME, RunLock
from .runs import RunDir
from .step import diffusion_loss, sample_noise


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    state: str                 # "done" | "stopped"
    step: int
    lora_path: Path | None
    checkpoint: Path | None


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_run(cfg: TrainConfig) -> RunDir:
    """Validate, check the data (before loading any model) and write the run's config.toml."""
    cfg.validate()
    from .batches import preflight

    preflight(cfg)
    run = RunDir(cfg.run_dir)
    if run.exists() and (run.latest_checkpoint() or run.lora_path.exists()):
        raise ConfigError("output_name", f"run directory {run.path} already holds a run; choose another output_name "
                          f"or resume it with `sdlora train --resume {run.path}`")
    run.write_config(cfg)
    return run


def train(cfg: TrainConfig | None = None, callbacks: list[Callback] | None = None, *,
          resume: str | Path | None = None) -> TrainResult:
    """Train a LoRA as configured and export it; or continue the run directory ``resume``.

    Events go to ``callbacks`` and ``run_dir/events.jsonl``. On SIGTERM/SIGINT a checkpoint is saved
    and the result's state is ``"stopped"``; ``train(resume=run_dir)`` continues exactly from it.
    """
    if resume is not None:
        run = RunDir(resume)
        if not run.exists():
            raise ConfigError("resume", f"{run.path} is not a run directory (no config.toml)")
        cfg = run.load_config()
        cfg.validate()
        from .batches import preflight

        preflight(cfg)
    else:
        if cfg is None:
            raise ValueError("train() needs a config or resume=RUN_DIR")
        run = prepare_run(cfg)

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings in process-wide singletons; a second run in the same process
    # (Python API, notebooks, tests) may use another precision, so start each run from a clean state.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, precision_warning = resolve_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=device == "cpu", log_with="tensorboard" if cfg.log_with else None,
                              project_dir=str(run.path / "logs") if cfg.log_with else None)
    # One trainer per run directory: the main process holds the run's lock until it exits (a second
    # trainer is refused before it writes anything; see process.py).
    lock = RunLock(run.path).acquire() if accelerator.is_main_process else None
    if lock is not None:
        (run.path / STOP_REQUEST_NAME).unlink(missing_ok=True)  # a stop asked of an earlier process
    try:
        return _train_locked(cfg, run, accelerator, callbacks, precision, precision_warning, resume is not None)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, run: RunDir, accelerator, callbacks, precision: str,
                  precision_warning: str | None, resumed: bool) -> TrainResult:
    log = EventLog(run.events_path, callbacks, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        run.write_status("running", "loading the base model", step=0, total_steps=cfg.max_train_steps)
        for partial in run.remove_partial_files():
            log.emit(Message(f"removed {partial.name}, left half-written by a stopped process"))
    if precision_warning:
        log.emit(Warning_(precision_warning))
    step = 0
    try:
        with _StopFlag() as stop, contextlib.ExitStack() as cleanup:
            return _train(cfg, run, accelerator, log, stop, precision, resumed, cleanup)
    except (TrainingError, ConfigError) as e:
        _fail(run, log, accelerator, step, str(e))
        raise
    except Exception as e:  # noqa: BLE001 - the run directory must say why it failed
        if _is_disk_full(e):
            msg = _disk_full_message(run)
            _fail(run, log, accelerator, step, msg)
            raise TrainingError(msg) from None
        if _is_out_of_memory(e):
            msg = (f"out of memory ({str(e).splitlines()[0][:120]}): lower train_batch_size (now {cfg.train_batch_size}), "
                   f"resolution (now {cfg.resolution}) or network_dim (now {cfg.network_dim}), or turn on "
                   "gradient_checkpointing and mixed_precision")
            _fail(run, log, accelerator, step, msg)
            raise TrainingError(msg) from None
        _fail(run, log, accelerator, step, f"{type(e).__name__}: {e}")
        raise


def safe_tracker_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "run"


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text or "cannot allocate memory" in text


def _fail(run: RunDir, log: EventLog, accelerator, step: int, message: str) -> None:
    last = run.last_step_event()
    step = last["step"] if last else step
    try:
        log.emit(Failed(step=step, error=message))
        if accelerator.is_main_process:
            run.write_status("failed", message, step=step)
    except OSError:
        pass  # e.g. the disk is full: the message still reaches the caller (and the CLI's output)


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC as Python raises it, as safetensors words it, or as torch's zip writer reports it ("unexpected pos",
    "file write failed")."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    if "no space left on device" in text or "os error 28" in text:  # e.g. safetensors' writer
        return True
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


def _disk_full_message(run: RunDir) -> str:
    """One line: the disk is full, where, how much the next checkpoint needs, which checkpoint is intact."""
    import shutil

    from .checkpoint import newest_good_checkpoint

    good, _ = newest_good_checkpoint(run)
    need = sum(f.stat().st_size for f in good.iterdir() if f.is_file()) if good else None
    try:
        free = shutil.disk_usage(run.path).free
    except OSError:
        free = None
    parts = [f"the disk is full: writing in {run.path} failed"]
    if free is not None:
        parts.append(f"{free / 1e6:.1f} MB free there")
    if need:
        parts.append(f"the next checkpoint needs about {need / 1e6:.1f} MB")
    if good is not None:
        parts.append(f"the last complete checkpoint ({good.name}) is intact: free some space and resume with "
                     f"`sdlora train --resume {run.path}`")
    else:
        parts.append("no checkpoint was saved yet: free some space and start again")
    return "; ".join(parts)


def _train(cfg: TrainConfig, run: RunDir, accelerator, log: EventLog, stop: _StopFlag, precision: str,
           resumed: bool, cleanup: contextlib.ExitStack) -> TrainResult:
    from diffusers.optimization import get_scheduler

    from ..models.loading import load_base
    from . import batches, class_images, samples

    t_start = time.time()
    from accelerate.utils import set_seed

    set_seed(cfg.seed + accelerator.process_index)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    if accelerator.device.type == "cpu":
        weight_dtype = torch.float32  # frozen weights stay fp32 on CPU; autocast runs the matmuls in bf16

    log.emit(Message(f"loading base model {cfg.pretrained_model_name_or_path}"))
    base = load_base(cfg.pretrained_model_name_or_path, dtype=weight_dtype, device=str(accelerator.device))
    unet, vae = base.unet, base.vae
    text_encoders = tuple(base.text_encoders)  # (CLIP) for SD 1.x/2.x; (CLIP ViT-L, OpenCLIP bigG) for SDXL
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
        m.eval()
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # the SDXL VAE overflows in fp16: it encodes in fp32 (latents are cached once)
        log.emit(Message("the VAE runs in fp32: it overflows in fp16"))
    noise_scheduler = base.noise_scheduler
    if cfg.resolution * 2 <= base.resolution:
        log.emit(Warning_(f"resolution {cfg.resolution} is far below this base model's native {base.resolution} px; "
                          f"it learns best near {base.resolution} (set resolution = {base.resolution})"))

    # Class images are made with the plain base model, before adapters exist.
    class_items = []
    if cfg.with_prior_preservation:
        class_items = class_images.ensure_class_images(cfg, base, log, accelerator)

    # Caching runs the frozen VAE / text encoder once, before adapters exist.
    data = batches.build(cfg, base, class_items, accelerator, log, run.path)

    adapter = inject_run_adapter(cfg, base)
    tokens = None  # new trigger tokens whose embeddings train (textual inversion / pivotal tuning)
    if cfg.embedding_tokens:
        from ..lora.formats.embedding import own_tokenizers
        from .embeddings import add_trained_tokens

        own_tokenizers(base.pipe)
        tokens = add_trained_tokens(cfg, base.tokenizers, text_encoders)
        log.emit(Message(f"learning {len(tokens.tokens)} new token(s) {''.join(tokens.tokens)} in "
                         f"{len(tokens.layers)} text encoder(s)" + (" (textual inversion: no LoRA)" if cfg.embedding_only
                                                                    else "")))
    trained_encoders = text_encoders if cfg.train_text_encoder else ()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in trained_encoders:
            te.gradient_checkpointing_enable()
    for m in adapter.models:
        m.train()
    if cfg.speed_mode == "off":
        log.emit(Message("speed_mode off: plain PyTorch layers (no CPU fast paths)"))
    else:
        prepare_for_training(unet, trained_encoders, accelerator.device, warn=lambda text: log.emit(Warning_(text)))
    if cfg.embedding_only:  # textual inversion: the adapter stays at its identity init, frozen, and is not exported
        for p in adapter.parameters():
            p.requires_grad_(False)
        param_groups = []
    else:
        param_groups = adapter.param_groups(**learning_rates(cfg), weight_decay=cfg.weight_decay)
    if tokens is not None:
        param_groups += tokens.param_groups(cfg.embedding_lr)
    # Trained weights stay fp32 even when the frozen base runs in fp16/bf16 (mixed precision).
    for g in param_groups:
        for p in g["params"]:
            if p.dtype != torch.float32:
                p.data = p.data.float()
    n_trainable = sum(p.numel() for g in param_groups for p in g["params"])
    optimizer = _make_optimizer(cfg, param_groups, accelerator.device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)

    start_step = 0
    latest, damaged = newest_good_checkpoint(run)
    for path, why in damaged:
        log.emit(Warning_(f"checkpoint {path.name} is damaged ({why}); resuming from "
                          f"{latest.name if latest else 'the start'} instead"))
    if resumed and latest is not None:
        state = load_checkpoint(latest, adapter=adapter, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                embeddings=tokens)
        start_step = state["step"]
        data.load_state_dict(state["data"])
        log.emit(Message(f"resumed from {latest.name}"))

    # Only what must be wrapped is prepared: DDP for the trained modules when there are several
    # processes, and the optimizer (fp16 grad scaling). The LR schedule is stepped by hand, once per
    # optimizer step, so it does not depend on the number of processes.
    multi = accelerator.num_processes > 1
    train_unet = accelerator.prepare(unet) if multi else unet
    train_tes = tuple(accelerator.prepare(te) for te in text_encoders) if multi and cfg.train_text_encoder \
        else text_encoders
    optimizer = accelerator.prepare(optimizer)

    if cfg.log_with:
        accelerator.init_trackers(safe_tracker_name(cfg.output_name), config={k: v for k, v in cfg.to_dict().items()
                                                                              if isinstance(v, (int, float, str, bool))})
    log.emit(Start(run_dir=str(run.path), total_steps=cfg.max_train_steps, start_step=start_step,
                   num_images=data.num_images, num_train_items=data.num_items, device=str(accelerator.device),
                   precision=precision, trainable_params=n_trainable, resumed=start_step > 0))
    if accelerator.is_main_process:
        run.write_status("running", "training", step=start_step, total_steps=cfg.max_train_steps)

    def micro_step(batch) -> Any:
        cond = data.unet_kwargs(batch, data.encode_prompts(batch, train_tes))
        noise, timesteps = sample_noise(batch.latents, batch.sample_ids, cfg.seed,
                                        noise_scheduler.config.num_train_timesteps, cfg.noise_offset)
        with accelerator.autocast():
            out = diffusion_loss(train_unet, batch.latents, cond["encoder_hidden_states"], noise_scheduler,
                                 noise=noise, timesteps=timesteps, min_snr_gamma=cfg.min_snr_gamma,
                                 is_prior=batch.is_prior, prior_loss_weight=cfg.prior_loss_weight,
                                 added_cond_kwargs=cond.get("added_cond_kwargs"))
        if out.loss.requires_grad:  # textual inversion after embedding_stop_fraction: nothing trains any more
            accelerator.backward(out.loss)
        return out

    parking = _park_frozen(run, base, data, adapter, accelerator, log)
    cleanup.callback(parking.discard)
    params = [p for g in param_groups for p in g["params"]]
    peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, accelerator.device.type)
    flops_per_step: float | None = None  # counted on this process's first micro-step (the count only watches the ops)
    times: list[float] = []
    step = start_step
    if tokens is not None:
        from .embeddings import stop_step

        token_stop = stop_step(cfg)
    while step < cfg.max_train_steps:
        t0 = time.perf_counter()
        losses, prior_losses = [], []
        adapter.method.before_step(adapter, step=step, total_steps=cfg.max_train_steps)
        if tokens is not None:
            tokens.set_trainable(step < token_stop)
        for micro in range(cfg.gradient_accumulation_steps):
            batch = data.next_batch()
            final = micro == cfg.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if final or not multi else accelerator.no_sync(train_unet)
            with sync:
                if flops_per_step is None and micro == 0:
                    out, flops = _counted(micro_step, batch)
                    flops_per_step = flops * cfg.gradient_accumulation_steps
                else:
                    out = micro_step(batch)
            losses.append(out.loss_instance)
            if out.loss_prior is not None:
                prior_losses.append(out.loss_prior)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        adapter.method.after_optimizer_step(adapter, step=step, total_steps=cfg.max_train_steps, optimizer=optimizer)
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = _mean_over_processes(sum(losses) / len(losses), accelerator)
        if not math.isfinite(loss):
            good = run.latest_checkpoint()
            raise TrainingError(f"loss became {loss} at step {step}; stopped. Lower learning_rate (now {cfg.learning_rate:g})"
                                f" or use mixed_precision=no. The last good checkpoint is "
                                f"{good.name if good else 'none (no checkpoint was saved yet)'}")
        dt = time.perf_counter() - t0
        times.append(dt)
        recent = times[-20:] if len(times) > 1 else times
        sec = sum(recent[1:] if len(recent) > 1 else recent) / max(1, len(recent) - (1 if len(recent) > 1 else 0))
        log.emit(Step(step=step, total_steps=cfg.max_train_steps, loss=loss, lr=lr_scheduler.get_last_lr()[0],
                      it_per_s=1.0 / sec if sec > 0 else 0.0, eta_s=sec * (cfg.max_train_steps - step),
                      loss_prior=_mean_over_processes(sum(prior_losses) / len(prior_losses), accelerator)
                      if prior_losses else None,
                      mfu=(flops_per_step / sec / peak) if flops_per_step and sec > 0 else None, epoch=data.epoch))

        if cfg.log_with:
            accelerator.log({"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        want_stop = _all_agree(stop.set, accelerator)
        last = step >= cfg.max_train_steps
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 and not last and accelerator.is_main_process:
            with parking.restored():
                samples.make_samples(cfg, base, run, step, log)
        if want_stop or (cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0) or last:
            cp = _checkpoint(run, cfg, step, adapter, optimizer, lr_scheduler, data, accelerator, log, tokens)
            if want_stop and not last:
                log.emit(Stopped(step=step, checkpoint=str(cp) if cp else None))
                if accelerator.is_main_process:
                    run.write_status("stopped", f"stopped at step {step}; resume to continue", step=step,
                                     total_steps=cfg.max_train_steps)
                accelerator.end_training()
                return TrainResult(run.path, "stopped", step, None, cp)

    digests = _adapter_digests(adapter, accelerator)
    if len(set(digests)) > 1:
        raise TrainingError(f"the {len(digests)} processes ended with different adapter weights: {digests}")
    lora_path = None
    if accelerator.is_main_process:
        if cfg.sample_at_end:
            parking.restore()
            samples.make_samples(cfg, base, run, step, log)
        facts = save_facts(run, family=base.family, prediction_type=base.prediction_type, title=cfg.output_name,
                           dtype=save_dtype(cfg), metadata=training_facts(cfg, data, step, t_start))
        embedding = None
        if tokens is not None:
            embedding = write_run_embedding(run, tokens.vectors(), facts=facts, step=step)
            log.emit(Message(f"wrote the embedding {embedding} (A1111/ComfyUI embeddings folder; "
                             f"type '{embedding.stem}' in prompts)"))
        if not cfg.embedding_only:
            lora_path = write_run_lora(run, adapter, run.lora_path, facts=facts, step=step,
                                       embeddings=tokens.vectors() if tokens is not None else None)
            _report_export_error(lora_path, log)
        run.write_status("done", "finished", step=step, total_steps=cfg.max_train_steps)
    accelerator.wait_for_everyone()
    done_path = lora_path or (run_embedding_path(run) if cfg.embedding_only else run.lora_path)
    log.emit(Done(step=step, lora_path=str(done_path), seconds=time.time() - t_start,
                  processes=accelerator.num_processes, adapter_digests=digests))
    accelerator.end_training()
    return TrainResult(run.path, "done", step, lora_path, run.latest_checkpoint())


def _park_frozen(run: RunDir, base, data, adapter, accelerator, log: EventLog):
    """The VAE and text encoders out of memory while the steps run, where the steps never call
    them (all their outputs cached, nothing of them trains); see ``train.parking``."""
    from .parking import Parking

    holding = {id(m) for m in adapter.models}
    candidates = {"vae": base.vae} if data.latents_cached else {}
    if data.text_cached:
        candidates.update({f"text_encoder_{i + 1}": te for i, te in enumerate(base.text_encoders)})
    modules = {k: m for k, m in candidates.items()
               if id(m) not in holding and not any(p.requires_grad for p in m.parameters())}
    parking = Parking(modules, accelerator.device, run.parked_dir, accelerator.process_index)
    if modules:
        names = " and ".join(", ".join(modules).rsplit(", ", 1))
        where = "to the CPU" if accelerator.device.type != "cpu" else f"to disk ({run.parked_dir.name})"
        if parking.park():
            log.emit(Message(f"moved the frozen {names} {where} until the samples "
                             f"({parking.nbytes / 1e9:.2f} GB): their outputs are cached"))
        elif parking.reason:
            log.emit(Message(f"kept the frozen {names} in memory: {parking.reason}"))
    return parking


def _checkpoint(run, cfg, step, adapter, optimizer, lr_scheduler, data, accelerator, log, tokens=None) -> Path | None:
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(run.checkpoints_dir / f"step-{step}", step=step, adapter=adapter, optimizer=optimizer,
                               lr_scheduler=lr_scheduler, extra=dict(data=data.state_dict()), embeddings=tokens)
        prune_checkpoints(run.checkpoints(), cfg.save_last_n_checkpoints)
        log.emit(Checkpoint(step=step, path=str(path)))
    accelerator.wait_for_everyone()
    return path


def _counted(micro_step, batch) -> tuple[Any, float]:
    """One micro-step and its FLOPs (forward + backward, ``measure.count_flops``): the count only
    watches the ops as they pass, so this step is the step an uncounted run takes."""
    box = {}

    def run():
        box["out"] = micro_step(batch)

    flops = float(count_flops(run))
    return box["out"], flops


def _mean_over_processes(value: float, accelerator) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="mean").item())


def _adapter_digests(adapter, accelerator) -> list[str]:
    """A hash of the adapter weights of every process (they must all be equal after DDP training)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(adapter.state_dict().items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    if accelerator.num_processes == 1:
        return [h.hexdigest()]
    from accelerate.utils import gather_object

    return list(gather_object([h.hexdigest()]))


def _all_agree(flag: bool, accelerator) -> bool:
    """A stop asked on any process stops all of them at the same step."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _make_optimizer(cfg: TrainConfig, param_groups: list[dict], device) -> torch.optim.Optimizer:
    kwargs = dict(cfg.optimizer_args)
    if cfg.optimizer_type == "AdamW":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, **kwargs)
    if cfg.optimizer_type == "AdamW8bit":
        if getattr(device, "type", str(device)) != "cuda":
            raise ConfigError("optimizer_type", "AdamW8bit needs a CUDA GPU (bitsandbytes has no CPU path); use AdamW here")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer_type", "AdamW8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, weight_decay=cfg.weight_decay, **kwargs)
    if cfg.optimizer_type == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, weight_decay=cfg.weight_decay, **kwargs)
    raise ConfigError("optimizer_type", f"unknown optimizer {cfg.optimizer_type!r}")


def _report_export_error(lora_path: Path, log) -> None:
    """Say in the event log how closely an approximating export (Delta-LoRA's SVD) matches the training.

    Methods whose file is an approximation write ``sdlora_*_error`` entries into its metadata; they
    go to the events too, so the page and train.log show them, not only ``sdlora inspect``.
    """
    from safetensors import safe_open

    with safe_open(str(lora_path), framework="pt") as f:
        meta = f.metadata() or {}
    errors = {k: v for k, v in sorted(meta.items()) if k.startswith("sdlora_") and k.endswith("_error")}
    if errors:
        log.emit(Message("the exported file approximates the trained adapter: "
                         + ", ".join(f"{k.removeprefix('sdlora_')} {v}" for k, v in errors.items())))
