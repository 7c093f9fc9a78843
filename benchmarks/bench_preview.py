"""Preview speed with LoRA adapters on the SD 1.5 UNet architecture (random weights, no download).

Builds the real SD 1.5 UNet (859 M parameters, config shipped in ``sdlora/models/configs/sd1``)
and CLIP ViT-L text encoder with random weights, injects a rank-16 ``full`` preset adapter, and
measures in one run:

* the time to change the LoRA scale before the next image (goal <= 10 ms),
* generation time with unmerged adapters / base model (goal <= 1.10),
* generation time with merged adapters / base model (goal <= 1.01).

"base" is the same pipeline with every adapted layer swapped back to its original layer for the
timing (no PEFT wrapper at all); all settings are timed in turns, so changing machine load hits
them alike. Generation stops at the latents (no VAE
decode), so the ratios measure the UNet and text encoder, where the adapters are. Usage::

    python benchmarks/bench_preview.py --steps 4 --size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "sdlora" / "models" / "configs" / "sd1"


def _config(part: str, name: str = "config.json") -> dict:
    data = json.loads((CONFIGS / part / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}


def build_pipeline():
    """SD 1.5-architecture pipeline with random UNet/text encoder and a small stand-in VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
    # Never run (output stops at the latents); four blocks give the pipeline SD's 8x latent scale.
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = EulerDiscreteScheduler.from_config(_config("scheduler", "scheduler_config.json"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    return pipe


@contextmanager
def without_wrappers(model: torch.nn.Module):
    """Temporarily put every PEFT-wrapped layer's original layer back: the true base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            swapped.append((parent, leaf, module))
            setattr(parent, leaf, module.get_base_layer())
    try:
        yield
    finally:
        for parent, leaf, module in swapped:
            setattr(parent, leaf, module)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per image (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per setting (default 3)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, conv rank the same)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sdlora.generate import Previewer
    from sdlora.lora import LoraSpec, control, inject_adapters

    t0 = time.perf_counter()
    pipe = build_pipeline()
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"built SD 1.5 UNet ({n_params / 1e6:.1f} M params) + CLIP-L text encoder in {time.perf_counter() - t0:.1f} s; "
          f"{torch.get_num_threads()} threads, {args.size}px, {args.steps} steps, guidance 7")

    previewer = Previewer(pipe)
    kwargs = dict(seed=0, steps=args.steps, guidance=7.0, width=args.size, height=args.size,
                  scheduler="Euler", output="latent")

    def gen():
        return previewer.generate("a lighthouse on a cliff, oil painting", **kwargs)

    gen()  # warm-up (allocations, first-call paths)

    adapter = inject_adapters(pipe.unet, None, LoraSpec(preset="full", rank=args.rank, alpha=args.rank / 2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            p.requires_grad_(False)
    n_layers = sum(1 for _ in adapter.layers())
    print(f"injected rank-{args.rank} 'full' adapter: {n_layers} layers, {adapter.num_parameters() / 1e6:.1f} M params")
    previewer.use_adapter(adapter.name)

    # Scale change: what happens between a slider move and the next image (weights pushed to every layer).
    scales = [0.1 * i - 1.0 for i in range(41)]
    change = []
    for s in scales:
        start = time.perf_counter()
        previewer.set_scale(s)
        previewer.apply()
        change.append(time.perf_counter() - start)
    assert control.get_scales(pipe.unet)[adapter.name] == scales[-1]
    previewer.set_scale(1.0)

    gen()  # warm-up with adapters
    base: list[float] = []
    unmerged: list[float] = []
    merged: list[float] = []
    disabled: list[float] = []
    merge_times: list[float] = []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all settings alike
        with without_wrappers(pipe.unet):
            base += timed(gen, 1)
        unmerged += timed(gen, 1)
        start = time.perf_counter()
        previewer.merge()
        merge_times.append(time.perf_counter() - start)
        merged += timed(gen, 1)
        previewer.unmerge()
        previewer.disable()
        disabled += timed(gen, 1)
        previewer.enable()
    previewer.merge()
    start = time.perf_counter()
    previewer.set_scale(0.5)
    previewer.apply()
    remerge = time.perf_counter() - start
    previewer.unmerge()

    print()
    print(f"{'setting':34s} {'min s':>8s} {'median s':>9s}")
    for label, values in (("base (adapter layers taken out)", base), ("adapters unmerged", unmerged),
                          ("adapters merged", merged), ("adapters injected but disabled", disabled)):
        print(f"{label:34s} {min(values):8.3f} {statistics.median(values):9.3f}")
    print()
    print(f"scale change (set + push to {n_layers} layers): median {statistics.median(change) * 1e3:.2f} ms, "
          f"max {max(change) * 1e3:.2f} ms   (goal <= 10 ms)")
    for label, values, goal in (("unmerged / base", unmerged, "1.10"), ("merged / base", merged, "1.01"),
                                ("disabled / base", disabled, None)):
        ratio_min = min(values) / min(base)
        ratio_median = statistics.median(values) / statistics.median(base)
        print(f"{label:16s} {ratio_min:.3f} (min)  {ratio_median:.3f} (median)" + (f"   (goal <= {goal})" if goal else ""))
    print(f"merge: {statistics.median(merge_times):.2f} s; scale change while merged (re-merge): {remerge:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
