"""``sdlora`` command line: argument parsing -> public API calls -> rendering events.

Every command has ``--help``. Bad arguments print one line and exit with code 2; a failure of the
work itself (a broken file, an invalid config) prints one line naming the problem and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

#: exit code of ``sdlora train`` when the run was stopped (SIGTERM/SIGINT) with a checkpoint, not finished
EXIT_STOPPED = 3

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one clear line (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class UserError(Exception):
    """A problem with what the user gave; printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------
# train
_PRECISION_LABELS = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}


def _progress_renderer(enabled: bool) -> Callable[[Any], None]:
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def render(ev) -> None:
        d = ev.to_dict()
        t = d["type"]
        bar = state["bar"]
        if t == "start":
            if enabled:
                state["bar"] = tqdm(total=d["total_steps"], initial=d["start_step"], unit="step", dynamic_ncols=True,
                                    desc=Path(d["run_dir"]).name)
            else:
                print(f"training {d['run_dir']}: {d['num_images']} images, {d['trainable_params']:,} trainable "
                      f"parameters, {d['device']} {_PRECISION_LABELS.get(d['precision'], d['precision'])}, "
                      f"steps {d['start_step']}->{d['total_steps']}", flush=True)
        elif t == "step":
            post = dict(loss=f"{d['loss']:.4f}", lr=f"{d['lr']:.2e}")
            if d.get("mfu"):
                post["mfu"] = f"{100 * d['mfu']:.0f}%"
            if bar is not None:
                bar.n = d["step"]
                bar.set_postfix(post, refresh=False)
                bar.refresh()
            elif d["step"] == 1 or d["step"] % 10 == 0 or d["step"] == d["total_steps"]:
                print(f"step {d['step']}/{d['total_steps']} loss {d['loss']:.4f} lr {d['lr']:.2e} "
                      f"{d['it_per_s']:.2f} it/s eta {d['eta_s']:.0f}s", flush=True)
        else:
            text = {"message": lambda: d["text"], "warning": lambda: "warning: " + d["text"],
                    "sample": lambda: f"samples at step {d['step']}: {', '.join(d['paths'])}",
                    "checkpoint": lambda: f"checkpoint {d['path']}",
                    "done": lambda: f"done: {d['lora_path']} ({d['seconds']:.0f}s)",
                    "stopped": lambda: f"stopped at step {d['step']}; continue with: sdlora train --resume "
                                       f"{Path(d['checkpoint']).parent.parent if d.get('checkpoint') else '<run dir>'}",
                    "failed": lambda: "failed: " + d["error"]}.get(t)
            if text:
                (bar.write if bar is not None else print)(text())
            if t in ("done", "stopped", "failed") and bar is not None:
                bar.close()

    return render


def cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    if a.resume and (a.config or a.set):
        raise UserError("--resume continues a run with its own config.toml; do not give a config or --set with it")
    if not a.resume and not a.config and not a.set:
        raise UserError("give a config file (e.g. configs/demo_style.toml), --set key=value options, or --resume RUN_DIR")
    render = _progress_renderer(enabled=not a.no_progress and sys.stderr.isatty())
    if a.resume:
        result = train(resume=a.resume, callbacks=[render])
    else:
        cfg = TrainConfig.from_toml(a.config, a.set)
        result = train(cfg, callbacks=[render])
    return {"done": 0, "stopped": EXIT_STOPPED}.get(result.state, 1)


