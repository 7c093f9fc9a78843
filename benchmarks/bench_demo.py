"""Benchmark: train a style LoRA on the bundled demo model end to end, then preview it.

Prints the wall time of `train(demo_style)` (the bundled config) (goal: <= 5 min on a 2-core CPU), seconds
per preview image (20 steps, 64 px), and the style metric reached at scales 0 / 0.5 / 1 with the
content accuracy kept. Run:  python benchmarks/bench_demo.py [--style outline|pastel|stripes] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIGGERS = {"stripes": "stripey", "outline": "outlined", "pastel": "pastelish"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", default="outline", choices=sorted(TRIGGERS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=None, help="override max_train_steps")
    ap.add_argument("--grid", type=Path, default=None, help="save the scale grid PNG here")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from sdlora.generate import Previewer
    from sdlora.demo.style_eval import evaluate_style, save_scale_grid
    from sdlora.train.config import TrainConfig
    from sdlora.train.loop import train

    print(f"machine: {os.cpu_count()} CPUs, torch threads {a.threads}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"output_dir={tmp}", f"train_data_dir=style:{a.style}",
                f"trigger_word={TRIGGERS[a.style]}", "sample_every_n_steps=0", "save_every_n_steps=0"]
        if a.steps:
            sets.append(f"max_train_steps={a.steps}")
        cfg = TrainConfig.from_toml("demo_style", sets)
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        print(f"train a style LoRA end to end ({cfg.max_train_steps} steps, batch {cfg.train_batch_size}, "
              f"{cfg.network_preset} rank {cfg.network_dim}): {train_s:.1f} s  (goal <= 300 s: {train_s / 300:.2f}x of it)")

        prev = Previewer("demo")
        prev.set_loras([(result.lora_path, 1.0)])
        prompt = f"a red circle on a white background, in {cfg.trigger_word} style"
        prev.generate(prompt, seed=0, steps=20)  # warm-up
        t0 = time.perf_counter()
        n = 8
        for i in range(n):
            prev.generate(prompt, seed=i, steps=20, scheduler="dpmpp_2m")
        per_image = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for i in range(n):
            prev.generate(prompt, seed=i, steps=20, scheduler="dpmpp_2m", scale=0.0)
        per_image_base = (time.perf_counter() - t0) / n
        print(f"preview: {per_image:.2f} s per 20-step image with the LoRA, {per_image_base:.2f} s at scale 0 "
              f"(ratio {per_image / per_image_base:.2f})")

        rep = evaluate_style(prev, a.style, cfg.trigger_word, scales=(0.0, 0.5, 1.0), n=12)
        for s, st, c, sh in zip(rep.scales, rep.style_scores, rep.color_accuracy, rep.shape_accuracy):
            print(f"scale {s:>4}: style metric {st:.3f}   colour accuracy {c:.2f}   shape accuracy {sh:.2f}")
        if a.grid:
            print("grid:", save_scale_grid(rep, a.grid))


if __name__ == "__main__":
    main()
