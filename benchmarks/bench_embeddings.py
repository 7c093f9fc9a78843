"""Benchmark: trigger tokens that learn, on one style set with the same steps and seed.

Three runs of the real trainer (each in a child process, as ``bench_variants.py`` runs them, whose
functions this script reuses):

* **LoRA alone**: the bundled config (``demo_style`` on the demo model), trigger word as plain text;
* **pivotal**: the same plus ``embedding_tokens`` new tokens ``<s0><s1>`` (initialised from
  ``--init``) that train together with the LoRA;
* **textual inversion alone**: the same tokens with ``embedding_only = true`` (no LoRA trained).

For each it records trained parameters (from the optimizer state of the last checkpoint), seconds per
step (median time between step events), the training process's peak memory and the exported file's
size; then, with the *exported file* loaded into a fresh preview, the style metric
(``sdlora.demo.metrics.style_score``) and colour / shape accuracy on the held-out content prompts
(``sdlora.demo.style_eval``):

* LoRA alone and pivotal at LoRA scales 0 / 0.5 / 1. Pivotal prompts say the learned tokens where the
  trigger goes: the LoRA file's bundled embedding is loaded with it under the trigger word, which the
  preview expands to the embedding's vectors, the same prompt embeddings as ``<s0><s1>`` in training.
  At scale 0 the tokens still act (the scale does not switch the embedding off).
* textual inversion has no LoRA scale: its embedding file is loaded into the base model and the
  prompts say its tokens; the comparison is the base model with the plain trigger word.

It writes both tables, the settings and a picture grid (rows: LoRA, pivotal, textual inversion) into
the generated block of ``docs/embeddings.md``.

Run:  python benchmarks/bench_embeddings.py                             # demo model
      python benchmarks/bench_embeddings.py --base tiny --steps 20 --n-eval 2 --no-write   # quick dry run
Options: --style outline|pastel|stripes  --steps N  --tokens N  --init WORD  --embedding-lr LR
         --rows lora,pivotal,ti  --threads N  --n-eval N  --eval-steps N  --out FILE  --grid FILE  --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_variants as bv  # noqa: E402  (train_row, base_sets, model_id, write_block, _size, _num)

REPO = bv.REPO
BEGIN, END = "<!-- bench_embeddings:begin -->", "<!-- bench_embeddings:end -->"
ROWS = ("lora", "pivotal", "ti")
TITLES = {"lora": "LoRA alone", "pivotal": "pivotal (LoRA + tokens)", "ti": "textual inversion alone"}


@dataclass
class Evaluated:
    """Style and content of one run, per setting (LoRA scale, or one entry for textual inversion)."""
    word: str = ""                                   # what the prompts say where the trigger goes
    settings: list[str] = field(default_factory=list)
    style: list[float] = field(default_factory=list)
    color_acc: list[float] = field(default_factory=list)
    shape_acc: list[float] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)   # first held-out prompt, per setting


def row_sets(args: argparse.Namespace, row: str) -> list[str]:
    """The --set overrides of a row beyond the bundled config (LoRA alone: none)."""
    if row == "lora":
        return []
    sets = [f"embedding_tokens={args.tokens}", f"embedding_init={args.init}"]
    if args.embedding_lr:
        sets.append(f"embedding_lr={args.embedding_lr}")
    return sets + (["embedding_only=true"] if row == "ti" else [])


def _token_rows(path: str) -> tuple[int, int]:
    """(vectors, width) of the SD 1.x embedding in a standalone or bundled file."""
    from sdlora.lora.formats.embedding import read_embeddings

    found = read_embeddings(path)
    rows = next(iter(found.values()))[0]
    return int(rows.shape[0]), int(rows.shape[1])


# Evaluation ----------------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace, rows: list[bv.RowResult]) -> tuple[Evaluated, dict[str, Evaluated]]:
    """The base model with the plain trigger word, then each run in a fresh preview of the base model."""
    import gc

    from sdlora.demo.style_eval import evaluate_style
    from sdlora.generate import Previewer
    from sdlora.lora import inspect_file

    trigger = bv.TRIGGERS[args.style]
    kw = dict(n=args.n_eval, steps=args.eval_steps)

    def collect(rep, word: str, labels: list[str]) -> Evaluated:
        return Evaluated(word=word, settings=labels, style=list(rep.style_scores), color_acc=list(rep.color_accuracy),
                         shape_acc=list(rep.shape_accuracy), images=[rep.images[s][0] for s in rep.scales])

    base = collect(evaluate_style(Previewer(args.base), args.style, trigger, scales=(0.0,), **kw), trigger, ["-"])
    out: dict[str, Evaluated] = {}
    for res in rows:
        if not res.ok:
            continue
        prev = Previewer(args.base)
        if res.row == "ti":
            word = prev.load_embedding(res.embedding_path)[0]  # the file's stem: the trigger word
            scales: tuple[float, ...] = (0.0,)
        else:
            prev.load_lora(res.lora_path)  # a pivotal file brings its bundled embedding along
            bundled = list(inspect_file(res.lora_path).get("embeddings") or {})
            word = bundled[0] if bundled else trigger
            scales = (0.0, 0.5, 1.0)
        if res.row != "lora":  # the prompt word must now stand for the learned vectors, not the plain text
            n = _token_rows(res.embedding_path or res.lora_path)[0]
            vocab = prev.pipe.tokenizer.get_vocab()
            missing = [w for w in [word] + [f"{word}_{i}" for i in range(1, n)] if w not in vocab]
            if missing:
                raise SystemExit(f"{res.row}: the loaded embedding did not add {missing} to the tokenizer")
        rep = evaluate_style(prev, args.style, word, scales=scales, **kw)
        out[res.row] = collect(rep, word, ["tokens, no LoRA"] if res.row == "ti" else [f"{s:g}" for s in scales])
        del prev
        gc.collect()
    return base, out


def picture_grid(rows: list[bv.RowResult], base: Evaluated, ev: dict[str, Evaluated]):
    """Rows: LoRA, pivotal, textual inversion; columns: LoRA scale 0 / 0.5 / 1 (textual inversion: the base
    model with the plain trigger word, then the learned tokens)."""
    from PIL import Image

    from sdlora.demo import metrics

    images, labels = [], []
    for res in rows:
        e = ev.get(res.row)
        if e is None:
            continue
        if res.row == "ti":
            blank = Image.new("RGB", e.images[0].size, (60, 60, 60))
            images += [base.images[0], e.images[0], blank]
            labels += ["TI: plain word", "TI: tokens", ""]
        else:
            short = "LoRA" if res.row == "lora" else "pivotal"
            images += e.images
            labels += [f"{short} {s}" if i == 0 else s for i, s in enumerate(e.settings)]
    return metrics.grid(images, cols=3, labels=labels) if images else None


# Report ----------------------------------------------------------------------------------------------

def report(args: argparse.Namespace, rows: list[bv.RowResult], base: Evaluated, ev: dict[str, Evaluated],
           grid_path: Path | None, machine: str) -> str:
    import torch

    from sdlora.train.config import TrainConfig

    num, size = bv._num, bv._size
    trigger = bv.TRIGGERS[args.style]
    config, sets = bv.base_sets(args, Path(tempfile.gettempdir()), "lora")
    cfg = TrainConfig.from_toml(config, sets + row_sets(args, "pivotal"), validate=False)
    tokens = "".join(f"<s{i}>" for i in range(args.tokens))
    lines = []
    if args.base == "tiny":
        lines += ["> **These numbers are from the tiny random-weight test model (`--base tiny`), not the demo model**:",
                  "> they show what each run costs; the style and content columns mean nothing on a model that draws noise.",
                  ""]
    cmd = "python benchmarks/bench_embeddings.py" + ("" if args.base == "demo" else f" --base {args.base_label or args.base}")
    cmd += f" --steps {args.steps}" if args.steps else ""
    lines += [
        f"Settings: base `{args.base_label or args.base}`{bv.model_id(args.base)}, bundled style set `{args.style}` "
        f"(trigger `{trigger}`), the bundled config `{config}` with max_train_steps={cfg.max_train_steps}, seed {args.seed}, "
        f"the same for all three runs (LoRA: rank {cfg.network_dim}, conv rank {cfg.conv_dim}, preset "
        f"`{cfg.network_preset}`, learning rate {cfg.learning_rate:g}, text encoder LoRA "
        f"{'on' if cfg.train_text_encoder else 'off'}). Pivotal and textual inversion add embedding_tokens={args.tokens} "
        f"(`{tokens}`), embedding_init=\"{args.init}\", embedding_lr={cfg.embedding_lr:g}, "
        f"embedding_stop_fraction={cfg.embedding_stop_fraction:g}; textual inversion sets embedding_only=true. "
        f"Evaluation: {args.n_eval} held-out content prompts (`<colour> <shape> on a <background> background, in "
        f"{trigger} style`) per setting, one seed each (the same for every row), {args.eval_steps} DPM++ 2M steps, "
        f"guidance 6, with the exported file loaded into a fresh preview of the base model. Machine: {machine}; torch "
        f"{torch.__version__}, {args.threads} threads; load average {args.load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (other work on a shared machine makes seconds per step noisy). Generated "
        f"by `{cmd}` on {dt.date.today().isoformat()}.",
        "",
        f"| run | trains | trained params | s / step | train time | peak memory ({next((r.peak_kind for r in rows if r.ok), '')}) "
        "| file |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r.ok:
            lines.append(f"| {TITLES[r.row]} | not run: {r.error.replace('|', '/')} | | | | | |")
            continue
        trains = "UNet LoRA" + (" + text-encoder LoRA" if cfg.train_text_encoder else "")
        if r.row != "lora":
            n, width = _token_rows(r.embedding_path or r.lora_path)
            tok = f"{n} token rows ({n} x {width} = {n * width:,})"
            trains = tok if r.row == "ti" else f"{trains} + {tok}"
        files = (f"LoRA {size(Path(r.lora_path).stat().st_size)}" if r.lora_path else "no LoRA")
        if r.embedding_path:
            files += f", embedding {size(Path(r.embedding_path).stat().st_size)}"
            files += " (also bundled in the LoRA)" if r.lora_path else ""
        lines.append(f"| {TITLES[r.row]} | {trains} | {r.trained_params:,} | {r.sec_per_step:.3f} | "
                     f"{r.train_seconds:.0f} s | {size(r.peak_bytes)} | {files} |")
    lines += [
        "",
        "| run | setting | prompt says | style | colour acc | shape acc |",
        "|---|---|---|---:|---:|---:|",
        f"| base model | no LoRA | `{trigger}` (plain word) | {num(base.style[0])} | {num(base.color_acc[0], '{:.2f}')} "
        f"| {num(base.shape_acc[0], '{:.2f}')} |",
    ]
    for r in rows:
        e = ev.get(r.row)
        if e is None:
            continue
        said = f"`{trigger}` (plain word)" if r.row == "lora" else f"`{e.word}` = the learned `{tokens}`"
        for i, setting in enumerate(e.settings):
            label = setting if r.row == "ti" else f"LoRA scale {setting}"
            lines.append(f"| {TITLES[r.row]} | {label} | {said} | {num(e.style[i])} | {num(e.color_acc[i], '{:.2f}')} "
                         f"| {num(e.shape_acc[i], '{:.2f}')} |")
    lines += ["", "Style: `sdlora.demo.metrics.style_score` (higher = more of the style set's look); colour / shape "
              "acc: share of pictures whose colour / shape `sdlora.demo.metrics.read_scene` reads as the prompt's "
              "(content kept). Textual inversion has no LoRA scale: its row is the base model with the learned tokens "
              "in the prompt, to compare with the base model row (the plain trigger word)."]
    if grid_path is not None:
        rel = os.path.relpath(grid_path, Path(args.out).parent)
        lines += ["", f"![LoRA alone, pivotal and textual inversion on the first held-out prompt]({rel})", "",
                  "First held-out prompt, same seed. Rows, top to bottom: LoRA alone and pivotal at LoRA scale 0, 0.5, "
                  "1; textual inversion: the base model with the plain trigger word, then with the learned tokens."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="demo", help="demo (sdlora/sample_data/demo-model), tiny, or a model path")
    ap.add_argument("--base-label", default="", help="name to show for --base in the report")
    ap.add_argument("--style", default="outline", choices=sorted(bv.TRIGGERS))
    ap.add_argument("--steps", type=int, default=None, help="max_train_steps of every run (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=2, help="embedding_tokens of the pivotal and textual inversion runs")
    ap.add_argument("--init", default="outline", help="embedding_init (a word that fits the style)")
    ap.add_argument("--embedding-lr", default="", help="embedding_lr (default: the config's)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated: lora, pivotal, ti")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-eval", type=int, default=8, help="held-out prompts per setting")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "docs" / "embeddings.md"))
    ap.add_argument("--grid", default=str(REPO / "docs" / "embeddings-grid.png"))
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    args = ap.parse_args()
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not wanted or any(r not in ROWS for r in wanted):
        ap.error(f"--rows takes {', '.join(ROWS)}; got {args.rows!r}")

    import torch

    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    args.load_start = os.getloadavg()[0]
    print(f"machine: {machine}, load average {args.load_start:.1f}; base {args.base}, style {args.style}", flush=True)
    rows: list[bv.RowResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        work = Path(tmp)
        for row in wanted:
            t0 = time.perf_counter()
            res = bv.train_row(args, row, "lora", work, extra_sets=row_sets(args, row), title=TITLES[row])
            rows.append(res)
            status = (f"{res.trained_params:,} params, {res.sec_per_step:.3f} s/step, peak {bv._size(res.peak_bytes)}, "
                      f"file {bv._size(res.file_bytes)}" if res.ok else f"not run: {res.error}")
            print(f"{row:>8}: {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        base, ev = evaluate(args, rows)
        print(f"{'base':>8}: style {bv._num(base.style[0])}  colour {base.color_acc[0]:.2f}  shape {base.shape_acc[0]:.2f}")
        for row, e in ev.items():
            for i, s in enumerate(e.settings):
                print(f"{row:>8} {s:>15}: style {bv._num(e.style[i])}  colour {e.color_acc[i]:.2f}  "
                      f"shape {e.shape_acc[i]:.2f}  (prompt word {e.word!r})")
        grid = picture_grid(rows, base, ev)
        grid_path = None
        if grid is not None and not args.no_write:
            grid_path = Path(args.grid)
            tmp_png = grid_path.with_suffix(".tmp.png")
            grid.save(tmp_png)
            tmp_png.replace(grid_path)
        block = report(args, rows, base, ev, grid_path, machine)
        if args.no_write:
            print(block)
        else:
            bv.write_block(Path(args.out), block, BEGIN, END, title="# Trigger tokens that learn")
            print(f"wrote {args.out} and {grid_path}")


if __name__ == "__main__":
    main()
