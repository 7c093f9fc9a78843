"""Benchmark: every adapter method trained on one style set with the same steps and seed, compared.

For each method (the registry, plus LoRA+ as ``lora`` with ``loraplus_lr_ratio = 16``) it trains
with the real trainer in a child process and measures

* trained parameters and optimizer-state bytes at the end of the run (from the run's last
  checkpoint: what the optimizer really held, e.g. nothing for LoRA-FA's A, only the kept and
  shared adapters after LoRA-drop's drop step),
* seconds per step (median time between step events),
* peak memory: CUDA peak allocated on a GPU, else the training process's peak resident set size,
* the style metric (``sdlora.demo.metrics.style_score``) and colour / shape accuracy on the
  held-out content prompts at LoRA scale 1 (``sdlora.demo.style_eval``), generated with the
  *exported file* loaded into a fresh preview,
* the exported kohya file's size,

then writes the table, the settings and a picture grid (one row per method, scales 0 / 0.5 / 1)
into the generated block of ``docs/variants.md``.

Run:  python benchmarks/bench_variants.py                      # demo model (sdlora/sample_data/demo-model)
      python benchmarks/bench_variants.py --base tiny --steps 20  # tiny random model: a quick dry run
Options: --style outline|pastel|stripes  --steps N  --methods lora,dylora,...  --threads N
         --n-eval N (prompts per scale)  --out docs/variants.md  --grid docs/variants-grid.png  --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRIGGERS = {"stripes": "stripey", "outline": "outlined", "pastel": "pastelish"}
BEGIN, END = "<!-- bench_variants:begin -->", "<!-- bench_variants:end -->"

#: extra settings per benchmark row (name -> (registry method, --set overrides))
ROW_SETTINGS: dict[str, tuple[str, list[str]]] = {
    "lora+": ("lora", ["loraplus_lr_ratio=16"]),
}


@dataclass
class RowResult:
    row: str
    method: str
    title: str
    ok: bool = False
    error: str = ""
    trained_params: int = 0
    optimizer_bytes: int = 0
    sec_per_step: float = 0.0
    train_seconds: float = 0.0
    peak_bytes: int = 0
    peak_kind: str = ""
    file_bytes: int = 0
    lora_path: str = ""
    embedding_path: str = ""  # runs that learn trigger tokens: runs/<name>/embeddings/<word>.safetensors
    notes: str = ""
    style: float | None = None
    style_half: float | None = None
    color_acc: float | None = None
    shape_acc: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def base_sets(args: argparse.Namespace, out_dir: Path, row: str) -> tuple[str, list[str]]:
    """(bundled config name, --set overrides) of one benchmark run."""
    sets = [f"output_dir={out_dir}", f"output_name={row.replace('+', 'plus')}", f"train_data_dir=style:{args.style}",
            f"trigger_word={TRIGGERS[args.style]}", "caption_template={caption}, in {trigger} style",
            "sample_every_n_steps=0", "sample_prompts=[]", f"seed={args.seed}"]
    if args.base == "tiny":
        config = "tiny"
    else:  # the demo model, or a copy / another 64 px model of its kind
        config = "demo_style"
    sets.append(f"pretrained_model_name_or_path={args.base}")
    if args.steps:
        sets.append(f"max_train_steps={args.steps}")
    sets.append(f"save_every_n_steps={10**6}")  # one checkpoint, at the end (for the optimizer state)
    return config, sets


# Child: one training run -------------------------------------------------------------------------

def run_child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from sdlora.train.config import TrainConfig
    from sdlora.train.loop import train

    cfg = TrainConfig.from_toml(spec["config"], spec["sets"])
    stamps: list[float] = []

    def on_event(event: Any) -> None:
        if getattr(event, "type", None) == "step":
            stamps.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(cfg, callbacks=[on_event])
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    from sdlora.train.export import run_embedding_file

    embedding = run_embedding_file(result.run_dir)
    state = torch.load(Path(result.checkpoint) / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    optimizer_bytes = sum(t.numel() * t.element_size() for entry in state.values() for t in entry.values()
                          if isinstance(t, torch.Tensor))
    trained = sum(max((t.numel() for t in entry.values() if isinstance(t, torch.Tensor)), default=0)
                  for entry in state.values())
    out = dict(lora_path=str(result.lora_path or ""), embedding_path=str(embedding or ""), train_seconds=total,
               trained_params=trained, optimizer_bytes=optimizer_bytes, sec_per_step=statistics.median(gaps) if gaps else total,
               cuda_peak=torch.cuda.max_memory_allocated() if cuda else 0)
    Path(spec["result"]).write_text(json.dumps(out))


def train_row(args: argparse.Namespace, row: str, method: str, work: Path, extra_sets: list[str] | None = None,
              title: str = "") -> RowResult:
    """Train one row in a child process; ``extra_sets`` (default: ``ROW_SETTINGS``) are more --set overrides."""
    from sdlora.lora.variants import get_method

    res = RowResult(row=row, method=method, title=title or ("LoRA+" if row == "lora+" else get_method(method).title))
    config, sets = base_sets(args, work / "runs", row)
    sets += [f"network_type={method}", *(ROW_SETTINGS.get(row, (method, []))[1] if extra_sets is None else extra_sets)]
    spec = dict(config=str(config), sets=sets, threads=args.threads, result=str(work / f"{row}.json"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    log = open(work / f"{row}.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        text = (work / f"{row}.log").read_text().strip().splitlines()
        errors = [line for line in text if "Error" in line or "error" in line]
        message = errors[-1] if errors else (text[-1] if text else f"exit code {proc.returncode}")
        message = message.split(": ", 1)[1] if message.split(": ", 1)[0].endswith("Error") else message
        res.error = message.split(". ")[0][:160]
        return res
    data = json.loads(Path(spec["result"]).read_text())
    res.ok = True
    res.lora_path = data["lora_path"]
    res.embedding_path = data.get("embedding_path", "")
    res.train_seconds = data["train_seconds"]
    res.trained_params = data["trained_params"]
    res.optimizer_bytes = data["optimizer_bytes"]
    res.sec_per_step = data["sec_per_step"]
    if data["cuda_peak"]:
        res.peak_bytes, res.peak_kind = data["cuda_peak"], "CUDA allocated"
    else:
        res.peak_bytes, res.peak_kind = usage.ru_maxrss * 1024, "process RSS"
    res.file_bytes = Path(res.lora_path or res.embedding_path).stat().st_size  # textual inversion: no LoRA file
    return res


def notes_for(res: RowResult) -> str:
    """Method facts from the exported file's metadata."""
    from sdlora.lora import inspect_file

    info = inspect_file(res.lora_path)
    meta = info["metadata"]
    res.metadata = {k: v for k, v in meta.items() if k.startswith("sdlora_") and k not in ("sdlora_spec", "sdlora_version")}
    if "sdlora_adalora" in meta:
        s = meta["sdlora_adalora"]
        return f"total rank {s['total_rank']} of {s['init_rank'] * s['layers']} (target {s['target_total_rank']}); ranks {min(info['ranks'])}-{max(info['ranks'])}"
    if "sdlora_lora_drop" in meta:
        s = meta["sdlora_lora_drop"]
        if not s.get("dropped"):
            return "no drop (run shorter than the warm-up)"
        return f"{s['kept_layers']} layers keep their own, {s['layers_sharing']} share {s['shared_groups']} adapters"
    if "sdlora_delta_svd_rel_error" in meta:
        return f"SVD rank {meta['sdlora_delta_svd_rank']}: relative error {float(meta['sdlora_delta_svd_rel_error']):.3g}"
    if res.method == "dylora":
        return "any rank <= r by truncation"
    if info["network_type"] == "DoRA":
        return "file has dora_scale"
    return ""


