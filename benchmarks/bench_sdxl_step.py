"""Speed and memory of one LoRA training step on the SDXL architecture (random weights, no download),
optionally beside kohya sd-scripts' ``sdxl_train_network.py`` on the same model in the same run.

Builds the real SDXL 1.0 base UNet (2567.5 M parameters; the config shipped in
``sdlora/models/configs/sdxl``, read through ``sdlora.models.shipped``) with random weights and
times the project's own training step, the one ``sdlora.train.loop`` runs: adapters from
``inject_adapters`` with the loop's ``LoraSpec`` (``lora_spec(TrainConfig(...))``: rank 16, alpha
16; conv rank/alpha 16 for ``full``), UNet-only LoRA, a cached latent (512 px -> 64 x 64, batch 1),
cached text conditioning (``encoder_hidden_states`` 1 x 77 x 2048 and SDXL's
``added_cond_kwargs``: pooled ``text_embeds`` 1 x 1280 and ``time_ids`` 1 x 6, all random, as the
cache would hand them over), ``sample_noise`` + ``diffusion_loss(..., added_cond_kwargs=...)``
under accelerate's autocast, ``accelerator.backward``, gradient clipping and the loop's AdamW
(``_make_optimizer``). Printed, all measured in the same run:

* seconds per step (median and best of ``--steps``) per preset (attn-mlp, full) and precision
  (fp32; bf16 only where ``cpu_bf16_speedup()`` says this CPU is fast at it), with the speed
  settings of ``prepare_for_training`` ("sdlora") and without them ("plain"), interleaved step by
  step so that changing load hits both alike, and their ratio;
* the FLOPs of one step (``count_flops``, on the plain step) and the achieved FLOP/s as a share of
  this machine's matmul peak (measured at the start and the end of the run; the best counts);
* CPU seconds per step and the cores other processes used meanwhile (``/proc/stat``);
* peak RSS of a training process at 1024 px with gradient checkpointing (``--rss-size``). With
  ``--peers``: ``sdlora train`` itself as a whole process on the peers' model folder and image
  (``benchmarks/peers.py``; ``/usr/bin/time -v``), then kohya's on the same. Without: a fresh
  subprocess holding what a training run holds (UNet, both text encoders (CLIP ViT-L and
  OpenCLIP bigG with projection) and the VAE, random weights built in memory), encoding the
  caption with both encoders and a 1024 px image with the VAE, then ``--rss-steps`` steps;
  Linux's ``VmHWM`` (this one keeps the text encoders and VAE, which the loop parks);
* with ``--peers DIR``: kohya sd-scripts' ``sdxl_train_network.py`` on the same random weights and
  settings (512 px, batch 1, rank 16, UNet-only, cached latents and text-encoder outputs, SDPA,
  AdamW, fp32, ``--steps`` + 1 steps, the first not counted; attn-mlp = kohya's default LoRA,
  full = ``--network_args conv_dim=16 conv_alpha=16``), run right after sdlora's timings, one
  process at a time, with the load of the machine recorded; its step time is read from its
  progress bar. Then the sdlora/kohya ratios, and both peak memories: kohya's from
  ``/usr/bin/time -v`` (maximum resident set size) at 1024 px with ``--gradient_checkpointing``,
  run right after sdlora's (``--peer-rss no`` skips kohya's). Without ``--peers`` no cross-trainer
  ratio is printed.

Order of a run: sdlora's timings (one subprocess), kohya's timing runs, sdlora's peak-RSS
process, kohya's 1024 px run; never two SDXL processes at once.

Memory: the SDXL UNet alone is 10.3 GB in fp32. Without gradient checkpointing a 512 px fp32 step
peaks at about 20 GB (sdlora's timing process, UNet only), and kohya, which also holds both text
encoders and the VAE, would need about 23 GB; on a 24 GB machine compare with
``--gradient-checkpointing`` (both trainers). The benchmark checks ``MemAvailable`` before each
SDXL process and skips it (saying so) where it would not fit, and ends a subprocess (its whole
process group) that brings ``MemAvailable`` under 1 GiB.

Peer setup (once; nothing of kohya's is part of this project)::

    # kohya's source as a plain folder (measured with kohya-ss/sd-scripts at 48d368f, Feb 2026):
    mkdir -p /tmp/peers/sd-scripts && git --git-dir=SD_SCRIPTS.git archive HEAD | tar -x -C /tmp/peers/sd-scripts
    python benchmarks/bench_sdxl_step.py setup --peers /tmp/peers    # about 10 minutes

(A mirror without the large files, e.g. the Windows bitsandbytes DLLs, makes ``git archive`` stop
at them; writing the tree blob by blob with ``git cat-file blob`` and skipping the missing ones
gives a folder that runs: kohya needs none of them on Linux.)

``setup`` makes, under DIR (each step skipped when its result exists):

* ``venv-kohya``: a venv with ``torch==2.13.0`` (CPU) and kohya's ``requirements.txt`` minus
  bitsandbytes (no CPU build);
* ``shim/``: the small torchvision stand-in of ``../shared/peer-bench`` (PIL + torch; PyPI's
  torchvision does not import beside this torch, kohya only uses its transforms);
* ``sdxl-random/``: the benchmark's random SDXL model (same seed, same weights as the timed one)
  as a diffusers folder, fp32 safetensors (about 14 GB on disk), the shipped configs, and both
  tokenizers from ``sdlora/models/tokenizer``;
* ``tokcache/``: the tokenizers kohya asks for (``openai/clip-vit-large-patch14`` and
  ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``) as local copies of the shipped CLIP vocabulary,
  passed with ``--tokenizer_cache_dir`` (no download);
* ``data/sdxl-512`` and ``data/sdxl-1024``: a few random-shape images with a caption, in kohya's
  ``<repeats>_<name>`` layout.

Usage::

    python benchmarks/bench_sdxl_step.py --gradient-checkpointing                  # sdlora only
    python benchmarks/bench_sdxl_step.py --steps 1 --rss-steps 1 --gradient-checkpointing \
        --peers /tmp/peers --json sdxl.json                                      # and kohya, ~70 min loaded
    python benchmarks/bench_sdxl_step.py --steps 2 --presets attn-mlp --skip-rss   # no checkpointing, ~20 GB

OpenMP settings as in ``bench_train_step.py`` (``GOMP_SPINCOUNT=1000`` unless set); kohya runs
with the same OpenMP environment and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

# Helpers shared with the SD 1.5 benchmark (none of them imports torch at import time).
from bench_train_step import Trainer as StepTrainer  # noqa: E402
from bench_train_step import (  # noqa: E402
    OMP_SETTINGS,
    PRECISION_NAMES,
    _busy_seconds,
    _median,
    _omp_env_text,
    _set_openmp_env,
    matmul_peaks,
    peak_rss_mb,
    summarise,
    timed,
    train_config,
)

FAMILY = "sdxl"
CAPTION = "a lighthouse on a cliff, in sks style"
KOHYA_TOKENIZERS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")


def need_gb(size: int, *, gradient_checkpointing: bool, full: bool) -> float:
    """Rough peak memory (GB) of one fp32 SDXL training process at ``size`` px, batch 1, for the
    check before it starts (the memory watch is what protects the machine): the UNet (10.3 GB),
    activations (at 512 px about 9.5 GB without checkpointing, 1-1.5 GB with it: kohya peaked at
    15.5 GB holding 13.9 GB of weights), and with ``full`` both text encoders and the VAE (3.6 GB);
    the VAE's encoding of the image comes before the step and needs less than the step."""
    scale = (size / 512) ** 2
    activations = (1.0 if gradient_checkpointing else 9.5) * scale
    return 10.3 + activations + (3.6 if full else 0.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (default 3; median and best reported)")
    p.add_argument("--presets", default="attn-mlp,full", help="LoRA target presets, comma-separated (default attn-mlp,full)")
    p.add_argument("--precisions", default="auto",
                   help="fp32, bf16 or both comma-separated; 'auto' = fp32, plus bf16 where the CPU runs it faster")
    p.add_argument("--size", type=int, default=512, help="image size in pixels for the timings (default 512)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="time the step with gradient checkpointing (sdlora and kohya alike); without it a 512 px fp32 "
                        "SDXL step needs about 20 GB (sdlora) and 23 GB (kohya, which also holds the text encoders and VAE)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank and alpha, conv rank and alpha for 'full' (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--omp", choices=tuple(OMP_SETTINGS), default="short-spin",
                   help="OpenMP waiting (as in bench_train_step.py); ignored where the environment sets it")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS subprocess")
    p.add_argument("--rss-size", type=int, default=1024, help="image size of the peak-RSS runs (default 1024)")
    p.add_argument("--rss-steps", type=int, default=2, help="training steps of the peak-RSS runs (default 2)")
    p.add_argument("--peers", type=Path, help="folder made by 'setup': also run kohya sd-scripts there")
    p.add_argument("--peer-rss", choices=("yes", "no"), default="yes",
                   help="with --peers: also run kohya at --rss-size with gradient checkpointing for its peak memory")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    return p.parse_args(argv)


def parse_setup_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_sdxl_step.py setup", description="Prepare the kohya peer run under DIR.")
    p.add_argument("--peers", type=Path, required=True, help="folder holding sd-scripts/ (kohya's source)")
    p.add_argument("--shim", type=Path, default=ROOT.parent / "shared" / "peer-bench" / "shim",
                   help="the torchvision stand-in to copy (default ../shared/peer-bench/shim)")
    p.add_argument("--python", default="python3", help="interpreter for kohya's venv (default python3)")
    return p.parse_args(argv)


# Memory watch and whole processes: benchmarks/peers.py -------------------------------------------------

from peers import MIN_AVAILABLE_GB, Job, Watched, load_line as _load_line, mem_available_gb  # noqa: E402
from peers import run as run_process  # noqa: E402


# Models and the step -------------------------------------------------------------------------------


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def build_parts(parts=("unet", "text_encoder", "text_encoder_2", "vae")):
    """The SDXL parts from the shipped configs with random weights, one at a time and always in the
    same order from seed 0 (so ``setup`` writes exactly the weights the timed model has). Yields
    ``(name, module)`` for the parts asked for; a part before them is still drawn, then dropped,
    to keep the random sequence."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sdlora.models.shipped import read_config, text_encoder_class

    torch.manual_seed(0)
    order = ("unet", "text_encoder", "text_encoder_2", "vae")
    last = max(order.index(p) for p in parts)
    for name in order[:last + 1]:
        config = _public(read_config(FAMILY, name))
        if name == "unet":
            module = UNet2DConditionModel.from_config(config)
        elif name == "vae":
            module = AutoencoderKL.from_config(config)
        else:
            module = text_encoder_class(FAMILY, name)(CLIPTextConfig(**config))
        if name in parts:
            yield name, module
        del module


class Models:
    """SDXL UNet (random weights) and the cached conditioning a training step is handed; with
    ``full=True`` also both text encoders and the VAE (held like a training run), the caption
    encoded by them and a latent made by the VAE from an image of ``size``."""

    def __init__(self, size: int, *, full: bool = False):
        import torch
        from diffusers import DDPMScheduler

        from sdlora.models.shipped import read_config

        parts = ("unet", "text_encoder", "text_encoder_2", "vae") if full else ("unet",)
        built = dict(build_parts(parts))
        self.unet = built["unet"]
        self.text_encoder = built.get("text_encoder")
        self.text_encoder_2 = built.get("text_encoder_2")
        self.vae = built.get("vae")
        sched = dict(read_config(FAMILY, "scheduler"))
        sched.setdefault("clip_sample", False)
        self.scheduler = DDPMScheduler.from_config(_public(sched))
        for m in built.values():
            m.requires_grad_(False)
            m.eval()
        g = torch.Generator().manual_seed(1)
        if full:
            self.hidden, self.added_cond_kwargs = self._encode_caption(size)
            image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
            with torch.no_grad():
                self.latents = self.vae.encode(image).latent_dist.sample(g) * self.vae.config.scaling_factor
        else:
            # What the caches hand the step: penultimate states of both encoders (768 + 1280),
            # encoder 2's pooled projection and the time ids (original size, crop, target size).
            self.hidden = torch.randn(1, 77, 2048, generator=g)
            self.added_cond_kwargs = {"text_embeds": torch.randn(1, 1280, generator=g),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}
            self.latents = torch.randn(1, 4, size // 8, size // 8, generator=g) * 0.13025

    def _encode_caption(self, size: int):
        import torch

        from sdlora.models.tokenizer import clip_tokenizer, openclip_tokenizer

        states, pooled = [], None
        with torch.no_grad():
            for tok, enc in ((clip_tokenizer(), self.text_encoder), (openclip_tokenizer(), self.text_encoder_2)):
                ids = tok([CAPTION], padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                out = enc(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


class Trainer(StepTrainer):
    """One training step as ``sdlora.train.loop`` runs it for SDXL: ``bench_train_step.Trainer`` with the
    models' own cached latent and added conditioning (``Models.latents``, ``Models.added_cond_kwargs``)."""

    def __init__(self, models: Models, cfg, *, speed: bool, memory: str = "auto"):
        super().__init__(models, cfg, 0, speed=speed, memory=memory)

    def counted_step(self) -> float:
        """One full step under the FLOP counter (its forward and backward are what is counted)."""
        from sdlora.train.measure import count_flops

        flops = float(count_flops(self.micro_step))
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return flops



def bench_preset(models: Models, preset: str, precision: str, args) -> dict:
    """Plain and sdlora step of one preset and precision, interleaved; the first (plain) step is the
    FLOP-counted warm-up, the second the sdlora warm-up that makes the weight packs."""
    from sdlora.train.speed import suspended

    cfg = train_config(preset, args.rank, PRECISION_NAMES[precision], gradient_checkpointing=args.gradient_checkpointing)
    trainer = Trainer(models, cfg, speed=True)
    try:
        with suspended(models.unet):
            flops = trainer.counted_step()
        trainer.step()
        plain, fast = [], []
        for _ in range(args.steps):
            with suspended(models.unet):
                plain.append(timed(trainer.step))
            fast.append(timed(trainer.step))
        return {"preset": preset, "precision": precision, "flops": flops, "plain": plain, "sdlora": fast,
                "settings": trainer.report.summary() if trainer.report else "",
                "trainable_params": sum(p.numel() for p in trainer.params)}
    finally:
        trainer.remove()


# Child process: peak RSS ---------------------------------------------------------------------------


def child_time(spec: dict) -> dict:
    """One process: the UNet built once, then plain and sdlora steps of each preset and precision."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    t = time.perf_counter()
    models = Models(args.size)
    out = {"build_s": time.perf_counter() - t, "unet_params": sum(p.numel() for p in models.unet.parameters()),
           "results": []}
    print(f"built the SDXL UNet in {out['build_s']:.0f} s ({out['unet_params'] / 1e6:.1f} M parameters)", flush=True)
    for preset in spec["presets"]:
        for precision in spec["precisions"]:
            r = bench_preset(models, preset, precision, args)
            out["results"].append(r)
            p, f = [x["wall"] for x in r["plain"]], [x["wall"] for x in r["sdlora"]]
            others = [x["others"] for x in r["plain"] + r["sdlora"] if x["others"] is not None]
            print(f"  {preset:9s} {precision}: plain {_median(p):6.2f} s, sdlora {_median(f):6.2f} s "
                  f"(median of {len(f)}; others used {_median(others):.1f} cores meanwhile; "
                  f"{r['trainable_params'] / 1e6:.2f} M trainable)", flush=True)
    out["maxrss_mb"] = peak_rss_mb()
    return out


def child_rss(spec: dict) -> dict:
    """One process holding what a training run holds (UNet, both text encoders, VAE), the caption
    and one image encoded, gradient checkpointing, ``steps`` steps at ``size``; peak RSS."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    print("building the models and encoding the caption and the image", flush=True)
    models = Models(spec["size"], full=True)
    built = time.perf_counter() - t
    after_build = peak_rss_mb()
    print(f"built and encoded in {built:.0f} s, peak RSS so far {after_build / 1024:.2f} GiB; training", flush=True)
    cfg = train_config(spec["preset"], spec["rank"], PRECISION_NAMES[spec["precision"]], gradient_checkpointing=True)
    trainer = Trainer(models, cfg, speed=spec["mode"] != "plain", memory=spec["mode"])
    times = [timed(trainer.step) for _ in range(spec["steps"])]
    return {"maxrss_mb": peak_rss_mb(), "maxrss_before_steps_mb": after_build, "build_s": built, "steps": times,
            "settings": trainer.report.summary() if trainer.report else "plain"}


def run_child(spec: dict, timeout: float = 7200, echo: bool = False) -> dict:
    """Run one measurement in a fresh Python process, watching the machine's memory (``echo``:
    print its progress lines as they come)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]

    def show(_now: float, text: str) -> None:
        if echo and not text.startswith("{"):
            print(text, flush=True)

    w = Watched(cmd, on_segment=show)
    rc = w.wait(timeout)
    lines = [t for _, t in w.segments if t.startswith("{")]
    peak = max((s[3] for s in w.samples), default=float("nan"))
    if w.killed_for_memory:
        stage = w.output(3).strip().splitlines()[-1] if w.segments else "building the models"
        return {"error": f"ended: MemAvailable fell under {MIN_AVAILABLE_GB} GiB (process RSS up to {peak:.1f} GB; "
                         f"last said: {stage})"}
    if rc != 0 or not lines:
        return {"error": f"subprocess failed ({rc}): {w.output(15)[-2000:]}"}
    out = json.loads(lines[-1])
    out["tree_rss_peak_gb"] = peak
    return out


# kohya sd-scripts and sdlora's CLI as whole processes ------------------------------------------------


def run_trainer(trainer: str, peers: Path, name: str, size: int, steps: int, preset: str, rank: int, *,
                threads: int, gradient_checkpointing: bool = False) -> dict:
    """One whole training process (``peers.run``) as a dict: step times from its progress (one
    step's end to the next), cores used by other processes during each step, peak RSS."""
    job = Job("sdxl", size, steps, preset=preset, rank=rank, gradient_checkpointing=gradient_checkpointing,
              threads=threads)
    r = run_process(trainer, peers, job, name=name)
    out = r.to_dict()
    out.update(size=size, preset=preset, command=" ".join(r.command), median_s=r.median_step(),
               cpu_median_s=r.median_of("cpu"), others_cores_median=r.median_of("others"))
    return out


# Setup -------------------------------------------------------------------------------------------


def _save_text_encoder(module, folder: Path) -> None:
    """``save_pretrained``, then make sure the keys carry the ``text_model.`` prefix older
    transformers (kohya's) expect (transformers 5 writes them without it)."""
    from safetensors.torch import load_file, save_file

    module.save_pretrained(folder, safe_serialization=True)
    for f in folder.glob("*.safetensors"):
        sd = load_file(str(f))
        fixed = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v.contiguous()
                 for k, v in sd.items()}
        if fixed.keys() != sd.keys():
            save_file(fixed, str(f), metadata={"format": "pt"})
    index = next(folder.glob("*.safetensors.index.json"), None)
    if index is not None:
        data = json.loads(index.read_text())
        data["weight_map"] = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                              for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def write_model(folder: Path) -> None:
    """The benchmark's random SDXL model (seed 0) as a diffusers folder, one part at a time."""
    from sdlora.models.shipped import config_dir
    from sdlora.models.tokenizer import TOKENIZER_DIR, OPENCLIP_PAD_TOKEN

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = config_dir(FAMILY)
    shutil.copy(src / "model_index.json", tmp / "model_index.json")
    shutil.copytree(src / "scheduler", tmp / "scheduler")
    for name, module in build_parts():
        print(f"  writing {name} ({sum(p.numel() for p in module.parameters()) / 1e6:.1f} M parameters)", flush=True)
        if name.startswith("text_encoder"):
            _save_text_encoder(module, tmp / name)
        else:
            module.save_pretrained(tmp / name, safe_serialization=True)
        del module
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(TOKENIZER_DIR, tmp / name)
    cfg = json.loads((tmp / "tokenizer_2" / "tokenizer_config.json").read_text())
    cfg["pad_token"] = OPENCLIP_PAD_TOKEN
    (tmp / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def write_data(folder: Path, size: int, count: int) -> None:
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(size)
    sub = folder / "1_sks"
    sub.mkdir(parents=True, exist_ok=True)

    def colour():
        return tuple(rnd.randint(0, 255) for _ in range(3))

    for i in range(count):
        im = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(im)
        for _ in range(rnd.randint(3, 8)):
            x0, y0 = rnd.randint(0, size * 3 // 4), rnd.randint(0, size * 3 // 4)
            x1, y1 = x0 + rnd.randint(size // 12, size // 2), y0 + rnd.randint(size // 12, size // 2)
            (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour())
        im.save(sub / f"img{i:02d}.png")
        (sub / f"img{i:02d}.txt").write_text(CAPTION)


def setup(argv: list[str]) -> int:
    args = parse_setup_args(argv)
    peers = args.peers.resolve()
    kohya = peers / "sd-scripts"
    if not (kohya / "sdxl_train_network.py").is_file():
        raise SystemExit(f"put kohya sd-scripts' source in {kohya} first (a plain folder with sdxl_train_network.py)")
    venv = peers / "venv-kohya"
    py = venv / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import torch, diffusers, transformers, accelerate, toml, "
                                          "voluptuous, imagesize, library"], cwd=kohya, capture_output=True).returncode == 0
    if not ok:
        print("kohya venv: torch 2.13.0 (CPU) and requirements.txt without bitsandbytes", flush=True)
        if not py.is_file():
            subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        req = peers / "kohya-req.txt"
        req.write_text("".join(line for line in (kohya / "requirements.txt").read_text().splitlines(True)
                               if "bitsandbytes" not in line.lower()))
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(req)], check=True, cwd=kohya)
    if not (peers / "shim" / "torchvision").is_dir():
        if not (args.shim / "torchvision").is_dir():
            raise SystemExit(f"no torchvision stand-in at {args.shim}; pass --shim")
        shutil.copytree(args.shim, peers / "shim")
    if not (peers / "sdxl-random" / "model_index.json").is_file():
        print(f"random SDXL model -> {peers / 'sdxl-random'}", flush=True)
        write_model(peers / "sdxl-random")
    from sdlora.models.tokenizer import TOKENIZER_DIR

    for name in KOHYA_TOKENIZERS:
        target = peers / "tokcache" / name.replace("/", "_")
        if not target.is_dir():
            shutil.copytree(TOKENIZER_DIR, target)
    for size, count in ((512, 4), (1024, 2)):
        if not (peers / "data" / f"sdxl-{size}" / "1_sks").is_dir():
            write_data(peers / "data" / f"sdxl-{size}", size, count)
    print(f"ready: python benchmarks/bench_sdxl_step.py --peers {peers}")
    return 0


