"""Train the bundled demo base model from scratch on the synthetic world, on a CPU.

Run ``python -m sdlora.demo.train_base --out sdlora/sample_data/demo-model`` (the CLI exposes the
same as ``sdlora demo-base train --out DIR``). Stages, each checkpointed in ``--work-dir`` so the
command can be stopped and rerun to continue (``--max-minutes`` stops it cleanly after a while):

1. ``vae``: the autoencoder learns to reconstruct renders of the world plus random textures
   (stripes of any angle and period, outlines, grain, any colour), so it can also draw looks that
   the base UNet never saw (the style sets).
2. ``latents``: a fixed set of base scenes (training combinations only) is rendered and encoded once.
3. ``unet``: the UNet and the CLIP text encoder learn jointly to predict noise (epsilon, SD 1.x
   schedule, min-SNR weighting), with 10 % of captions dropped for classifier-free guidance and an
   EMA of the weights.
4. ``decoder``: the VAE decoder trains further with the encoder frozen (the latent space the UNet
   learned on does not change), for sharper colours and textures.
5. ``export``: the EMA weights are written as a diffusers folder (fp16) with a model card, a sample
   grid and the prompt-following numbers measured by :mod:`sdlora.demo.metrics`.

Everything is seeded: data come from the renderer keyed by (seed, step), and the checkpoints hold
the torch RNG state, so a run in pieces follows the same path as a run in one go. The training loop
is the project's own (small and specific to this model); the parts are diffusers/transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..train.step import min_snr_weight
from . import world
from .model import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    RESOLUTION,
    build_models,
    build_vae,
    save_demo_model,
    scheduler_config_kwargs,
)


@dataclass
class BaseTrainConfig:
    """Settings of a demo-base training run (the defaults made the shipped model)."""

    seed: int = 1234
    threads: int = 2
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    #: Weight of the KL term against the per-pixel *mean* reconstruction loss. Stable Diffusion's
    #: VAE used 1e-6 against a per-image *sum* over 3 x 256 x 256 values, i.e. about 5e-12 in these
    #: terms; 1e-6 here kept the posterior std at a sixth of the latent spread, which blurred
    #: colours (the decoder cannot tell nearby colours apart through that noise).
    vae_kl_weight: float = 1e-10
    decoder_steps: int = 300
    decoder_lr: float = 3e-4
    num_cached: int = 12000
    unet_steps: int = 6500
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_per_combo: int = 4
    eval_steps: int = DEFAULT_STEPS


def _images_to_tensor(images: Sequence) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _log(work: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(work / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


class _Deadline:
    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def _vae_batch(cfg: BaseTrainConfig, step: int) -> torch.Tensor:
    rng = random.Random(cfg.seed * 1_000_003 + step)
    images = []
    for _ in range(cfg.vae_batch):
        if rng.random() < 0.5:
            images.append(world.render(world.random_scene(rng), size=RESOLUTION))
        else:
            images.append(world.texture_image(rng, size=RESOLUTION))
    return _images_to_tensor(images)


def train_vae(cfg: BaseTrainConfig, work: Path, deadline: _Deadline) -> bool:
    """Stage 1; returns True when the autoencoder is fully trained."""
    final = work / "vae_final.pt"
    if final.exists():
        return True
    vae = build_vae(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    ckpt = _load_checkpoint(work / "vae_ckpt.pt")
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
    else:
        torch.manual_seed(cfg.seed)
    vae.train()
    t0 = time.monotonic()
    while step < cfg.vae_steps:
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = _vae_batch(cfg, step)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            _log(work, {"stage": "vae", "step": step, "rec": round(rec.item(), 5), "kl": round(kl.item(), 1),
                        "lr": lr, "s_per_step": round((time.monotonic() - t0) / 25, 3)})
            t0 = time.monotonic()
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps or deadline.passed():
            _save_checkpoint(work / "vae_ckpt.pt", {"model": vae.state_dict(), "opt": opt.state_dict(),
                                                    "rng": torch.get_rng_state(), "step": step})
            if deadline.passed() and step < cfg.vae_steps:
                return False
    _save_checkpoint(final, {"model": vae.state_dict()})
    return True


def _load_vae(cfg: BaseTrainConfig, work: Path, tuned: bool = False):
    vae = build_vae(cfg.seed)
    path = work / ("vae_tuned.pt" if tuned else "vae_final.pt")
    vae.load_state_dict(_load_checkpoint(path)["model"])
    vae.eval().requires_grad_(False)
    return vae


def tune_decoder(cfg: BaseTrainConfig, work: Path, deadline: _Deadline) -> bool:
    """Stage 3b: train the VAE decoder further with the encoder frozen.

    The latent space stays exactly the one the UNet learns on (the encoder does not change), so this
    stage can run before, after or alongside the UNet stage; it sharpens colours and textures of
    decoded images. Returns True when done.
    """
    final = work / "vae_tuned.pt"
    if final.exists():
        return True
    vae = _load_vae(cfg, work)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder_params, lr=cfg.decoder_lr, weight_decay=0.0)
    step = 0
    ckpt = _load_checkpoint(work / "decoder_ckpt.pt")
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
    else:
        torch.manual_seed(cfg.seed + 3)
    vae.decoder.train()
    t0 = time.monotonic()
    while step < cfg.decoder_steps:
        lr = cfg.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = _vae_batch(cfg, cfg.vae_steps + step)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        rec.backward()
        torch.nn.utils.clip_grad_norm_(decoder_params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            _log(work, {"stage": "decoder", "step": step, "rec": round(rec.item(), 5), "lr": lr,
                        "s_per_step": round((time.monotonic() - t0) / 25, 3)})
            t0 = time.monotonic()
        if step % cfg.checkpoint_every == 0 or step == cfg.decoder_steps or deadline.passed():
            _save_checkpoint(work / "decoder_ckpt.pt", {"model": vae.state_dict(), "opt": opt.state_dict(),
                                                        "rng": torch.get_rng_state(), "step": step})
            if deadline.passed() and step < cfg.decoder_steps:
                return False
    _save_checkpoint(final, {"model": vae.state_dict()})
    return True


def cache_latents(cfg: BaseTrainConfig, work: Path) -> None:
    """Stage 2: render the fixed training scenes and store their latent mean/std and captions."""
    out = work / "latents.pt"
    if out.exists():
        return
    vae = _load_vae(cfg, work)
    items = world.scenes(cfg.seed + 1, cfg.num_cached, world.train_combos())
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(items), 64):
            x = _images_to_tensor([world.render(s, size=RESOLUTION) for s in items[i:i + 64]])
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean = torch.cat(means)
    std = torch.cat(stds)
    scaling = 1.0 / float(torch.sqrt((mean ** 2).mean() - mean.mean() ** 2 + (std ** 2).mean()))
    _save_checkpoint(out, {"mean": mean, "std": std, "scaling_factor": torch.tensor(scaling),
                           "captions": [world.caption(s) for s in items]})
    _log(work, {"stage": "latents", "n": len(items), "scaling_factor": scaling})


def _tokenize(captions: Sequence[str]) -> torch.Tensor:
    from ..models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def train_unet(cfg: BaseTrainConfig, work: Path, deadline: _Deadline) -> bool:
    """Stage 3; returns True when the UNet and text encoder are fully trained."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if (work / "unet_final.pt").exists():
        return True
    data = _load_checkpoint(work / "latents.pt")
    mean, std, scaling = data["mean"], data["std"], float(data["scaling_factor"])
    captions: list[str] = data["captions"]
    unique = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    tokens = _tokenize(unique)
    empty = len(unique) - 1

    _, unet, text_encoder = build_models(cfg.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.unet_steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    noise_sched = DDPMScheduler(**scheduler_config_kwargs())
    step = 0
    ckpt = _load_checkpoint(work / "unet_ckpt.pt")
    if ckpt is not None:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
    else:
        torch.manual_seed(cfg.seed + 2)
    unet.train()
    text_encoder.train()
    t0 = time.monotonic()
    losses: list[float] = []
    while step < cfg.unet_steps:
        idx = torch.randint(0, mean.shape[0], (cfg.unet_batch,))
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        cap = caption_ids[idx].clone()
        cap[torch.rand(cfg.unet_batch) < cfg.caption_dropout] = empty
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,))
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text_encoder(tokens[cap])[0]
        pred = unet(noisy, t, hidden).sample
        weight = min_snr_weight(noise_sched, t, cfg.min_snr_gamma)  # the LoRA trainer's weighting
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            _log(work, {"stage": "unet", "step": step, "loss": round(sum(losses) / len(losses), 5),
                        "lr": sched.get_last_lr()[0], "s_per_step": round((time.monotonic() - t0) / 25, 3)})
            losses.clear()
            t0 = time.monotonic()
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps or deadline.passed():
            _save_checkpoint(work / "unet_ckpt.pt", {
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "ema": ema.state_dict(), "rng": torch.get_rng_state(), "step": step})
            if deadline.passed() and step < cfg.unet_steps:
                return False
    ema.copy_to(params)
    _save_checkpoint(work / "unet_final.pt", {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()})
    return True