# Evaluation ----------------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace, rows: list[RowResult]) -> tuple[dict[str, Any], Any]:
    from PIL import Image

    from sdlora.generate import Previewer
    from sdlora.demo import metrics
    from sdlora.demo.style_eval import evaluate_style

    trigger = TRIGGERS[args.style]
    prev = Previewer(args.base)
    kw = dict(n=args.n_eval, steps=args.eval_steps)
    base = evaluate_style(prev, args.style, trigger, scales=(0.0,), **kw)
    base_row = {"style": base.style_scores[0], "color_acc": base.color_accuracy[0], "shape_acc": base.shape_accuracy[0]}
    images: list[Image.Image] = []
    labels: list[str] = []
    for res in rows:
        if not res.ok:
            continue
        prev.set_loras([(res.lora_path, 1.0)])
        rep = evaluate_style(prev, args.style, trigger, scales=(0.5, 1.0), **kw)
        res.style_half, res.style = rep.style_scores
        res.color_acc, res.shape_acc = rep.color_accuracy[1], rep.shape_accuracy[1]
        res.notes = notes_for(res)
        images += [base.images[0.0][0], rep.images[0.5][0], rep.images[1.0][0]]
        labels += [res.title, "0.5", "1"]
    prev.set_loras([])
    grid = metrics.grid(images, cols=3, labels=labels) if images else None
    return base_row, grid