# ----------------------------------------------------------------------------------------------
def _parse_lora(item: str) -> tuple[str, float]:
    path, sep, weight = item.rpartition(":")
    if sep and path and not path.endswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def _parse_embedding(item: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE=WORD`` (the prompt word; default: the file's name, as in A1111 and ComfyUI)."""
    path, sep, word = item.rpartition("=")
    return (path, word) if sep and path and word else (item, None)


def cmd_generate(a: argparse.Namespace) -> int:
    from .generate import Previewer

    loras = [_parse_lora(x) for x in a.lora or []]
    for path, _ in loras:
        if not Path(path).is_file():
            raise UserError(f"--lora {path}: file not found")
    embeddings = [_parse_embedding(x) for x in a.embedding or []]
    for path, _ in embeddings:
        if not Path(path).is_file():
            raise UserError(f"--embedding {path}: file not found")
    prev = Previewer(a.base)
    prev.set_loras(loras)  # embeddings bundled into a LoRA file (bundle_emb.<name>.*) come with it
    for path, token in embeddings:
        prev.load_embedding(path, token)
    kw = dict(prompt=a.prompt, negative_prompt=a.negative_prompt or None, seed=a.seed, steps=a.steps,
              width=a.width, height=a.height, scheduler=a.scheduler)
    if a.guidance is not None:
        kw["guidance"] = a.guidance
    out = Path(a.out)
    if a.grid:
        try:
            scales = [float(s) for s in a.grid.split(",")]
        except ValueError:
            raise UserError(f"--grid {a.grid}: give comma-separated numbers, e.g. 0,0.5,1") from None
        from .generate import image_grid

        images = prev.scale_grid(scales, **kw)
        img = image_grid(images, labels=[f"scale {s:g}" for s in scales])
    else:
        img = prev.generate(scale=a.scale, **kw)[0]
    from .paths import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    print(out)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .lora.formats import inspect_file

    info = inspect_file(a.file)
    if not info["modules"] and not info.get("embeddings"):
        checkpoint = _checkpoint_info(a.file) or _embedding_info(a.file)  # a model or an embedding, not a LoRA
        if checkpoint is None:
            stray = info.get("stray_keys") or []
            raise UserError(f"{a.file}: no LoRA module in it ({len(stray)} other key(s), e.g. "
                            f"{stray[0] if stray else '-'}): not a LoRA, embedding or Stable Diffusion checkpoint file.")
        info = checkpoint
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    if info.get("kind") == "checkpoint":
        print(_format_checkpoint(info))
        return 0
    if info.get("kind") == "embedding":
        print(f"file:         {info['path']}\nkind:         a textual-inversion embedding ({info['vectors']} "
              f"vector(s), {' + '.join(map(str, info['widths']))} wide; "
              f"{'SDXL: clip_l + clip_g' if len(info['widths']) == 2 else 'SD 1.x/2.x'}), for A1111/Forge and ComfyUI's "
              "embeddings folder or diffusers' load_textual_inversion")
        return 0
    from .lora.formats import format_inspection

    print(format_inspection(info))
    return 0


def _checkpoint_info(path: str) -> dict | None:
    """What a Stable Diffusion checkpoint file is (family, prediction, what was merged into it), or None."""
    from .models.loading import ModelLoadError
    from .models.single_file import detect_single_file
    from .lora.formats.io import read_metadata

    try:
        info = detect_single_file(path)
    except ModelLoadError:
        return None
    return {"kind": "checkpoint", **info, "metadata": read_metadata(path)}


def _embedding_info(path: str) -> dict | None:
    """What a standalone embedding file holds (vectors, width per text encoder), or None."""
    from .lora.errors import LoraError
    from .lora.formats.embedding import read_embeddings

    try:
        (name, vectors), = read_embeddings(path).items()
    except (LoraError, ValueError):
        return None
    return {"kind": "embedding", "path": path, "name": name, "vectors": int(vectors[0].shape[0]),
            "widths": [int(v.shape[-1]) for v in vectors]}


def _format_checkpoint(info: dict) -> str:
    from pathlib import Path

    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
    lines = [f"file:         {Path(info['path']).name} ({Path(info['path']).stat().st_size / 2**20:.2f} MB)",
             f"kind:         {names.get(info['family'], info['family'])} model checkpoint (not a LoRA), "
             f"{info['format']} layout, {info['prediction_type']} prediction",
             f"resolution:   {info.get('resolution')}"]
    merged = info["metadata"].get("sdlora_merged_loras")
    if merged:
        try:
            items = ", ".join(f"{m['file']} x{m['weight']:g}" for m in json.loads(merged))
        except (ValueError, KeyError, TypeError):
            items = merged
        lines.append(f"merged:       {items} into {info['metadata'].get('sdlora_merged_base', '?')}")
    notes = info.get("notes") or []
    lines += [f"note:         {n}" for n in ([notes] if isinstance(notes, str) else notes)]
    if info["metadata"]:
        lines.append("metadata:")
        width = max(len(k) for k in info["metadata"])
        lines += [f"  {k.ljust(width)} {v if len(v) <= 100 else v[:90] + f'... ({len(v)} characters)'}"
                  for k, v in sorted(info["metadata"].items())]
    return "\n".join(lines)


def cmd_export(a: argparse.Namespace) -> int:
    from .train import RunDir, export_run

    if RunDir(a.source).exists():
        out = export_run(a.source, fmt=a.format, out=a.out, step=a.step, rank=a.rank, dtype=a.dtype)
    else:
        if a.step is not None:
            raise SystemExit(f"--step selects a checkpoint of a training run; {a.source} is not a run directory")
        from .lora.formats import export_from

        out = export_from(a.source, fmt=a.format, out=a.out, rank=a.rank, base=a.base, dtype=a.dtype)
    print(out)
    return 0


# ----------------------------------------------------------------------------------------------
# tools: merge-into, combine, resize, extract (sdlora.tools)
def _tool_progress(enabled: bool, what: str) -> Callable[[int, int, str], None]:
    """A tqdm bar on a terminal, else a line on stderr every few seconds."""
    import time

    state: dict[str, Any] = {"bar": None, "total": None, "last": 0.0}

    def progress(done: int, total: int, label: str) -> None:
        if total <= 1 and done == 0:  # a stage, not a loop (loading, writing)
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            print(f"{what}: {label}", file=sys.stderr, flush=True)
            return
        if enabled:
            from tqdm import tqdm

            if state["bar"] is None or state["total"] != total:
                if state["bar"] is not None:
                    state["bar"].close()
                state["bar"] = tqdm(total=total, unit="layer", desc=what, dynamic_ncols=True, file=sys.stderr)
                state["total"] = total
            state["bar"].n = done
            state["bar"].refresh()
            if done >= total:
                state["bar"].close()
                state["bar"] = None
        elif time.monotonic() - state["last"] > 5 or done == total:
            state["last"] = time.monotonic()
            print(f"{what}: {done}/{total} layers ({label})", file=sys.stderr, flush=True)

    return progress


def _print_report(report: Any, table: bool) -> None:
    if table and report.rows:
        print(report.table())
    print(report.summary)


def cmd_merge_into(a: argparse.Namespace) -> int:
    from .tools import merge_into

    report = merge_into(a.base, a.lora, a.out, format=a.format, dtype=a.dtype, allow_unknown=a.skip_unknown,
                        progress=_tool_progress(sys.stderr.isatty(), "merge-into"))
    _print_report(report, a.verbose)
    return 0


def cmd_combine(a: argparse.Namespace) -> int:
    from .tools import combine_loras

    report = combine_loras(a.loras, a.out, rank=a.rank, format=a.format, dtype=a.dtype, base=a.base,
                           progress=_tool_progress(sys.stderr.isatty(), "combine"))
    _print_report(report, a.rank is not None or a.verbose)
    return 0


def cmd_resize(a: argparse.Namespace) -> int:
    from .tools import resize_lora

    report = resize_lora(a.file, a.out, rank=a.rank, dynamic=a.dynamic, conv_rank=a.conv_rank, format=a.format,
                         dtype=a.dtype, base=a.base, progress=_tool_progress(sys.stderr.isatty(), "resize"))
    _print_report(report, True)
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    from .tools import extract_lora

    report = extract_lora(a.base, a.tuned, a.out, rank=a.rank, conv_rank=a.conv_rank, threshold=a.threshold,
                          format=a.format, dtype=a.dtype, progress=_tool_progress(sys.stderr.isatty(), "extract"))
    _print_report(report, True)
    return 0


def cmd_tiny_model(a: argparse.Namespace) -> int:
    from .models.tiny import save_tiny_model

    out = save_tiny_model(a.dir, seed=a.seed, prediction_type=a.prediction_type, family=a.family)
    print(out)
    return 0


def cmd_demo_base(a: argparse.Namespace) -> int:
    from .demo import train_base

    return int(train_base.main(a.args) or 0)


def cmd_ui(a: argparse.Namespace) -> int:
    from .ui.server import main as ui_main

    return int(ui_main(a.args) or 0)


def cmd_variants(a: argparse.Namespace) -> int:
    from .lora.variants import get_method, method_names

    for name in method_names():
        print(f"{name:12s} {get_method(name).description}")
    return 0


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdlora", description="Train style LoRAs for Stable Diffusion; preview, inspect and export them.")
    p.add_argument("--version", action="version", version=f"sdlora {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a LoRA from a config file (and --set overrides), or resume a run",
                       description="Train a LoRA. Runs go to output_dir/output_name (default runs/my-style). "
                                   "Exit codes: 0 finished, 3 stopped with a checkpoint (resume to continue), "
                                   "1 failed or refused, 2 bad command line.")
    t.add_argument("config", nargs="?", help="TOML config file, or a bundled config by name: demo_style, style_sd15, style_sdxl, dreambooth_sd15, tiny (sdlora/configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a config option (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate an image with a base model and LoRAs")
    g.add_argument("--base", default=None, help="base model (default: the bundled demo model)")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="LoRA file, optionally with a weight (repeatable)")
    g.add_argument("--embedding", action="append", metavar="FILE[=WORD]",
                   help="textual-inversion embedding file; the prompt word is the file name unless given (repeatable)")
    g.add_argument("--scale", type=float, default=1.0, help="LoRA scale (0 = base, negative allowed)")
    g.add_argument("--grid", metavar="S1,S2,...", help="make a grid of these scales instead of one image")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--scheduler", default="dpmpp_2m", choices=["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"])
    g.add_argument("--out", required=True, help="output PNG")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="show what a LoRA file contains")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="export a run's LoRA (or convert a file) to kohya/A1111 or diffusers format")
    e.add_argument("source", metavar="RUN_OR_FILE")
    e.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    e.add_argument("--out", required=True)
    e.add_argument("--step", type=int, default=None, help="export this checkpoint step of a run")
    e.add_argument("--rank", type=int, default=None, help="export at this rank (DyLoRA truncation or SVD)")
    e.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="precision of the file (default: a run's save_precision; a file keeps its own)")
    e.add_argument("--base", default=None, help="base model that names the layers of a file made for a model that "
                   "is not SD 1.x/2.x-sized (a run directory uses its own)")
    e.set_defaults(func=cmd_export)

    _DT = ["fp32", "fp16", "bf16"]
    mi = sub.add_parser(
        "merge-into", help="bake LoRAs into a base model (a single .safetensors or a diffusers folder)",
        description="Merge LoRA files into a base model: every adapted layer becomes W + sum of weight x LoRA delta "
                    "(DoRA files as A1111/ComfyUI apply them). Writes one .safetensors in the original A1111/ComfyUI "
                    "layout (loads in A1111/Forge, ComfyUI, kohya, diffusers' from_single_file and sdlora) or a "
                    "diffusers folder. See docs/tools.md.")
    mi.add_argument("base", metavar="BASE", help="base model: demo, a diffusers folder, a .safetensors/.ckpt file or a cached hub id")
    mi.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                    help="LoRA file (kohya or diffusers layout) with its weight, e.g. style.safetensors:0.8 (repeatable; default weight 1)")
    mi.add_argument("--out", required=True, help="output: NAME.safetensors (single file) or a folder name (diffusers)")
    mi.add_argument("--format", choices=["single", "diffusers"], default=None, help="default: from --out (.safetensors = single)")
    mi.add_argument("--dtype", choices=_DT, default="fp16", help="precision of the written weights (default fp16)")
    mi.add_argument("--skip-unknown", action="store_true", help="merge what fits when a LoRA has keys that match no layer (default: refuse)")
    mi.add_argument("--verbose", action="store_true", help="also print a row per changed layer")
    mi.set_defaults(func=cmd_merge_into)

    co = sub.add_parser(
        "combine", help="combine several LoRAs into one (exact, or best rank R by SVD)",
        description="Combine LoRA files into one holding the weighted sum of their deltas. Without --rank the ranks are "
                    "concatenated (exact; the rank is the sum). With --rank R each layer keeps the best rank-R "
                    "approximation (SVD) and the relative error is printed per layer and overall. DoRA files are "
                    "refused. No base model is needed for SD 1.x/2.x/XL files. See docs/tools.md.")
    co.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files with weights, e.g. a.safetensors:1 b.safetensors:0.5")
    co.add_argument("--out", required=True, help="output file (.safetensors; a folder for --format diffusers)")
    co.add_argument("--rank", type=int, default=None, help="rank of the result (SVD); default: exact concatenation")
    co.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    co.add_argument("--dtype", choices=_DT, default=None, help="precision (default: the inputs' own when they agree, else fp32)")
    co.add_argument("--base", default=None, help="base model that names the layers of files made for a model that is not "
                    "SD 1.x/2.x/XL-sized (e.g. demo)")
    co.add_argument("--verbose", action="store_true", help="print a row per layer also without --rank")
    co.set_defaults(func=cmd_combine)

    rs = sub.add_parser(
        "resize", help="change a LoRA's rank: fixed (--rank) or per layer from its singular values (--dynamic)",
        description="Resize a LoRA file like kohya's resize_lora.py. --rank R: every layer above R gets the best rank-R "
                    "approximation. --dynamic sv_fro=F | sv_ratio=T | sv_cumulative=C: a rank per layer from its "
                    "singular values (with --rank R as the largest rank). Conv2d layers included. Prints each layer's "
                    "ranks and error and a summary. See docs/tools.md.")
    rs.add_argument("file", metavar="FILE", help="LoRA file (kohya or diffusers layout)")
    rs.add_argument("--rank", type=int, default=None, help="new rank (with --dynamic: the largest rank a layer gets)")
    rs.add_argument("--dynamic", metavar="METHOD=VALUE", default=None,
                    help="sv_fro=0.9 (keep 90%% of each layer's Frobenius norm), sv_ratio=10 (singular values above "
                         "1/10 of the largest), sv_cumulative=0.9 (90%% of the sum of singular values)")
    rs.add_argument("--conv-rank", type=int, default=None, help="rank (or cap) of 3x3 Conv2d layers (default: --rank)")
    rs.add_argument("--out", required=True, help="output file (.safetensors; a folder for --format diffusers)")
    rs.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    rs.add_argument("--dtype", choices=_DT, default=None, help="precision (default: the file's own)")
    rs.add_argument("--base", default=None, help="base model naming the layers of files not made for SD 1.x/2.x/XL (e.g. demo)")
    rs.set_defaults(func=cmd_resize)

    ex = sub.add_parser(
        "extract", help="extract a LoRA from the difference of two checkpoints of one family",
        description="Extract a LoRA from TUNED minus BASE: each LoRA-targeted layer (UNet attention, feed-forward, "
                    "resnet/sampler convs; text encoder attention and MLP) gets the SVD of its weight difference at "
                    "--rank (--conv-rank for 3x3 convs). Layers whose largest difference is at most --threshold are "
                    "left out and counted. See docs/tools.md.")
    ex.add_argument("--base", required=True, help="the original model (folder, single file, cached hub id)")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model of the same family")
    ex.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 layers")
    ex.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 Conv2d layers (default: --rank; 0 leaves "
                    "resnet and sampler layers out, as kohya does without --conv_dim)")
    ex.add_argument("--threshold", type=float, default=1e-4, help="leave out layers whose largest absolute weight "
                    "difference is at most this (default 1e-4)")
    ex.add_argument("--out", required=True, help="output file (.safetensors; a folder for --format diffusers)")
    ex.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    ex.add_argument("--dtype", choices=_DT, default="fp16", help="precision of the LoRA (default fp16)")
    ex.set_defaults(func=cmd_extract)

    m = sub.add_parser("tiny-model", help="write a tiny random-weight SD 1.x or SDXL model (diffusers folder) for tests")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    m.add_argument("--family", default="sd1", choices=["sd1", "sdxl"], help="architecture (default: sd1)")
    m.set_defaults(func=cmd_tiny_model)

    d = sub.add_parser("demo-base", help="train the bundled demo base model (sdlora demo-base train --out DIR)",
                       add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    d.set_defaults(func=cmd_demo_base)

    u = sub.add_parser("ui", help="start the web app (same options as python app.py)", add_help=False)
    u.add_argument("args", nargs=argparse.REMAINDER)
    u.set_defaults(func=cmd_ui)

    v = sub.add_parser("variants", help="list the adapter methods (network_type)")
    v.set_defaults(func=cmd_variants)
    return p


def _disk_full(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _quiet_model_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" bars: the command's own progress is what counts."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pass_through = {"ui": cmd_ui, "demo-base": cmd_demo_base}
    if argv and argv[0] in pass_through:
        # These commands own their options (and --help); hand them everything after the name.
        return pass_through[argv[0]](argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    from .train import ConfigError, RunBusyError, RunExportError, TrainingError

    errors: tuple[type[BaseException], ...] = (UserError, ConfigError, FileNotFoundError)
    from .data.errors import DatasetError
    from .lora.errors import LoraError
    from .models.loading import ModelLoadError

    errors += (LoraError, ModelLoadError, TrainingError, DatasetError, RunExportError, RunBusyError)
    if args.command in ("train", "generate", "export", "tiny-model", "merge-into", "combine", "resize", "extract"):
        _quiet_model_loading()
    try:
        return args.func(args)
    except errors as e:
        print(f"sdlora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if not _disk_full(e):
            raise
        print(f"sdlora {args.command}: error: the disk is full ({e.filename or e}); free some space and run it again",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