def ema_models_from_checkpoint(cfg: BaseTrainConfig, work: Path):
    """``(vae, unet, text_encoder)`` with the EMA weights of the latest (or final) checkpoint."""
    from diffusers.training_utils import EMAModel

    vae = _load_vae(cfg, work, tuned=(work / "vae_tuned.pt").exists())
    vae.config.scaling_factor = float(_load_checkpoint(work / "latents.pt")["scaling_factor"])
    vae.register_to_config(scaling_factor=vae.config.scaling_factor)
    _, unet, text_encoder = build_models(cfg.seed)
    final = _load_checkpoint(work / "unet_final.pt")
    if final is not None:
        unet.load_state_dict(final["unet"])
        text_encoder.load_state_dict(final["text_encoder"])
    else:
        ckpt = _load_checkpoint(work / "unet_ckpt.pt")
        if ckpt is None:
            raise FileNotFoundError(f"no UNet checkpoint in {work}; run the 'unet' stage first")
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        params = list(unet.parameters()) + list(text_encoder.parameters())
        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to(params)
    return vae.eval(), unet.eval(), text_encoder.eval()


def export(cfg: BaseTrainConfig, work: Path, out: Path) -> dict:
    """Stage 4: write the diffusers folder, the sample grid, the metrics and the model card."""
    from .card import write_model_card
    from .metrics import evaluate_prompt_following, generate, sample_grid

    vae, unet, text_encoder = ema_models_from_checkpoint(cfg, work)
    save_demo_model(out, vae, unet, text_encoder)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    generate(pipe, ["a red circle on a white background"], [0], cfg.eval_steps, DEFAULT_GUIDANCE)  # warm-up
    t0 = time.perf_counter()
    generate(pipe, ["a blue star on a black background"] * 3, [1, 2, 3], cfg.eval_steps, DEFAULT_GUIDANCE, batch_size=1)
    seconds_per_image = (time.perf_counter() - t0) / 3
    report = evaluate_prompt_following(pipe, per_combo=cfg.eval_per_combo, steps=cfg.eval_steps,
                                       guidance=DEFAULT_GUIDANCE, seed=cfg.seed)
    sample_grid(pipe, out / "samples.png", steps=cfg.eval_steps, guidance=DEFAULT_GUIDANCE, seed=cfg.seed)
    notes_file = work / "NOTES.md"
    notes = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else None
    write_model_card(out, cfg=asdict(cfg), report=report, params=params, seconds_per_image=seconds_per_image,
                     notes=notes)
    report["seconds_per_image"] = seconds_per_image
    _log(work, {"stage": "export", **{k: v for k, v in report.items() if not isinstance(v, (list, dict))}})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlora.demo.train_base",
                                     description="Train the demo base model (resumable; rerun to continue).")
    parser.add_argument("--out", required=True, help="folder to write the diffusers model to")
    parser.add_argument("--work-dir", default=None, help="checkpoints and logs (default: <out>.work)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly (after a checkpoint) once this many minutes have passed")
    parser.add_argument("--stage", choices=("all", "train", "vae", "latents", "unet", "decoder", "export"), default="all",
                        help="run only one stage, or 'train' for vae+latents+unet+decoder (default: all remaining stages)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of BaseTrainConfig, e.g. --set unet_steps=100 (repeatable)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    cfg = BaseTrainConfig()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in BaseTrainConfig.__dataclass_fields__:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                         f"{', '.join(BaseTrainConfig.__dataclass_fields__)}")
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, kind(value))
        except ValueError:
            parser.error(f"--set {item!r}: {value!r} is not a valid {kind.__name__}")
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "config.json"
    if saved.exists():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if previous != asdict(cfg):
            parser.error(f"{saved} was written with other settings ({previous}); use the same options "
                         "to resume, or a new --work-dir to start over")
    else:
        saved.write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
    torch.set_num_threads(cfg.threads)
    deadline = _Deadline(args.max_minutes)
    stages = {"all": ("vae", "latents", "unet", "decoder", "export"),
              "train": ("vae", "latents", "unet", "decoder")}.get(args.stage, (args.stage,))
    needs = {"latents": "vae_final.pt", "unet": "latents.pt", "decoder": "vae_final.pt", "export": "unet_ckpt.pt"}
    for stage in stages:
        if stage in needs and not (work / needs[stage]).exists() and not (
                stage == "export" and (work / "unet_final.pt").exists()):
            earlier = {"latents": "vae", "unet": "latents", "decoder": "vae", "export": "unet"}[stage]
            parser.error(f"stage {stage!r} needs {work / needs[stage]}; run the {earlier!r} stage first "
                         "(or --stage all)")
        if stage == "vae" and not train_vae(cfg, work, deadline):
            print(f"stopped after --max-minutes; rerun the same command to continue ({work})")
            return 0
        if stage == "latents":
            cache_latents(cfg, work)
        if stage == "unet" and not train_unet(cfg, work, deadline):
            print(f"stopped after --max-minutes; rerun the same command to continue ({work})")
            return 0
        if stage == "decoder" and not tune_decoder(cfg, work, deadline):
            print(f"stopped after --max-minutes; rerun the same command to continue ({work})")
            return 0
        if stage == "export":
            report = export(cfg, work, out)
            print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