# Report ----------------------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def report(args: argparse.Namespace, rows: list[RowResult], base_row: dict[str, Any], grid_path: Path | None,
           machine: str) -> str:
    import torch

    peak_kind = next((r.peak_kind for r in rows if r.ok), "")
    lines = []
    if args.base == "tiny":
        lines += [f"> **These numbers are from the tiny random-weight test model (`--base {args.base}`), not the demo",
                  "> model**: they show what each method costs (parameters, optimizer state, time, memory, file size);",
                  "> the style and content columns mean nothing on a model that draws noise.", ""]
    from sdlora.train.config import TrainConfig

    config, sets = base_sets(args, Path(tempfile.gettempdir()), "lora")
    steps = TrainConfig.from_toml(config, sets, validate=False).max_train_steps
    cfg_desc = "the bundled config tiny" if args.base == "tiny" else "the bundled config demo_style"
    lines += [
        f"Settings: base `{args.base_label or args.base}`{model_id(args.base)}, bundled style set `{args.style}` (trigger `{TRIGGERS[args.style]}`), "
        f"{cfg_desc} with max_train_steps={steps}, seed {args.seed}, same for every method; "
        f"evaluation on {args.n_eval} held-out content prompts per scale, {args.eval_steps} sampling steps, "
        f"with the exported file loaded into a fresh preview. Machine: {machine}; torch {torch.__version__}, "
        f"{args.threads} threads; load average {args.load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        "(other work on a shared machine makes seconds per step noisy). Generated by `python benchmarks/bench_variants.py"
        f"{'' if args.base == 'demo' else ' --base ' + (args.base_label or args.base)}{' --steps ' + str(args.steps) if args.steps else ''}` "
        f"on {dt.date.today().isoformat()}.",
        "",
        f"| method | trained params | optimizer state | s / step | peak memory ({peak_kind}) | style @1 | style @0.5 "
        "| colour acc @1 | shape acc @1 | file size | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| base model (scale 0) | - | - | - | - | {_num(base_row['style'])} | - | {_num(base_row['color_acc'], '{:.2f}')} "
        f"| {_num(base_row['shape_acc'], '{:.2f}')} | - | |",
    ]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.title} (`{r.method}`) | not run: {r.error.replace('|', '/')} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r.title} (`{r.row}`) | {r.trained_params:,} | {_size(r.optimizer_bytes)} | {r.sec_per_step:.2f} "
            f"| {_size(r.peak_bytes)} | {_num(r.style)} | {_num(r.style_half)} | {_num(r.color_acc, '{:.2f}')} "
            f"| {_num(r.shape_acc, '{:.2f}')} | {_size(r.file_bytes)} | {r.notes} |")
    if grid_path is not None:
        rel = os.path.relpath(grid_path, Path(args.out).parent)
        lines += ["", f"![One row per method: LoRA scale 0, 0.5 and 1 on the first held-out prompt]({rel})",
                  "", "Columns: LoRA scale 0 (the base model), 0.5 and 1, on the first held-out prompt. Rows, top to "
                  "bottom: " + ", ".join(r.title for r in rows if r.ok) + "."]
    return "\n".join(lines)


