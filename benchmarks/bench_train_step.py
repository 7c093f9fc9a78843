"""Speed and memory of one LoRA training step on the SD 1.5 architecture (random weights, no download).

Builds the real SD 1.5 UNet (859.5 M parameters, config shipped in ``sdlora/models/configs/sd1``)
and CLIP ViT-L text encoder with random weights and times the project's own training step, the
one ``sdlora.train.loop`` runs: adapters from ``inject_adapters`` with the loop's ``LoraSpec``
(rank 16, alpha 16; conv rank/alpha 16 for ``full``), UNet-only LoRA, a cached latent (256 px,
batch 1) and cached text embeddings, ``sample_noise`` + ``diffusion_loss`` under accelerate's
autocast, ``accelerator.backward``, gradient clipping, and the loop's AdamW on the adapter's
param groups. Printed, all measured in the same run:

* seconds per step (median and best of ``--steps`` steps) for each preset and precision, with the
  speed settings of ``sdlora.train.speed.prepare_for_training`` ("sdlora") and without them
  ("plain": the same step on the unmodified layers), interleaved step by step so that changing
  machine load hits both alike, and their ratio;
* the FLOPs of one step (``sdlora.train.measure.count_flops``) and the achieved FLOP/s as a share of
  this machine's matmul peak (``torch.mm`` and oneDNN's matmul on 2048 x 2048 matrices, fp32 and
  bf16, measured at the start and the end of the run; the best counts);
* CPU seconds per step and how many cores other processes used meanwhile (``/proc/stat``);
* peak RSS of a training process at 256 and 512 px with gradient checkpointing (each in a fresh
  subprocess holding the UNet, text encoder and VAE like a training run; Linux's ``VmHWM``, the
  ``ru_maxrss`` of the process's own memory);
* with ``--threads-compare``: the step in subprocesses with different OpenMP thread settings.

With ``--peers DIR`` the same job also runs as whole training processes, one after the other on
this machine (``benchmarks/peers.py``): kohya sd-scripts' ``train_network.py`` (``--cache_latents
--sdpa``, attn-mlp = its default LoRA; full = ``conv_dim``/``conv_alpha`` 16), diffusers'
DreamBooth-LoRA example, and ``sdlora train`` itself, all on ``DIR/sd15-random`` (the same SD 1.5
architecture with random weights) and the same images, timed step to step from their progress
(data loading and the optimizer included), with the whole job (launch to exit) split into start,
steps and end, and the cores other processes used meanwhile. Then the ratios. Without ``--peers``
no other trainer's figure is printed: a ratio against a figure from another machine says nothing.
The peers' folders are set up outside the project as ``../shared/peer-bench/setup.sh`` does (see
``peers.py``).

Usage::

    python benchmarks/bench_train_step.py                      # default run, under 10 minutes on 2 cores
    python benchmarks/bench_train_step.py --steps 5 --presets attn-mlp --precisions bf16 --skip-rss
    python benchmarks/bench_train_step.py --threads-compare --skip-rss --presets attn-mlp
    python benchmarks/bench_train_step.py --skip-rss --peers /tmp/peers --peer-steps 20   # + kohya, diffusers
    python benchmarks/bench_train_step.py --presets '' --skip-rss --peers /tmp/peers --peer-steps 100 \
        --peer-trainers sdlora,kohya --peer-presets attn-mlp                              # the whole job

OpenMP reads its settings when torch is imported, so they are set here before that:
``GOMP_SPINCOUNT=1000`` (threads spin briefly, then sleep) unless ``--omp`` says otherwise or the
environment already sets ``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT``. See docs/performance.md: on a
machine shared with other processes, OpenMP's default long spinning makes a step 2-3x slower,
while sleeping at once (``PASSIVE``) costs 30 % on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import busy_seconds as _busy_seconds  # noqa: E402  (no torch import)
CONFIGS = ROOT / "sdlora" / "models" / "configs" / "sd1"

PRECISION_NAMES = {"fp32": "no", "bf16": "bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (default 3; median and best reported)")
    p.add_argument("--presets", default="attn-mlp,full", help="LoRA target presets, comma-separated (default attn-mlp,full)")
    p.add_argument("--precisions", default="auto",
                   help="fp32, bf16 or both comma-separated; 'auto' = fp32, plus bf16 where the CPU runs it faster")
    p.add_argument("--size", type=int, default=256, help="image size in pixels for the timings (default 256)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank and alpha, conv rank and alpha for 'full' (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--omp", choices=tuple(OMP_SETTINGS), default="short-spin",
                   help="OpenMP waiting of this process: short-spin (GOMP_SPINCOUNT=1000, default), passive "
                        "(OMP_WAIT_POLICY=PASSIVE), active (OMP_WAIT_POLICY=ACTIVE) or default (OpenMP's own); "
                        "ignored where the environment already sets OMP_WAIT_POLICY or GOMP_SPINCOUNT")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-sizes", default="256,512", help="sizes for the peak-RSS runs (default 256,512)")
    p.add_argument("--rss-precisions", default="",
                   help="precisions of the peak-RSS runs (default: the one training picks here with mixed_precision=auto)")
    p.add_argument("--rss-modes", default="auto",
                   help="speed-setting modes of the peak-RSS runs, comma-separated: auto (what training uses: 'low' with "
                        "gradient checkpointing), speed, low, plain (no speed settings); default auto")
    p.add_argument("--ablation", action="store_true",
                   help="also time each speed setting alone (first preset, each precision; blocks of --steps steps)")
    p.add_argument("--gc-timings", type=int, default=0, metavar="SIZE",
                   help="also time the step with gradient checkpointing at SIZE px (attn-mlp, the auto precision): "
                        "plain and both memory modes of the speed settings, in this process")
    p.add_argument("--threads-compare", action="store_true",
                   help="also time the step in subprocesses with different OpenMP thread settings")
    p.add_argument("--peers", type=Path, help="folder of the peer trainers (see peers.py): also run kohya sd-scripts, "
                                              "diffusers' example and sdlora's CLI as whole processes, same job")
    p.add_argument("--peer-steps", type=int, default=20, help="steps of each whole-process run (default 20)")
    p.add_argument("--peer-presets", default="", help="presets of the whole-process runs (default: --presets)")
    p.add_argument("--peer-trainers", default="sdlora,kohya,diffusers",
                   help="which whole-process runs (default sdlora,kohya,diffusers; diffusers runs its own attention-only LoRA once)")
    p.add_argument("--peer-precisions", default="fp32", help="precisions of the whole-process runs (fp32, bf16; default fp32)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timings: the top N ops of one sdlora step by self CPU time (torch.profiler), per preset")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    return p.parse_args(argv)


#: OpenMP environment of each ``--omp`` choice (read by the OpenMP runtime when torch is imported).
OMP_SETTINGS = {
    "short-spin": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "default": {},
}


def _omp_env_text() -> str:
    keys = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "OpenMP defaults"


def _set_openmp_env(choice: str) -> None:
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ.update(OMP_SETTINGS[choice])


# Everything below imports torch lazily, after the OpenMP environment is set -------------------------


def _config(part: str, name: str = "config.json") -> dict:
    data = json.loads((CONFIGS / part / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}


def train_config(preset: str, rank: int, precision: str, gradient_checkpointing: bool = False):
    """The run settings of the benchmark, as a TrainConfig (so adapters and optimizer are the loop's)."""
    from sdlora.train.config import TrainConfig

    return TrainConfig(network_preset=preset, network_dim=rank, network_alpha=float(rank), conv_dim=rank,
                       conv_alpha=float(rank), train_text_encoder=False, mixed_precision=precision,
                       gradient_checkpointing=gradient_checkpointing, train_batch_size=1)


class Models:
    """SD 1.5-architecture UNet and CLIP text encoder (random weights), the text embeddings cached
    like the loop's cache, and optionally a VAE (only held, for a training run's memory footprint)."""

    def __init__(self, *, with_vae: bool = False):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from sdlora.models.tokenizer import clip_tokenizer

        torch.manual_seed(0)
        self.unet = UNet2DConditionModel.from_config(_config("unet"))
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
        self.vae = AutoencoderKL.from_config(_config("vae")) if with_vae else None
        self.scheduler = DDPMScheduler.from_config(_config("scheduler", "scheduler_config.json"))
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        tok = clip_tokenizer()
        ids = tok(["a lighthouse on a cliff, in sks style"], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            self.hidden = self.text_encoder(ids)[0]


class Trainer:
    """One training step as ``sdlora.train.loop`` runs it (micro-step, gradient clipping, optimizer
    step; the constant LR schedule and the batch fetch from the cache are left out). ``models`` brings
    the UNet, scheduler and cached text conditioning (``hidden``; SDXL's ``added_cond_kwargs`` and its
    own ``latents`` when it has them); ``bench_sdxl_step.py`` uses it too."""

    def __init__(self, models: Models, cfg, size: int, *, speed: bool, memory: str = "auto"):
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from sdlora.lora import inject_adapters
        from sdlora.train.config import learning_rates, lora_spec
        from sdlora.train.loop import _make_optimizer
        from sdlora.train.precision import resolve_precision
        from sdlora.train.speed import SpeedOptions, prepare_for_training

        AcceleratorState._reset_state(True)  # one process measures several precisions
        self.precision, _ = resolve_precision(cfg.mixed_precision, "cpu")
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=True)
        self.models, self.cfg = models, cfg
        self.adapter = inject_adapters(models.unet, None, lora_spec(cfg))
        if cfg.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        models.unet.train()
        self.report = (prepare_for_training(models.unet, None, self.accelerator.device, SpeedOptions(memory=memory))
                       if speed else None)
        groups = self.adapter.param_groups(**learning_rates(cfg), weight_decay=cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = self.accelerator.prepare(_make_optimizer(cfg, groups, self.accelerator.device))
        self.latents = getattr(models, "latents", None)  # models may bring their own cached latent (SDXL)
        if self.latents is None:
            g = torch.Generator().manual_seed(0)
            self.latents = torch.randn(1, 4, size // 8, size // 8, generator=g) * 0.18215
        self.sample_id = 0

    def micro_step(self):
        from sdlora.train.step import diffusion_loss, sample_noise

        cfg = self.cfg
        self.sample_id += 1
        noise, timesteps = sample_noise(self.latents, [self.sample_id], cfg.seed,
                                        self.models.scheduler.config.num_train_timesteps, cfg.noise_offset)
        with self.accelerator.autocast():
            out = diffusion_loss(self.models.unet, self.latents, self.models.hidden, self.models.scheduler, noise=noise,
                                 timesteps=timesteps, min_snr_gamma=cfg.min_snr_gamma,
                                 added_cond_kwargs=getattr(self.models, "added_cond_kwargs", None))
        self.accelerator.backward(out.loss)
        return out

    def step(self) -> float:
        out = self.micro_step()
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss_instance

    def count_flops(self) -> float:
        from sdlora.train.measure import count_flops

        flops = float(count_flops(self.micro_step))
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    def remove(self) -> None:
        from sdlora.train.speed import restore

        restore(self.models.unet)
        self.adapter.remove()
        if self.cfg.gradient_checkpointing:
            self.models.unet.disable_gradient_checkpointing()


def timed(fn) -> dict:
    """Wall and CPU seconds of one call, and the cores other processes used meanwhile."""
    busy, cpu, t = _busy_seconds(), time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    after = _busy_seconds()
    others = None if busy is None or after is None else max(0.0, (after - busy - cpu) / wall)
    return {"wall": wall, "cpu": cpu, "others": others}


def matmul_peaks() -> dict[str, float]:
    import torch

    from sdlora.train.measure import cpu_bf16_speedup, measure_matmul_flops

    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if name == "bf16" and cpu_bf16_speedup() < 1.0:
            out[f"{name} torch.mm"] = measure_matmul_flops(dtype, "cpu", "torch.mm", repeat=2)
            continue
        for backend in ("torch.mm", "onednn"):
            out[f"{name} {backend}"] = measure_matmul_flops(dtype, "cpu", backend)
    return out


def summarise(r: dict, peaks: dict[str, float]) -> tuple:
    """Add the summary of one preset/precision measurement to ``r`` (medians, speedup of the interleaved
    pairs, FLOP rate and its share of this machine's matmul peaks, other processes' load); returns the
    pieces the report prints: (flops, plain walls, sdlora walls, sdlora cpu, pair ratios, rate, same-precision peak)."""
    best_peak = max(peaks.values())
    flops = r["flops"]
    plain = [x["wall"] for x in r["plain"]]
    fast = [x["wall"] for x in r["sdlora"]]
    cpu = [x["cpu"] for x in r["sdlora"]]
    paired = [a / b for a, b in zip(plain, fast)]
    same_prec_peak = max(v for k, v in peaks.items() if k.startswith(r["precision"]))
    rate = flops / _median(fast)
    others = [x["others"] for x in r["plain"] + r["sdlora"] if x["others"] is not None]
    r.update(plain_median_s=_median(plain), sdlora_median_s=_median(fast), sdlora_best_s=min(fast),
             speedup_median_of_pairs=_median(paired), gflops_per_s=rate / 1e9,
             share_of_same_precision_peak=rate / same_prec_peak, share_of_best_peak=rate / best_peak,
             plain_share_of_best_peak=flops / _median(plain) / best_peak,
             others_cores_median=_median(others) if others else None)
    return flops, plain, fast, cpu, paired, rate, same_prec_peak


def _median(values):
    return statistics.median(values) if values else float("nan")


ABLATION = {
    "frozen Conv2d packs only": dict(frozen_linears=False, skip_lora_input_cast=False, attention="unchanged"),
    "frozen Linear via oneDNN only": dict(frozen_convs=False, skip_lora_input_cast=False, attention="unchanged"),
    "no adapter input copy only": dict(frozen_convs=False, frozen_linears=False, attention="unchanged"),
    "attention by size only": dict(frozen_convs=False, frozen_linears=False, skip_lora_input_cast=False),
    "all (prepare_for_training)": {},
}


def bench_ablation(models: Models, preset: str, precision: str, args) -> dict:
    """Each speed setting alone against the plain step: blocks of ``--steps`` steps after a warm-up,
    in two rounds (plain first and last) so that drifting load shows."""
    from sdlora.train.speed import SpeedOptions, prepare_for_training, restore

    trainer = Trainer(models, train_config(preset, args.rank, PRECISION_NAMES[precision]), args.size, speed=False)
    times: dict[str, list] = {"plain": [], **{k: [] for k in ABLATION}}
    try:
        trainer.step()
        for _ in range(2):
            times["plain"] += [timed(trainer.step) for _ in range(args.steps)]
            for label, opts in ABLATION.items():
                prepare_for_training(models.unet, None, "cpu", SpeedOptions(**opts))
                trainer.step()
                times[label] += [timed(trainer.step) for _ in range(args.steps)]
                restore(models.unet)
        times["plain"] += [timed(trainer.step) for _ in range(args.steps)]
    finally:
        trainer.remove()
    return {"preset": preset, "precision": precision, **times}


def bench_checkpointing(models: Models, size: int, precision: str, args) -> dict:
    """Gradient checkpointing at ``size``: plain step and the two memory modes, interleaved."""
    from sdlora.train.speed import SpeedOptions, prepare_for_training, restore, suspended

    cfg = train_config("attn-mlp", args.rank, PRECISION_NAMES[precision], gradient_checkpointing=True)
    trainer = Trainer(models, cfg, size, speed=False)
    times: dict[str, list] = {"plain": [], "low": [], "speed": []}
    try:
        trainer.step()
        for mode in ("low", "speed"):
            prepare_for_training(models.unet, None, "cpu", SpeedOptions(memory=mode))
            trainer.step()                      # warm-up: makes the weight packs of this mode
            for _ in range(args.steps):
                with suspended(models.unet):
                    times["plain"].append(timed(trainer.step))
                times[mode].append(timed(trainer.step))
            restore(models.unet)
    finally:
        trainer.remove()
    return {"size": size, "precision": precision, **times}


def profile_step(models: Models, preset: str, precision: str, args, top: int) -> str:
    """The top ``top`` ops of one sdlora step (after two warm-up steps) by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cfg = train_config(preset, args.rank, PRECISION_NAMES[precision])
    trainer = Trainer(models, cfg, args.size, speed=True)
    try:
        trainer.step()
        trainer.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    finally:
        trainer.remove()


def bench_preset(models: Models, preset: str, precision: str, args) -> dict:
    """Plain and sdlora step of one preset and precision, interleaved, plus the step's FLOPs."""
    from sdlora.train.speed import suspended

    cfg = train_config(preset, args.rank, PRECISION_NAMES[precision])
    trainer = Trainer(models, cfg, args.size, speed=True)
    try:
        with suspended(models.unet):
            trainer.step()                      # warm-up of the plain layers
            flops = trainer.count_flops()       # the step's work, counted on the plain layers
        trainer.step()                          # warm-up: makes the weight packs
        fast_flops = trainer.count_flops()
        plain, fast = [], []
        for _ in range(args.steps):
            with suspended(models.unet):
                plain.append(timed(trainer.step))
            fast.append(timed(trainer.step))
        return {"preset": preset, "precision": precision, "flops": flops, "flops_sdlora_path": fast_flops,
                "plain": plain, "sdlora": fast, "settings": trainer.report.summary() if trainer.report else "",
                "trainable_params": sum(p.numel() for p in trainer.params)}
    finally:
        trainer.remove()


# Child processes ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    ``VmHWM`` where Linux has it: ``ru_maxrss`` of a process started by fork + exec also counts
    what the parent held at the fork, so it would report the benchmark's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(spec: dict) -> dict:
    """One process: models like a training run (UNet + text encoder + VAE), gradient checkpointing,
    two steps at ``size``; returns peak RSS."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    models = Models(with_vae=True)
    cfg = train_config(spec["preset"], spec["rank"], PRECISION_NAMES[spec["precision"]], gradient_checkpointing=True)
    trainer = Trainer(models, cfg, spec["size"], speed=spec["mode"] != "plain", memory=spec["mode"])
    times = [timed(trainer.step) for _ in range(3)]
    return {"maxrss_mb": peak_rss_mb(), "steps": times,
            "settings": trainer.report.summary() if trainer.report else "plain"}


def child_threads(spec: dict) -> dict:
    """One process: the sdlora step with this process's OpenMP/thread settings."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    models = Models()
    trainer = Trainer(models, train_config(spec["preset"], spec["rank"], PRECISION_NAMES[spec["precision"]]),
                      spec["size"], speed=True)
    trainer.step()
    steps = [timed(trainer.step) for _ in range(spec["steps"])]
    return {"threads": torch.get_num_threads(), "openmp": _omp_env_text(), "steps": steps}


def run_child(spec: dict, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh Python process (``env``: its whole environment, default ours)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ) if env is None else env,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# Main --------------------------------------------------------------------------------------------


def run_peers(args, presets: list[str], results: list[dict]) -> list:
    """The whole-process runs of ``--peers``, one at a time, and the same-run ratios."""
    import peers as P

    peer_dir = args.peers.resolve()
    trainers = [t.strip() for t in args.peer_trainers.split(",") if t.strip()]
    missing = P.check_peers(peer_dir, "sd15", [t for t in trainers if t != "sdlora"])
    if missing:
        raise SystemExit(f"--peers {peer_dir}: missing {', '.join(missing)} (set it up as ../shared/peer-bench/setup.sh does)")
    peer_presets = [p.strip() for p in (args.peer_presets or ",".join(presets) or "attn-mlp").split(",") if p.strip()]
    mp = PRECISION_NAMES
    precisions = [p.strip() for p in args.peer_precisions.split(",") if p.strip()]
    print(f"\nwhole training processes on {peer_dir / 'sd15-random'} ({args.size} px, batch 1, rank {args.rank}, UNet-only "
          f"LoRA, AdamW, {args.peer_steps} steps), one at a time, each with the environment this benchmark started "
          f"with ({', '.join(f'{k}={v}' for k, v in P.BASE_ENV.items() if k.startswith(('OMP_', 'GOMP_', 'MKL_'))) or 'OpenMP defaults'}); "
          f"{P.load_line()}:", flush=True)
    out: list = []
    for precision in precisions:
        for preset in peer_presets:
            for trainer in [t for t in trainers if t in ("sdlora", "kohya")]:
                job = P.Job("sd15", args.size, args.peer_steps, preset=preset, rank=args.rank,
                            precision=mp[precision], threads=args.threads)
                out.append(P.run(trainer, peer_dir, job, echo=lambda t: print("  " + t, flush=True)))
        if "diffusers" in trainers:
            job = P.Job("sd15", args.size, args.peer_steps, preset="attn", rank=args.rank, precision=mp[precision],
                        threads=args.threads)
            out.append(P.run("diffusers", peer_dir, job, echo=lambda t: print("  " + t, flush=True)))

    def find(trainer, preset, precision):
        return next((r for r in out if r.trainer == trainer and r.job.preset == preset and r.job.precision == precision
                     and r.median_step() and not r.error), None)

    print("\nsdlora / peer, same machine, same run (< 1: sdlora faster; steps 2..N, step to step; the job: launch to "
          "exit):")
    for precision in precisions:
        for preset in peer_presets:
            ours, kohya = find("sdlora", preset, mp[precision]), find("kohya", preset, mp[precision])
            if ours and kohya:
                print(f"  {preset:9s} {precision} step: sdlora {ours.median_step():.2f} s / kohya {kohya.median_step():.2f} s = "
                      f"{ours.median_step() / kohya.median_step():.2f}x (target <= 0.8x); CPU s/step "
                      f"{ours.median_of('cpu') or float('nan'):.2f} / {kohya.median_of('cpu') or float('nan'):.2f}; "
                      f"others used {ours.median_of('others') or 0:.2f} / {kohya.median_of('others') or 0:.2f} cores")
                print(f"  {preset:9s} {precision} job of {args.peer_steps} steps: sdlora {ours.wall_s:.0f} s / kohya "
                      f"{kohya.wall_s:.0f} s = {ours.wall_s / kohya.wall_s:.2f}x; peak RSS {ours.maxrss_gb or 0:.2f} / "
                      f"{kohya.maxrss_gb or 0:.2f} GiB")
            for r in results:  # the in-process step beside the process's own
                if ours and r["preset"] == preset and r["precision"] == precision:
                    print(f"  {preset:9s} {precision}: in-process step {r['sdlora_median_s']:.2f} s, the CLI process's "
                          f"{ours.median_step():.2f} s")
        diff = find("diffusers", "attn", mp[precision])
        for preset in peer_presets:
            ours = find("sdlora", preset, mp[precision])
            if ours and diff:
                print(f"  {preset:9s} {precision} vs diffusers' example (its attention-only LoRA, VAE + text encoder "
                      f"every step): {ours.median_step():.2f} / {diff.median_step():.2f} s = "
                      f"{ours.median_step() / diff.median_step():.2f}x; job {ours.wall_s:.0f} / {diff.wall_s:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        sys.path.insert(0, str(ROOT))
        result = child_rss(spec) if spec["kind"] == "rss" else child_threads(spec)
        print(json.dumps(result))
        return 0
    _set_openmp_env(args.omp)
    sys.path.insert(0, str(ROOT))
    import torch

    from sdlora.train.measure import cpu_bf16_speedup
    from sdlora.train.precision import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    bf16_speedup = cpu_bf16_speedup()
    if args.precisions == "auto":
        precisions = ["fp32"] + (["bf16"] if bf16_speedup >= 1.5 else [])
    else:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISION_NAMES]
    if bad:
        raise SystemExit(f"--precisions: unknown {bad}; use fp32, bf16 or auto")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    auto_precision = "bf16" if resolve_precision("auto", "cpu")[0] == "bf16" else "fp32"
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    print(f"sdlora training-step benchmark: SD 1.5 UNet (random weights), {args.size} px, batch 1, rank {args.rank}, "
          f"UNet-only LoRA, cached latents and text embeddings")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {_omp_env_text()}, "
          f"{os.cpu_count()} CPUs; bf16/fp32 speed {bf16_speedup:.1f}x; mixed_precision=auto trains in "
          f"{auto_precision} here; load average {load_start[0]:.1f} / {load_start[1]:.1f} / {load_start[2]:.1f}")

    peaks_before = matmul_peaks()
    results = []
    for preset in presets:
        t0 = time.perf_counter()
        models = Models()  # fresh per preset: no adapter layers left over from the previous one
        print(f"built models in {time.perf_counter() - t0:.0f} s", flush=True)
        for precision in precisions:
            r = bench_preset(models, preset, precision, args)
            results.append(r)
            p, f = [x["wall"] for x in r["plain"]], [x["wall"] for x in r["sdlora"]]
            others = [x["others"] for x in r["plain"] + r["sdlora"] if x["others"] is not None]
            print(f"  {preset:9s} {precision}: plain {_median(p):6.2f} s, sdlora {_median(f):6.2f} s "
                  f"(median of {len(f)}; others used {_median(others):.1f} cores meanwhile)", flush=True)
        del models
    peaks_after = matmul_peaks()
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    best_peak = max(peaks.values())

    # Report -------------------------------------------------------------------------------------
    print("\nmatmul peak (2048 x 2048, best of start and end of run): "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s")
    print(f"\n{'preset':9s} {'prec':4s} {'GFLOP':>6s} | {'plain s':>7s} {'sdlora s':>8s} {'best':>6s} {'cpu s':>6s} "
          f"{'speedup':>7s} | {'GFLOP/s':>7s} {'% peak':>6s} {'% best peak':>11s} | others")
    for r in results:
        flops, plain, fast, cpu, paired, rate, same_prec_peak = summarise(r, peaks)
        print(f"{r['preset']:9s} {r['precision']:4s} {flops / 1e9:6.1f} | {_median(plain):7.2f} {_median(fast):8.2f} "
              f"{min(fast):6.2f} {_median(cpu):6.2f} {_median(paired):6.2f}x | {rate / 1e9:7.1f} "
              f"{100 * rate / same_prec_peak:5.1f}% {100 * rate / best_peak:10.1f}% | "
              f"{r['others_cores_median'] if r['others_cores_median'] is not None else float('nan'):.1f} cores")
    print("  plain: the same step without prepare_for_training; speedup: median of per-step plain/sdlora pairs;\n"
          "  % peak: achieved FLOP/s (FLOPs counted on the plain step / median sdlora time) over the best matmul\n"
          "  peak of the same precision; % best peak: over the best peak of any precision; others: cores used by\n"
          "  other processes during the timed steps (a loaded machine slows every number here).")
    for r in results:
        if abs(r["flops_sdlora_path"] - r["flops"]) > 0.02 * r["flops"]:
            print(f"  note: {r['preset']} {r['precision']}: the sdlora path counted {r['flops_sdlora_path'] / 1e9:.1f} GFLOP")

    if args.profile:
        for preset in presets:
            models = Models()
            for precision in precisions:
                print(f"\nprofile of one sdlora step, {preset} {precision} (self CPU time):")
                print(profile_step(models, preset, precision, args, args.profile), flush=True)
            del models

    peers = run_peers(args, presets, results) if args.peers else []

    ablation = []
    if args.ablation and presets:
        models = Models()
        print(f"\neach setting alone ({presets[0]}; median s/step over two rounds of {args.steps} steps; "
              f"cpu s: process CPU seconds per step):")
        for precision in precisions:
            a = bench_ablation(models, presets[0], precision, args)
            ablation.append(a)
            plain_s = _median([x["wall"] for x in a["plain"]])
            plain_cpu = _median([x["cpu"] for x in a["plain"]])
            for label in ("plain", *ABLATION):
                wall, cpu = _median([x["wall"] for x in a[label]]), _median([x["cpu"] for x in a[label]])
                others = _median([x["others"] for x in a[label] if x["others"] is not None])
                print(f"  {precision} {label:30s}: {wall:6.2f} s ({plain_s / wall:.2f}x), cpu {cpu:6.2f} s "
                      f"({plain_cpu / cpu:.2f}x), others {others:.1f} cores", flush=True)
        del models

    checkpointing = None
    if args.gc_timings:
        models = Models()
        checkpointing = bench_checkpointing(models, args.gc_timings, auto_precision, args)
        del models
        print(f"\ngradient checkpointing, {args.gc_timings} px, attn-mlp, {auto_precision} (median s/step; "
              f"others used {_median([x['others'] for v in ('plain', 'low', 'speed') for x in checkpointing[v] if x['others'] is not None]):.1f} cores):")
        plain_s = _median([x["wall"] for x in checkpointing["plain"]])
        for mode in ("plain", "low", "speed"):
            m = _median([x["wall"] for x in checkpointing[mode]])
            print(f"  {mode:6s}: {m:6.2f} s  ({plain_s / m:.2f}x plain)")

    rss = []
    if not args.skip_rss:
        rss_precisions = [p.strip() for p in args.rss_precisions.split(",") if p.strip()] or [auto_precision]
        modes = [m.strip() for m in args.rss_modes.split(",") if m.strip()]
        print("\npeak RSS of a training process (UNet + text encoder + VAE, attn-mlp, gradient checkpointing, 3 steps;\n"
              "step times: the last two, after the weight packs are made):")
        for precision in rss_precisions:
            for size in [int(s) for s in args.rss_sizes.split(",") if s.strip()]:
                for mode in modes:
                    spec = {"kind": "rss", "preset": "attn-mlp", "rank": args.rank, "precision": precision,
                            "size": size, "mode": mode, "threads": args.threads}
                    out = run_child(spec)
                    out.update(spec)
                    rss.append(out)
                    label = "plain" if mode == "plain" else f"sdlora ({out['settings'].split('memory mode ')[-1].split(')')[0]})"
                    print(f"  {size} px {precision} {label:14s}: {out['maxrss_mb'] / 1024:5.2f} GB, "
                          f"step {_median([s['wall'] for s in out['steps'][1:]]):.1f} s"
                          + ("   goal <= 8 GB" if size == 512 else ""), flush=True)

    threads = []
    if args.threads_compare:
        precision = precisions[-1]
        print(f"\nthread settings (subprocesses, {presets[0]} {precision}, sdlora step, median of 3 steps):")
        n = os.cpu_count() or 1
        variants = [("OpenMP default (spinning waits)", {}, 0),
                    ("GOMP_SPINCOUNT=1000 (short spin)", {"GOMP_SPINCOUNT": "1000"}, 0),
                    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 0),
                    ("OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, 0),
                    ("1 thread", {"OMP_NUM_THREADS": "1"}, 1)]
        base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        for label, env, nthreads in variants:
            if nthreads == 1 and n == 1:
                continue
            spec = {"kind": "threads", "preset": presets[0], "rank": args.rank, "precision": precision,
                    "size": args.size, "steps": 3, "threads": nthreads}
            out = run_child(spec, env={**base_env, **env})
            out["label"] = label
            threads.append(out)
            walls = [s["wall"] for s in out["steps"]]
            others = [s["others"] for s in out["steps"] if s["others"] is not None]
            print(f"  {label:32s}: {_median(walls):6.2f} s/step (best {min(walls):.2f}), "
                  f"cpu {_median([s['cpu'] for s in out['steps']]):.2f} s, others {_median(others):.1f} cores", flush=True)

    load_end = os.getloadavg()
    print(f"\nload average at the end {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f}; "
          f"run took {time.perf_counter() - t_start:.0f} s")
    if args.json:
        data = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(), "openmp": _omp_env_text(),
                "bf16_speedup": bf16_speedup, "load_start": load_start, "load_end": load_end,
                "peaks": peaks, "results": results, "rss": rss, "thread_settings": threads,
                "checkpointing": checkpointing, "ablation": ablation, "peers": [r.to_dict() for r in peers]}
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