# Main --------------------------------------------------------------------------------------------


def _check_memory(what: str, size: int, *, gradient_checkpointing: bool, full: bool) -> str | None:
    avail = mem_available_gb()
    need = need_gb(size, gradient_checkpointing=gradient_checkpointing, full=full)
    if avail is not None and avail < need:
        return f"{what}: skipped, {avail:.1f} GB available and it needs about {need:.0f} GB"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["setup"]:
        return setup(argv[1:])
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = child_rss(spec) if spec["kind"] == "rss" else child_time(spec)
        print(json.dumps(result), flush=True)
        return 0
    _set_openmp_env(args.omp)
    import torch

    from sdlora.train.measure import cpu_bf16_speedup
    from sdlora.train.precision import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peers and not (args.peers / "sdxl-random" / "model_index.json").is_file():
        raise SystemExit(f"--peers {args.peers}: no model there; run 'bench_sdxl_step.py setup --peers {args.peers}'")
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
    busy_start = _busy_seconds()

    print(f"sdlora SDXL training-step benchmark: SDXL 1.0 UNet (shipped config, random weights), {args.size} px, "
          f"batch 1, rank {args.rank}, UNet-only LoRA, cached latent and text conditioning"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {_omp_env_text()}, {os.cpu_count()} CPUs; bf16/fp32 speed "
          f"{bf16_speedup:.2f}x (bf16 {'timed' if 'bf16' in precisions else 'not timed'}); {_load_line()}; "
          f"{mem_available_gb() or float('nan'):.1f} GB memory available", flush=True)

    peaks_before = matmul_peaks()
    skipped = []
    gc_text = "gradient checkpointing" if args.gradient_checkpointing else "no gradient checkpointing"
    note = _check_memory("sdlora timings", args.size, gradient_checkpointing=args.gradient_checkpointing, full=False)
    if not presets:
        timing = {"results": []}
    elif note:
        print("  " + note, flush=True)
        skipped.append(note)
        timing = {"results": []}
    else:
        # In a subprocess: the memory watch can end it before the machine runs out.
        timing = run_child({"kind": "time", "presets": presets, "precisions": precisions, "threads": args.threads,
                            "args": {"size": args.size, "rank": args.rank, "steps": args.steps,
                                     "gradient_checkpointing": args.gradient_checkpointing}}, echo=True)
        if "error" in timing:
            print(f"  sdlora timings: {timing['error']}", flush=True)
            skipped.append(timing["error"])
            timing.setdefault("results", [])
        else:
            print(f"  peak RSS of the timing process ({gc_text}, {args.size} px, UNet only): "
                  f"{timing['maxrss_mb'] / 1024:.2f} GiB", flush=True)
    results = timing["results"]
    peaks_after = matmul_peaks()
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}

    print("\nmatmul peak (2048 x 2048, best of start and end of run): "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s")
    print(f"\n{'preset':9s} {'prec':4s} {'GFLOP':>6s} | {'plain s':>7s} {'sdlora s':>8s} {'best':>6s} {'cpu s':>6s} "
          f"{'speedup':>7s} | {'GFLOP/s':>7s} {'% peak':>6s} | others")
    for r in results:
        flops, plain, fast, cpu, paired, rate, same_prec_peak = summarise(r, peaks)
        print(f"{r['preset']:9s} {r['precision']:4s} {flops / 1e9:6.0f} | {_median(plain):7.2f} {_median(fast):8.2f} "
              f"{min(fast):6.2f} {_median(cpu):6.2f} {_median(paired):6.2f}x | {rate / 1e9:7.1f} "
              f"{100 * rate / same_prec_peak:5.1f}% | "
              f"{r['others_cores_median'] if r['others_cores_median'] is not None else float('nan'):.1f} cores")
    print("  plain: the same step without prepare_for_training; speedup: median of per-step plain/sdlora pairs;\n"
          "  % peak: FLOPs (counted on the plain step) / median sdlora time over the same precision's matmul peak;\n"
          "  others: cores used by other processes during the timed steps (a loaded machine slows every number).")
    for r in results:
        print(f"  {r['preset']} {r['precision']}: {r['settings']}")

    peers: list[dict] = []
    peers_dir = args.peers.resolve() if args.peers else None

    def whole_process(name: str, size: int, preset: str, steps: int, gc: bool, memory_run: bool,
                      trainer: str = "kohya") -> dict:
        note = _check_memory(f"{trainer} {name}", size, gradient_checkpointing=gc, full=True)
        if note:
            print("  " + note, flush=True)
            k = {"name": name, "size": size, "preset": preset, "error": note, "steps": [], "memory_run": memory_run,
                 "trainer": trainer}
            peers.append(k)
            return k
        print(f"  {trainer} {name}: {_load_line()}, {mem_available_gb() or float('nan'):.1f} GB available", flush=True)
        k = run_trainer(trainer, peers_dir, name, size, steps, preset, args.rank, threads=args.threads,
                        gradient_checkpointing=gc)
        k["gradient_checkpointing"], k["memory_run"] = gc, memory_run
        peers.append(k)
        walls = [s["wall"] for s in k["steps"] if s["step"] >= 2] or [s["wall"] for s in k["steps"]]
        status = (k.get("error") or "done").splitlines()[0]
        print(f"    {status}: steps " + ", ".join(f"{x:.1f}" for x in walls)
              + (f" s (median {k['median_s']:.2f} s, cpu {k['cpu_median_s'] or float('nan'):.1f} s; others used "
                 f"{k['others_cores_median'] or 0:.1f} cores)"
                 if walls else "") + (f"; peak RSS {k['maxrss_gb']:.2f} GiB" if k["maxrss_gb"] else "")
              + f"; whole run {k['wall_s']:.0f} s", flush=True)
        return k

    if peers_dir and presets:
        print(f"\nkohya sd-scripts sdxl_train_network.py in {peers_dir} right after sdlora's timings (one process at "
              f"a time; fp32, {gc_text}, {args.steps + 1} steps, the first not counted):", flush=True)
        gc_tag = "-gc" if args.gradient_checkpointing else ""
        for p in presets:
            whole_process(f"sdxl-{p}-{args.size}{gc_tag}", args.size, p, args.steps + 1, args.gradient_checkpointing, False)

    rss = None
    if not args.skip_rss and peers_dir:
        # The real thing: `sdlora train` as a user runs it, then kohya, same model, image and settings.
        print(f"\npeak RSS of whole training processes ({args.rss_size} px, fp32, attn-mlp, gradient checkpointing, "
              f"{args.rss_steps} step(s); /usr/bin/time -v), one after the other:", flush=True)
        rss = whole_process(f"sdlora-sdxl-attn-mlp-{args.rss_size}-gc", args.rss_size, "attn-mlp", args.rss_steps, True, True,
                            trainer="sdlora")
        if args.peer_rss == "yes":
            whole_process(f"sdxl-attn-mlp-{args.rss_size}-gc", args.rss_size, "attn-mlp", args.rss_steps, True, True)
    elif not args.skip_rss:
        spec = {"kind": "rss", "preset": "attn-mlp", "rank": args.rank, "precision": auto_precision,
                "size": args.rss_size, "mode": "auto", "threads": args.threads, "steps": args.rss_steps}
        note = _check_memory("sdlora peak-RSS run", args.rss_size, gradient_checkpointing=True, full=True)
        print(f"\npeak RSS of a training process ({args.rss_size} px, {auto_precision}, attn-mlp, gradient "
              f"checkpointing; UNet + both text encoders + VAE, {args.rss_steps} step(s)):", flush=True)
        if note:
            rss = {"error": note}
        else:
            rss = {**spec, **run_child(spec)}  # the child's "steps" (list of timings) wins over the count
        if "error" in rss:
            print(f"  sdlora: {rss['error']}", flush=True)
        else:
            print(f"  sdlora: {rss['maxrss_mb'] / 1024:.2f} GiB (VmHWM; {rss['maxrss_before_steps_mb'] / 1024:.2f} GiB "
                  f"after building the models and encoding the caption and a {args.rss_size} px image); steps "
                  + ", ".join(f"{s['wall']:.0f} s" for s in rss["steps"]) + f"; {rss['settings']}", flush=True)

    if peers_dir:
        gc_note = ", gradient checkpointing" if args.gradient_checkpointing else ""
        print("\nsdlora / kohya (same machine, same run; < 1 = sdlora faster or smaller):")
        for k in peers:
            if k.get("memory_run"):
                continue
            for r in results:
                if r["preset"] == k["preset"] and r["precision"] == "fp32" and k.get("median_s"):
                    r.setdefault("kohya", {})[k["name"]] = k["median_s"]
                    print(f"  step {k['preset']:9s} fp32 {args.size} px{gc_note}: sdlora {r['sdlora_median_s']:.2f} s, "
                          f"kohya {k['median_s']:.2f} s = {r['sdlora_median_s'] / k['median_s']:.2f}x   (target <= 0.8x; "
                          f"others used {r['others_cores_median'] or 0:.1f} / {k['others_cores_median'] or 0:.1f} cores)")
                    if k.get("cpu_median_s"):
                        sd_cpu = _median([x["cpu"] for x in r["sdlora"]])
                        print(f"       CPU seconds per step: sdlora {sd_cpu:.1f} s, kohya {k['cpu_median_s']:.1f} s = "
                              f"{sd_cpu / k['cpu_median_s']:.2f}x (less sensitive to the load; OpenMP spinning included)")
        for k in peers:
            if not k.get("memory_run") or k.get("trainer") == "sdlora":
                continue
            ours = (rss or {}).get("maxrss_gb")
            if ours and k.get("maxrss_gb") and not k.get("error") and not rss.get("error"):
                print(f"  peak RSS {args.rss_size} px, gradient checkpointing: sdlora {ours:.2f} GiB, "
                      f"kohya {k['maxrss_gb']:.2f} GiB = {ours / k['maxrss_gb']:.2f}x   (target <= 1x; whole processes)")
            else:
                print(f"  peak RSS {args.rss_size} px: no comparison ({k.get('error') or (rss or {}).get('error')})")
        for k in peers:
            if not k.get("memory_run") and k.get("maxrss_gb"):
                print(f"  kohya {k['name']}: peak RSS {k['maxrss_gb']:.2f} GiB ({gc_text}, {k['size']} px; sdlora's "
                      f"timing process: {timing.get('maxrss_mb', float('nan')) / 1024:.2f} GiB, UNet only)")

    load_end = os.getloadavg()
    busy_end = _busy_seconds()
    wall = time.perf_counter() - t_start
    print(f"\nload average at the end {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f}; "
          f"run took {wall:.0f} s; the machine's CPUs were busy "
          f"{(busy_end - busy_start) / wall:.1f} cores on average over the run (this process and its children included)")
    if args.json:
        data = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(), "openmp": _omp_env_text(), "bf16_speedup": bf16_speedup,
                "load_start": load_start, "load_end": load_end, "peaks": peaks, "results": results, "rss": rss,
                "peers": peers, "skipped": skipped, "wall_s": wall,
                "timing_process": {k: v for k, v in timing.items() if k != "results"}}
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