def model_id(base: str) -> str:
    """`` (UNet weights sha256 ...)`` for a model folder, so a report names the exact build it measured."""
    import hashlib

    from sdlora.models.loading import DEFAULT_BASE

    folder = DEFAULT_BASE if base == "demo" else Path(base)
    weights = sorted((folder / "unet").glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        return ""
    return f" (UNet weights sha256 {hashlib.sha256(weights[0].read_bytes()).hexdigest()[:12]})"


def write_block(out: Path, block: str, begin: str = BEGIN, end: str = END, title: str = "# Adapter methods") -> None:
    """Replace the generated block between ``begin`` and ``end`` in ``out`` (appended when missing)."""
    text = out.read_text() if out.is_file() else f"{title}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
    tmp.replace(out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="demo", help="demo (sdlora/sample_data/demo-model), tiny, or a model path")
    ap.add_argument("--base-label", default="", help="name to show for --base in the report (e.g. for a copy)")
    ap.add_argument("--style", default="outline", choices=sorted(TRIGGERS))
    ap.add_argument("--steps", type=int, default=None, help="max_train_steps for every method (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="", help="comma-separated rows (registry names and lora+); default all")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-eval", type=int, default=8, help="held-out prompts per scale")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "docs" / "variants.md"))
    ap.add_argument("--grid", default=str(REPO / "docs" / "variants-grid.png"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sdlora.lora.variants import method_names

    names = method_names()
    rows_wanted = [r.strip() for r in args.methods.split(",") if r.strip()] or (
        names[:1] + ["lora+"] + names[1:])
    unknown = [r for r in rows_wanted if r not in names and r not in ROW_SETTINGS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(names + list(ROW_SETTINGS))}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    args.load_start = os.getloadavg()[0]
    print(f"machine: {machine}, load average {args.load_start:.1f}; base {args.base}, style {args.style}")
    rows: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        work = Path(tmp)
        for row in rows_wanted:
            method = ROW_SETTINGS.get(row, (row, []))[0]
            t0 = time.perf_counter()
            res = train_row(args, row, method, work)
            rows.append(res)
            status = (f"{res.trained_params:,} params, {_size(res.optimizer_bytes)} optimizer state, "
                      f"{res.sec_per_step:.2f} s/step, peak {_size(res.peak_bytes)}, file {_size(res.file_bytes)}"
                      if res.ok else f"not run: {res.error}")
            print(f"{row:>12}: {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        base_row, grid = evaluate(args, rows)
        for r in rows:
            if r.ok:
                print(f"{r.row:>12}: style @1 {_num(r.style)}  @0.5 {_num(r.style_half)}  colour {_num(r.color_acc, '{:.2f}')}  "
                      f"shape {_num(r.shape_acc, '{:.2f}')}  {r.notes}")
        print(f"{'base':>12}: style {_num(base_row['style'])}  colour {_num(base_row['color_acc'], '{:.2f}')}  "
              f"shape {_num(base_row['shape_acc'], '{:.2f}')}")
        grid_path = None
        if grid is not None and not args.no_write:
            grid_path = Path(args.grid)
            tmp_png = grid_path.with_suffix(".tmp.png")
            grid.save(tmp_png)
            tmp_png.replace(grid_path)
        block = report(args, rows, base_row, grid_path, machine)
        if args.no_write:
            print(block)
        else:
            write_block(Path(args.out), block)
            print(f"wrote {args.out} and {grid_path}")


if __name__ == "__main__":
    main()
