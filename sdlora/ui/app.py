"""Layout and event handlers of the web app (Dataset, Train, Preview and Export tabs).

Handlers only call the library's public API - :func:`sdlora.data.scan_dataset`,
:class:`sdlora.train.config.TrainConfig`, :func:`sdlora.train.loop.prepare_run`,
:class:`sdlora.train.runs.RunDir`, :class:`sdlora.generate.Previewer`, :mod:`sdlora.lora.formats`
- and read run directories. Every handler has an ``api_name`` so scripts can drive the app with
``gradio_client`` exactly as the page does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from ..paths import safe_name
from . import datasets as ds
from . import form, runview
from .dataview import CHECK_FIELDS, dataset_view
from .context import AppContext
from .errors import UIError, esc, guarded, log
from .server import ServerOptions

DEFAULT_GRID = "0, 0.25, 0.5, 0.75, 1, 1.25"
EXPORT_FORMATS = [("kohya / A1111 / ComfyUI (.safetensors)", "kohya"), ("diffusers (PEFT .safetensors)", "diffusers")]
WHERE_TO_PUT = ("**Where the file goes:** Automatic1111/Forge: `models/Lora/`, then write `<lora:{stem}:1>` in "
                "the prompt. ComfyUI: `models/loras/`, then add a *Load LoRA* node. diffusers: "
                "`pipe.load_lora_weights(\"{name}\")`.")
RESOLUTION_FIELDS = ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")


class App:
    """Builds the ``gr.Blocks`` and holds its handlers (bound to one :class:`AppContext`)."""

    def __init__(self, opts: ServerOptions):
        self.ctx = AppContext(opts)
        self.cfg: dict[str, gr.components.Component] = {}

    # =========================================================================================
    # Dataset tab
    # =========================================================================================
    def _folder(self, name: str, *, create: bool = False) -> Path:
        return ds.dataset_dir(self.ctx.runs_dir, name, create=create)

    def _dataset_outputs(self, folder: Path, trigger_word: str, check: dict[str, Any], refused: Sequence[str] = ()):
        """(gallery, check, dataset lists x2, gallery names) for the dataset tab; problems also as a toast."""
        view = dataset_view(folder, trigger_word, check, refused)
        if view.problems:
            shown = view.problems[:8]
            if len(view.problems) > 8:
                shown.append(f"... and {len(view.problems) - 8} more (see the dataset check)")
            gr.Warning("<br>".join(esc(p) for p in shown), title="Dataset check")
        names = ds.list_datasets(self.ctx.runs_dir)
        return (view.gallery, view.html, gr.update(choices=names, value=folder.name),
                gr.update(choices=names, value=folder.name), view.names)

    @guarded
    def upload_dataset(self, dataset_name: str, files: list[str] | None = None, trigger_word: str = "", **check: Any):
        """Add uploaded images, captions or .zip files to a dataset and check it."""
        if not files:
            raise UIError("No files were uploaded. Choose images, .txt captions or a .zip.", title="Upload")
        folder = self._folder(dataset_name, create=True)
        uploads = [(Path(str(f)).name, str(f)) for f in files]
        report = ds.add_files(folder, uploads, self.ctx.opts.max_upload_bytes)
        refused = [f"{name}: {reason}" for name, reason in report.rejected]
        if not report.added and refused:
            raise UIError("Nothing was added. " + " ; ".join(refused), title="Upload")
        if report.added:
            gr.Info(f"Added {len(report.added)} file(s) to dataset {folder.name}.")
        return (*self._dataset_outputs(folder, trigger_word, check, refused), None)

    @guarded
    def open_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """Show a dataset's images, captions and check."""
        folder = self._folder(dataset_name)
        if not folder.is_dir():
            raise UIError(f"There is no dataset named {dataset_name!r} yet; upload images to create it.",
                          title="Dataset")
        return self._dataset_outputs(folder, trigger_word, check)

    @guarded
    def use_style_set(self, dataset_name: str, style: str, trigger_word: str = "", **check: Any):
        """Copy a bundled style set into the dataset (so its captions can be edited)."""
        if not style:
            raise UIError("Choose a bundled style set first.", title="Style set")
        name = dataset_name if (dataset_name or "").strip() else style
        folder = self._folder(name, create=True)
        n = ds.copy_style_set(style, folder)
        gr.Info(f"Copied {n} file(s) of style set {style} into dataset {folder.name}.")
        return self._dataset_outputs(folder, trigger_word, check)

    @guarded
    def check_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any) -> str:
        """The dataset check alone: usable images, buckets and every unusable file with its reason."""
        return dataset_view(self._folder(dataset_name), trigger_word, check).html

    @guarded
    def select_image(self, dataset_name: str, names: list[str] | None, evt: gr.SelectData):
        """Clicking a gallery image opens its caption for editing."""
        names = names or []
        if evt.index is None or not 0 <= int(evt.index) < len(names):
            return "", ""
        folder = self._folder(dataset_name)
        name = names[int(evt.index)]
        return name, ds.read_caption_text(folder / name)

    @guarded
    def save_caption(self, dataset_name: str, image: str | None = None, caption: str | None = None,
                     trigger_word: str = "", **check: Any):
        """Write an image's caption (.txt next to it); an empty caption removes it."""
        if not image:
            raise UIError("Click an image in the gallery first.", title="Caption")
        folder = self._folder(dataset_name)
        ds.write_caption(folder, image, caption or "")
        gr.Info(f"Caption of {image} saved.")
        view = dataset_view(folder, trigger_word, check)
        return view.gallery, view.html, view.names

    @guarded
    def remove_image(self, dataset_name: str, image: str | None = None, trigger_word: str = "", **check: Any):
        """Delete an image (and its caption) from the dataset."""
        if not image:
            raise UIError("Click an image in the gallery first.", title="Remove image")
        folder = self._folder(dataset_name)
        ds.remove_image(folder, image)
        return (*self._dataset_outputs(folder, trigger_word, check), "", "")

    @guarded
    def remove_unusable(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """Delete the files the dataset check lists as unusable."""
        folder = self._folder(dataset_name)
        view = dataset_view(folder, trigger_word, check)
        for rel in view.skipped:
            ds.remove_image(folder, rel)
        gr.Info(f"Removed {len(view.skipped)} unusable file(s).")
        return self._dataset_outputs(folder, trigger_word, check)

    # =========================================================================================
    # Train tab
    # =========================================================================================
    def _runs_update(self, value: str | None = None, keep: bool = False):
        names = [row[0] for row in runview.runs_table(self.ctx.runs_dir)]
        if keep:
            return gr.update(choices=names)
        return gr.update(choices=names, value=value if value in names else (names[0] if names else None))

    @guarded
    def start_training(self, pretrained_model_name_or_path: str, output_name: str, dataset: str,
                       trigger_word: str = "", **settings: Any):
        """Write the run's config and start training it in a separate process (one training at a time)."""
        from ..train.config import TrainConfig
        from ..train.loop import prepare_run

        with self.ctx.train_lock:
            self._refuse_if_running()
            base = self.ctx.check_base(pretrained_model_name_or_path)
            if not (dataset or "").strip():
                raise UIError("Choose a dataset (upload images on the Dataset tab first).", title="Dataset")
            folder = self._folder(dataset)
            if not folder.is_dir():
                raise UIError(f"Dataset {dataset!r} does not exist; upload images on the Dataset tab first.",
                              title="Dataset")
            values = form.settings_from_form(settings)
            name = (output_name or "").strip()
            data = dict(values, pretrained_model_name_or_path=base, output_name=name,
                        output_dir=str(self.ctx.runs_dir), train_data_dir=str(folder),
                        trigger_word=(trigger_word or "").strip())
            if values.get("with_prior_preservation"):
                cls = safe_name(str(values.get("class_prompt", "")), default="class")
                data["class_data_dir"] = str(self.ctx.runs_dir / "_class_images" / cls)
            cfg = TrainConfig.from_dict(data)
            run = prepare_run(cfg)
            run.start_process()
        gr.Info(f"Training of {run.name} started.")
        return (f"Started **{esc(run.name)}**: {cfg.max_train_steps} steps on {esc(Path(base).name)}.",
                self._runs_update(run.name), runview.runs_table(self.ctx.runs_dir))

    def _refuse_if_running(self) -> None:
        running = runview.running_runs(self.ctx.runs_dir)
        if running:
            st = running[0]
            raise UIError(f"Run '{st['name']}' is training now (step {st.get('step', 0)}/{st.get('total_steps', '?')}). "
                          "One training runs at a time: wait until it is done or press Stop, then start again.",
                          title="A training is already running")

    @guarded
    def stop_training(self, run: str):
        """Ask a running training to save a checkpoint and stop."""
        r = self.ctx.existing_run(run)
        if not r.stop():
            raise UIError(f"Run '{r.name}' is not running ({r.status().get('state')}).", title="Stop")
        gr.Info(f"Stopping {r.name}: it saves a checkpoint first; Resume continues from it.")
        return f"Stopping **{esc(r.name)}** (saving a checkpoint).", runview.runs_table(self.ctx.runs_dir)

    @guarded
    def resume_training(self, run: str):
        """Continue a stopped or failed run from its newest checkpoint."""
        with self.ctx.train_lock:
            r = self.ctx.existing_run(run)
            st = r.status()
            if st.get("state") == "done":
                raise UIError(f"Run '{r.name}' is already done; start a new run to train more.", title="Resume")
            self._refuse_if_running()
            r.start_process()
        cp = st.get("checkpoint")
        gr.Info(f"Resuming {r.name}" + (f" from {cp}." if cp else " (no checkpoint yet: from the start)."))
        return (f"Resumed **{esc(r.name)}**" + (f" from {esc(cp)}." if cp else "."),
                self._runs_update(r.name), runview.runs_table(self.ctx.runs_dir))

    def run_status(self, run: str) -> dict:
        """Status of a run: state, message, step, total_steps, checkpoint, lora (API only)."""
        try:
            return self.ctx.existing_run(run).status()
        except UIError as e:
            return {"state": "missing", "message": str(e), "name": run}

    def poll(self, watch: str | None, signature: tuple | None):
        """Timer tick: redraw the live panel and the runs table when their files changed."""
        try:
            return self._poll(watch, signature)
        except Exception:  # noqa: BLE001 - a tick must never break the page; the next one retries
            log.exception("poll failed")
            return (gr.skip(),) * 7

    def _poll(self, watch: str | None, signature: tuple | None):
        runs_sig = runview.runs_signature(self.ctx.runs_dir)
        old_runs_sig, old_run_sig, old_watch, old_running, old_state, old_names = signature or (None,) * 6
        running, names = old_running, old_names
        table: Any = gr.skip()
        watch_update: Any = gr.skip()
        if runs_sig != old_runs_sig:
            table = runview.runs_table(self.ctx.runs_dir)
            names = tuple(row[0] for row in table)
            now_running = [row[0] for row in table if row[1] in ("running", "queued")]
            running = now_running[0] if now_running else None
            # A run that starts (in another tab, or from the CLI) is shown; otherwise the page keeps
            # showing the run the user picked.
            shown = watch
            if running and running != old_running:
                watch = running
            if (not watch or watch not in names) and names:
                watch = names[0]
            if names != old_names or watch != shown:
                watch_update = gr.update(choices=list(names), value=watch)
        progress: Any = gr.skip()
        loss: Any = gr.skip()
        samples: Any = gr.skip()
        log: Any = gr.skip()
        run_sig = None
        run = None
        state = old_state if watch == old_watch else None
        if watch:
            try:
                run = self.ctx.existing_run(watch)
            except UIError:
                run = None
        if run is not None:
            run_sig = runview.run_signature(run)
            if run_sig != old_run_sig or watch != old_watch:
                view = runview.live_view(run)
                progress, loss, samples, log = view["progress"], view["loss"], view["samples"], view["log"]
                new_state = view["status"].get("state")
                if state in ("running", "queued") and new_state != state:
                    # The run this page watches just ended: say so in a message box too.
                    message = view["status"].get("message") or ""
                    if new_state == "failed":
                        gr.Warning(f"Training of {esc(run.name)} failed: {esc(message)}", title="Training failed",
                                   duration=None)
                    elif new_state == "done":
                        gr.Info(f"Training of {esc(run.name)} is done.")
                    elif new_state == "stopped":
                        gr.Info(f"Training of {esc(run.name)} stopped: {esc(message)}")
                state = new_state
        elif old_watch is not None or signature is None:
            progress, loss, samples, log = runview.progress_html(None, None), runview.loss_frame([]), [], ""
        return progress, loss, samples, log, table, watch_update, (runs_sig, run_sig, watch, running, state, names)

    def pick_run(self, evt: gr.SelectData):
        """Clicking a row of the runs table shows that run."""
        row = evt.row_value or []
        return row[0] if row else gr.skip()

    @guarded
    def apply_preset(self, preset: str):
        values = form.preset_values(preset)
        return [gr.update(value=values[name]) if name in values else gr.skip() for name in self.cfg]

    @guarded
    def base_changed(self, base: str):
        """A new base model sets the resolution (and bucket limits, preview size) to its native size."""
        res = self.ctx.base_resolution(base)
        if not res:
            return (gr.skip(),) * 6
        v = _resolution_values(res)
        return tuple(gr.update(value=v[k]) for k in (*RESOLUTION_FIELDS, "width", "height"))

    # =========================================================================================
    # Preview tab
    # =========================================================================================
    def _loras(self, lora_runs: list[str] | None, lora_files: list[str] | None,
               weights: Any) -> list[tuple[str, float]]:
        table = _table_rows(weights)
        given = {str(r[0]): r[1] for r in table if r and len(r) > 1}
        out: list[tuple[str, float]] = []
        for name in lora_runs or []:
            run = self.ctx.existing_run(name)
            if not run.lora_path.is_file():
                raise UIError(f"Run '{name}' has no finished LoRA file yet; wait until it is done or export a "
                              "checkpoint on the Export tab.", title="LoRA")
            out.append((str(run.lora_path), _weight(given.get(name, 1.0), name)))
        for f in lora_files or []:
            p = Path(str(f))
            if p.suffix.lower() != ".safetensors":
                raise UIError(f"{p.name} is not a .safetensors LoRA file.", title="LoRA")
            out.append((str(p), _weight(given.get(p.name, 1.0), p.name)))
        return out

    def _gen_kwargs(self, prompt: str, negative_prompt: str, seed: float, steps: float, width: float,
                    height: float, guidance: float, sampler: str) -> dict[str, Any]:
        from ..generate import scheduler_names

        if not (prompt or "").strip():
            raise UIError("Write a prompt first.", title="Prompt")
        if sampler not in scheduler_names():
            raise UIError(f"Unknown sampler {sampler!r}; choose one of: {', '.join(scheduler_names())}.",
                          title="Sampler")
        try:
            guidance_f = float(guidance)
        except (TypeError, ValueError):
            raise UIError(f"Guidance ({guidance!r}) is not a number.", title="Invalid value") from None
        if not 0 <= guidance_f <= 30:
            raise UIError(f"Guidance {guidance_f:g} is outside 0 to 30.", title="Invalid value")
        # Lists for both: the pipeline wants the negative prompt of the same type as the prompt.
        kw = dict(prompt=[prompt], negative_prompt=[negative_prompt or ""], seed=_int(seed, "seed", 0),
                  steps=_int(steps, "steps", 1, 150), width=_int(width, "width", 64, 2048),
                  height=_int(height, "height", 64, 2048), guidance=guidance_f, scheduler=sampler)
        for k in ("width", "height"):
            if kw[k] % 8:
                raise UIError(f"{k} {kw[k]} is not a multiple of 8.", title="Size")
        return kw

    def _previewer(self, base: str, loras: list[tuple[str, float]]):
        return self.ctx.previewer(self.ctx.check_base(base), loras)

    @guarded
    def preview(self, base_model: str, lora_runs: list[str] | None = None, lora_files: list[str] | None = None,
                lora_weights: Any = None, prompt: str = "", negative_prompt: str = "", seed: float = 0, steps: float = 20, width: float = 512,
                height: float = 512, guidance: float = 7.0, sampler: str = "DPM++ 2M Karras", scale: float = 1.0):
        """Generate one image with the LoRAs at ``scale`` (0 = the base model alone)."""
        kw = self._gen_kwargs(prompt, negative_prompt, seed, steps, width, height, guidance, sampler)
        loras = self._loras(lora_runs, lora_files, lora_weights)
        with self.ctx.preview_lock:
            prev = self._previewer(base_model, loras)
            return prev.generate(scale=float(scale), **kw)[0]

    @guarded
    def compare(self, base_model: str, lora_runs: list[str] | None = None, lora_files: list[str] | None = None,
                lora_weights: Any = None, prompt: str = "", negative_prompt: str = "", seed: float = 0, steps: float = 20, width: float = 512,
                height: float = 512, guidance: float = 7.0, sampler: str = "DPM++ 2M Karras", scale: float = 1.0):
        """The base model and the LoRA at ``scale``, same prompt and seed, side by side."""
        kw = self._gen_kwargs(prompt, negative_prompt, seed, steps, width, height, guidance, sampler)
        loras = self._loras(lora_runs, lora_files, lora_weights)
        if not loras:
            raise UIError("Pick a run's LoRA or upload a LoRA file to compare with the base model.", title="LoRA")
        with self.ctx.preview_lock:
            prev = self._previewer(base_model, loras)
            return prev.generate(scale=0.0, **kw)[0], prev.generate(scale=float(scale), **kw)[0]

    @guarded
    def scale_grid(self, base_model: str, lora_runs: list[str] | None = None, lora_files: list[str] | None = None,
                   lora_weights: Any = None, prompt: str = "", negative_prompt: str = "", seed: float = 0,
                   steps: float = 20, width: float = 512, height: float = 512, guidance: float = 7.0, sampler: str = "DPM++ 2M Karras",
                   scales: str = DEFAULT_GRID):
        """One image per LoRA scale, same seed, in a labelled row."""
        from ..generate import image_grid

        kw = self._gen_kwargs(prompt, negative_prompt, seed, steps, width, height, guidance, sampler)
        values = _scales(scales)
        loras = self._loras(lora_runs, lora_files, lora_weights)
        with self.ctx.preview_lock:
            prev = self._previewer(base_model, loras)
            images = prev.scale_grid(values, **kw)
        return image_grid(images, labels=[f"scale {s:g}" for s in values])

    def lora_table(self, lora_runs: list[str] | None, lora_files: list[str] | None, lora_weights: Any):
        """Rows (LoRA, weight) for the chosen runs and files, keeping weights already typed in."""
        given = {str(r[0]): r[1] for r in _table_rows(lora_weights) if r and len(r) > 1}
        names = list(lora_runs or []) + [Path(str(f)).name for f in lora_files or []]
        return [[n, given.get(n, 1.0)] for n in names]

    def preview_base_for(self, lora_runs: list[str] | None, base: str):
        """Picking a run's LoRA selects the base model it was trained on (when listed)."""
        for name in lora_runs or []:
            try:
                cfg = self.ctx.existing_run(name).load_config()
            except Exception:  # noqa: BLE001 - a run without a readable config keeps the current base
                continue
            spec = cfg.pretrained_model_name_or_path
            values = [m.value for m in self.ctx.base_models()]
            for v in (spec, str(Path(spec).resolve()) if spec not in ("demo", "tiny") else spec):
                if v in values:
                    res = self.ctx.base_resolution(v)
                    if not res:
                        return v, gr.skip(), gr.skip()
                    size = _resolution_values(res)
                    return v, size["width"], size["height"]
        return gr.skip(), gr.skip(), gr.skip()

    # =========================================================================================
    # Export tab
    # =========================================================================================
    def _checkpoint_choices(self, run_name: str | None) -> list[tuple[str, str]]:
        if not run_name:
            return [("final LoRA", "final")]
        try:
            run = self.ctx.existing_run(run_name)
        except UIError:
            return [("final LoRA", "final")]
        choices = [("final LoRA", "final")] if run.lora_path.is_file() else []
        for cp in reversed(run.checkpoints()):
            choices.append((cp.name, cp.name))
        return choices or [("final LoRA", "final")]

    def _export_view(self, run: str | None):
        choices = self._checkpoint_choices(run)
        summary, meta = "", {}
        if run:
            r = self.ctx.existing_run(run)
            if r.lora_path.is_file():
                summary, meta = _inspection(r.lora_path)
        return gr.update(choices=choices, value=choices[0][1]), summary, meta

    @guarded
    def export_info(self, run: str):
        """Checkpoints of a run and the metadata its LoRA file carries."""
        return self._export_view(run)

    @guarded
    def export_lora(self, run: str, fmt: str = "kohya", checkpoint: str = "final", rank: float = 0):
        """Write the chosen format of a run's LoRA (or of one checkpoint, optionally at a lower rank)."""
        from ..lora.formats import export_from

        r = self.ctx.existing_run(run)
        if fmt not in ("kohya", "diffusers"):
            raise UIError(f"Unknown format {fmt!r}; choose kohya or diffusers.", title="Export")
        step = None
        if checkpoint and checkpoint != "final":
            if not checkpoint.startswith("step-") or not checkpoint[5:].isdigit():
                raise UIError(f"{checkpoint!r} is not a checkpoint of run {r.name}.", title="Export")
            step = int(checkpoint[5:])
        elif not r.lora_path.is_file():
            raise UIError(f"Run '{r.name}' has no final LoRA yet; choose one of its checkpoints.", title="Export")
        rank_i = _int(rank or 0, "rank", 0)
        if step is None and fmt == "kohya" and not rank_i:
            # The file training wrote is the kohya/A1111 file, with all of its training metadata.
            return (str(r.lora_path), *_inspection(r.lora_path))
        if step is None:
            # The final LoRA is the adapter of the run's last checkpoint (saved at the last step);
            # exporting from it works for every base model the run could train on.
            st = r.status()
            last = r.latest_checkpoint()
            if last is not None and st.get("state") == "done" and last.name == f"step-{st.get('step')}":
                step = int(st["step"])
        path = Path(export_from(str(r.path), fmt=fmt, step=step, rank=rank_i or None))
        return (str(path), *_inspection(path))

    # =========================================================================================
    # Page load
    # =========================================================================================
    def on_load(self):
        """Fill the lists for a fresh page (models folder, datasets, runs) and pick the run to watch."""
        base_choices, base_value = self.ctx.base_dropdown()
        datasets = ds.list_datasets(self.ctx.runs_dir)
        names = [r[0] for r in runview.runs_table(self.ctx.runs_dir)]
        watch = runview.watched_default(self.ctx.runs_dir)
        first = datasets[0] if datasets else None
        return (gr.update(choices=base_choices, value=base_value),
                gr.update(choices=base_choices, value=base_value),
                gr.update(choices=datasets, value=first),
                gr.update(choices=datasets, value=first),
                first if first else gr.skip(),
                gr.update(choices=names, value=watch),
                gr.update(choices=self._lora_runs()),
                gr.update(choices=names, value=names[0] if names else None),
                self._free_run_name("my-style"))

    def _free_run_name(self, stem: str) -> str:
        """``stem``, or ``stem-2``, ``stem-3``... : the first name no run uses yet."""
        name, n = stem, 1
        while (self.ctx.runs_dir / name).exists():
            n += 1
            name = f"{stem}-{n}"
        return name

    def _lora_runs(self) -> list[str]:
        from ..train.runs import list_runs

        return [st["name"] for st in list_runs(self.ctx.runs_dir) if st.get("lora")]

    def refresh_preview_runs(self):
        return gr.update(choices=self._lora_runs())

    def refresh_export(self, current: str | None):
        """Opening the Export tab: the runs list, and the chosen run's checkpoints and metadata."""
        names = [r[0] for r in runview.runs_table(self.ctx.runs_dir)]
        value = current if current in names else (names[0] if names else None)
        try:
            step, summary, meta = self._export_view(value)
        except Exception:  # noqa: BLE001 - a run that cannot be inspected just shows nothing
            step, summary, meta = gr.skip(), "", {}
        return gr.update(choices=names, value=value), step, summary, meta

    def show_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """The gallery and check of the dataset a fresh page opens with (nothing when there is none)."""
        try:
            folder = self._folder(dataset_name)
        except UIError:
            return gr.skip(), gr.skip(), gr.skip()
        if not folder.is_dir():
            return gr.skip(), gr.skip(), gr.skip()
        view = dataset_view(folder, trigger_word, check)
        return view.gallery, view.html, view.names

    # =========================================================================================
    # Layout
    # =========================================================================================
    def build(self) -> gr.Blocks:
        from ..generate import DEFAULT_SCHEDULER, scheduler_names

        ctx = self.ctx
        base_choices, base_value = ctx.base_dropdown()
        res_values = _resolution_values(ctx.base_resolution(base_value) or 512)
        datasets = ds.list_datasets(ctx.runs_dir)
        styles = ds.list_style_sets()
        # Generated previews and copies of served files go to gradio's cache: files older than a day
        # are removed every hour so a long-running app does not fill the disk.
        with gr.Blocks(title="sdlora: train style LoRAs", analytics_enabled=False,
                       delete_cache=(3600, 86400)) as demo:
            gr.Markdown("## sdlora: train a style LoRA\n"
                        "<span class='sdl-hint'>1. Dataset: upload images &nbsp; 2. Train &nbsp; 3. Preview with the "
                        "LoRA-scale slider &nbsp; 4. Export the file for A1111, ComfyUI, kohya or diffusers.</span>")
            with gr.Tabs(elem_id="sdl-tabs"):
                # --------------------------------------------------------------------- dataset
                with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                    with gr.Row():
                        ds_name = gr.Textbox(value=datasets[0] if datasets else "my-style", label="Dataset name",
                                             info="Uploads are stored under this name (letters, digits, - _ .).",
                                             elem_id="ds-name", scale=2)
                        ds_existing = gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None,
                                                  label="Open a dataset",
                                                  info=f"Dataset folders in {ds.datasets_root(ctx.runs_dir)}.",
                                                  elem_id="ds-existing", scale=2,
                                                  allow_custom_value=True)
                        trigger = gr.Textbox(value="", label="Trigger word",
                                             info="The word that calls up the style in prompts, e.g. 'mystyle'.",
                                             elem_id="ds-trigger", scale=2)
                    with gr.Row():
                        with gr.Column(scale=3):
                            upload = gr.File(file_count="multiple", label="Upload images, .txt captions or a .zip",
                                             elem_id="ds-upload", height=140)
                        with gr.Column(scale=2):
                            style = gr.Dropdown(choices=styles, value=styles[0] if styles else None,
                                                label="Or start from a bundled style set", elem_id="ds-style",
                                                interactive=bool(styles))
                            use_style = gr.Button("Use this style set", elem_id="ds-use-style", interactive=bool(styles))
                    check = gr.HTML(value='<div class="sdl-check" id="sdl-check">No dataset checked yet.</div>',
                                    label="Dataset check", elem_id="ds-check")
                    gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                                         object_fit="contain", allow_preview=False, elem_id="ds-gallery")
                    with gr.Row():
                        sel_image = gr.Textbox(label="Selected image", interactive=False, elem_id="ds-selected", scale=1)
                        caption = gr.Textbox(label="Caption", lines=2, elem_id="ds-caption", scale=3,
                                             info="Saved as a .txt next to the image; the trigger word is added by the template.")
                    with gr.Row():
                        save_cap = gr.Button("Save caption", elem_id="ds-save-caption")
                        remove = gr.Button("Remove image", variant="stop", elem_id="ds-remove")
                        recheck = gr.Button("Check dataset", elem_id="ds-recheck")
                        remove_bad = gr.Button("Remove unusable files", elem_id="ds-remove-unusable")
                    ds_items = gr.State([])

                # --------------------------------------------------------------------- train
                with gr.Tab("Train", id="train", elem_id="tab-train"):
                    with gr.Row():
                        base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                           info=f"Bundled demo model and what is in {ctx.models_dir}.",
                                           elem_id="tr-base", scale=3, allow_custom_value=True)
                        preset = gr.Radio(choices=form.available_presets(), value="custom", label="Preset",
                                          elem_id="tr-preset", scale=3)
                    with gr.Row():
                        run_name = gr.Textbox(value="my-style", label="Run name (output_name)",
                                              info="The run folder and the name of the exported file.",
                                              elem_id="tr-run-name")
                        train_ds = gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None,
                                               label="Dataset", elem_id="tr-dataset", allow_custom_value=True)
                    main = form.main_fields()
                    for i in range(0, len(main), 4):
                        with gr.Row():
                            for info in main[i:i + 4]:
                                self.cfg[info["name"]] = form.make_component(info)
                    with gr.Accordion("Advanced", open=False, elem_id="tr-advanced"):
                        sections: dict[str, list[dict[str, Any]]] = {}
                        for info in form.advanced_fields():
                            sections.setdefault(info["section"] or "other", []).append(info)
                        for section, infos in sections.items():
                            gr.Markdown(f"**{form.SECTION_TITLES.get(section, section.title())}**")
                            for i in range(0, len(infos), 4):
                                with gr.Row():
                                    for info in infos[i:i + 4]:
                                        self.cfg[info["name"]] = form.make_component(info)
                    for k in RESOLUTION_FIELDS:
                        if k in self.cfg:
                            self.cfg[k].value = res_values[k]
                    with gr.Row():
                        start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                        stop = gr.Button("Stop", variant="stop", elem_id="tr-stop")
                        resume = gr.Button("Resume", elem_id="tr-resume")
                    start_msg = gr.Markdown("", elem_id="tr-message")
                    with gr.Group():
                        watch = gr.Dropdown(choices=[], value=None, label="Run shown below", elem_id="tr-watch",
                                            allow_custom_value=True)
                        progress = gr.HTML(runview.progress_html(None, None), elem_id="tr-progress")
                    with gr.Row():
                        loss_plot = gr.LinePlot(runview.loss_frame([]), x="step", y="loss", title="Loss",
                                                height=260, elem_id="tr-loss", scale=3)
                        samples = gr.Gallery(label="Newest samples", columns=4, height=260, object_fit="contain",
                                             elem_id="tr-samples", scale=2)
                    log_box = gr.Textbox(label="Log (newest lines; the whole log is train.log in the run folder)",
                                         lines=runview.LOG_TAIL_LINES, max_lines=runview.LOG_TAIL_LINES,
                                         autoscroll=True, interactive=False,
                                         elem_id="sdl-log")
                    runs_df = gr.Dataframe(headers=runview.RUNS_HEADERS, value=runview.runs_table(ctx.runs_dir),
                                           label="Runs", interactive=False, wrap=True, elem_id="tr-runs",
                                           column_widths=["18%", "10%", "10%", "47%", "15%"])

                # --------------------------------------------------------------------- preview
                with gr.Tab("Preview", id="preview", elem_id="tab-preview") as tab_preview:
                    with gr.Row():
                        with gr.Column(scale=2):
                            pv_base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                                  elem_id="pv-base", allow_custom_value=True)
                            pv_runs = gr.Dropdown(choices=[], value=[], multiselect=True, label="LoRAs of runs",
                                                  elem_id="pv-runs", allow_custom_value=True)
                            pv_files = gr.File(file_count="multiple", label="Or upload SD 1.x LoRA .safetensors files",
                                               elem_id="pv-files")
                            pv_weights = gr.Dataframe(headers=["LoRA", "weight"], value=[], type="array",
                                                      datatype=["str", "number"], static_columns=[0],
                                                      label="Weight of each LoRA", elem_id="pv-weights",
                                                      interactive=True)
                            prompt = gr.Textbox(value="a house by a lake", label="Prompt", lines=2, elem_id="pv-prompt")
                            negative = gr.Textbox(value="", label="Negative prompt", elem_id="pv-negative")
                            with gr.Row():
                                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="pv-seed")
                                steps = gr.Number(value=20, precision=0, label="Steps", elem_id="pv-steps")
                                width = gr.Number(value=res_values["width"], precision=0, step=8, label="Width",
                                                  elem_id="pv-width")
                                height = gr.Number(value=res_values["height"], precision=0, step=8, label="Height",
                                                   elem_id="pv-height")
                            with gr.Row():
                                guidance = gr.Number(value=7.0, step=0.5, label="Guidance",
                                                     elem_id="pv-guidance")
                                sampler = gr.Dropdown(choices=scheduler_names(), value=DEFAULT_SCHEDULER,
                                                      label="Sampler", elem_id="pv-sampler", allow_custom_value=True)
                        with gr.Column(scale=3):
                            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale",
                                              info="0 = base model; the image follows the slider (model stays loaded).",
                                              elem_id="pv-scale")
                            gen = gr.Button("Generate", variant="primary", elem_id="pv-generate")
                            image = gr.Image(label="Image", format="png", type="pil", interactive=False,
                                             elem_id="pv-image", elem_classes="sdl-preview", height=320)
                    with gr.Accordion("Base vs LoRA, and a scale grid (same seed)", open=True):
                        with gr.Row():
                            cmp_btn = gr.Button("Compare base vs LoRA", elem_id="pv-compare")
                            grid_scales = gr.Textbox(value=DEFAULT_GRID, label="Grid scales", elem_id="pv-grid-scales")
                            grid_btn = gr.Button("Scale grid", elem_id="pv-grid")
                        with gr.Row():
                            img_base = gr.Image(label="Base model (scale 0)", format="png", type="pil",
                                                interactive=False, elem_id="pv-img-base", elem_classes="sdl-preview", height=256)
                            img_lora = gr.Image(label="With LoRA", format="png", type="pil", interactive=False,
                                                elem_id="pv-img-lora", elem_classes="sdl-preview", height=256)
                        grid_img = gr.Image(label="Scale grid", format="png", type="pil", interactive=False,
                                            elem_id="pv-grid-image", elem_classes="sdl-preview")

                # --------------------------------------------------------------------- export
                with gr.Tab("Export", id="export", elem_id="tab-export") as tab_export:
                    with gr.Row():
                        ex_run = gr.Dropdown(choices=[], value=None, label="Run", elem_id="ex-run", allow_custom_value=True)
                        ex_fmt = gr.Radio(choices=EXPORT_FORMATS, value="kohya", label="Format", elem_id="ex-format")
                    with gr.Row():
                        ex_step = gr.Dropdown(choices=[("final LoRA", "final")], value="final",
                                              label="Final LoRA or a checkpoint", elem_id="ex-step",
                                              allow_custom_value=True)
                        ex_rank = gr.Number(value=0, precision=0, label="Rank (0 = as trained)",
                                            info="A lower rank is made by SVD of each module's update.",
                                            elem_id="ex-rank")
                    ex_btn = gr.Button("Export", variant="primary", elem_id="ex-export")
                    ex_file = gr.File(label="Download", interactive=False, elem_id="ex-file")
                    ex_where = gr.Markdown(WHERE_TO_PUT.format(stem="FILE_NAME", name="FILE_NAME.safetensors"),
                                           elem_id="ex-where")
                    ex_summary = gr.Textbox(label="What the file holds", lines=8, max_lines=16, interactive=False,
                                            elem_id="ex-summary")
                    ex_meta = gr.JSON(label="Metadata embedded in the file (safetensors header)", elem_id="ex-meta",
                                      open=True)

            timer = gr.Timer(1.0)
            poll_state = gr.State(None)
            run_status_api = gr.api(self.run_status, api_name="run_status")  # noqa: F841

            # ------------------------------------------------------------------------- wiring
            check_kw = {k: self.cfg[k] for k in CHECK_FIELDS if k in self.cfg}
            ds_kw = dict(dataset_name=ds_name, trigger_word=trigger, **check_kw)
            ds_outputs = [gallery, check, ds_existing, train_ds, ds_items]
            upload.upload(self.upload_dataset, inputs_kwargs=dict(ds_kw, files=upload),
                          outputs=[*ds_outputs, upload], api_name="upload_dataset")
            ds_existing.input(_identity, inputs=ds_existing, outputs=ds_name, api_visibility="private").then(
                self.open_dataset, inputs_kwargs=ds_kw, outputs=ds_outputs, api_name="open_dataset")
            use_style.click(self.use_style_set, inputs_kwargs=dict(ds_kw, style=style), outputs=ds_outputs,
                            api_name="use_style_set")
            recheck.click(self.check_dataset, inputs_kwargs=ds_kw, outputs=check, api_name="check_dataset")
            gallery.select(self.select_image, inputs=[ds_name, ds_items], outputs=[sel_image, caption],
                           api_visibility="private")
            save_cap.click(self.save_caption, inputs_kwargs=dict(ds_kw, image=sel_image, caption=caption),
                           outputs=[gallery, check, ds_items], api_name="save_caption")
            remove.click(self.remove_image, inputs_kwargs=dict(ds_kw, image=sel_image),
                         outputs=[*ds_outputs, sel_image, caption], api_name="remove_image")
            remove_bad.click(self.remove_unusable, inputs_kwargs=ds_kw, outputs=ds_outputs,
                             api_name="remove_unusable")

            preset.input(self.apply_preset, inputs=preset, outputs=list(self.cfg.values()), api_visibility="private")
            if all(k in self.cfg for k in RESOLUTION_FIELDS):
                base.input(self.base_changed, inputs=base,
                           outputs=[*(self.cfg[k] for k in RESOLUTION_FIELDS), width, height],
                           api_visibility="private")
            start.click(self.start_training,
                        inputs_kwargs=dict(pretrained_model_name_or_path=base, output_name=run_name,
                                           dataset=train_ds, trigger_word=trigger, **self.cfg),
                        outputs=[start_msg, watch, runs_df], api_name="start_training", concurrency_id="train")
            stop.click(self.stop_training, inputs=watch, outputs=[start_msg, runs_df], api_name="stop_training",
                       concurrency_id="train")
            resume.click(self.resume_training, inputs=watch, outputs=[start_msg, watch, runs_df],
                         api_name="resume_training", concurrency_id="train")
            live_outputs = [progress, loss_plot, samples, log_box, runs_df, watch, poll_state]
            timer.tick(self.poll, inputs=[watch, poll_state], outputs=live_outputs, show_progress="hidden",
                       concurrency_limit=None, api_visibility="private")
            watch.input(self.poll, inputs=[watch, gr.State(None)], outputs=live_outputs, show_progress="hidden",
                        api_visibility="private")
            runs_df.select(self.pick_run, inputs=None, outputs=watch, api_visibility="private").then(
                self.poll, inputs=[watch, gr.State(None)], outputs=live_outputs, show_progress="hidden",
                api_visibility="private")

            pv_inputs = [pv_base, pv_runs, pv_files, pv_weights, prompt, negative, seed, steps, width, height, guidance,
                         sampler]
            for trig in (pv_runs.change, pv_files.change):
                trig(self.lora_table, inputs=[pv_runs, pv_files, pv_weights], outputs=pv_weights,
                     api_visibility="private", show_progress="hidden")
            pv_runs.input(self.preview_base_for, inputs=[pv_runs, pv_base], outputs=[pv_base, width, height],
                          api_visibility="private", show_progress="hidden")
            gen.click(self.preview, inputs=[*pv_inputs, scale], outputs=image, api_name="preview",
                      concurrency_id="preview")
            scale.input(self.preview, inputs=[*pv_inputs, scale], outputs=image, api_visibility="private",
                        concurrency_id="preview", trigger_mode="always_last", show_progress="minimal")
            cmp_btn.click(self.compare, inputs=[*pv_inputs, scale], outputs=[img_base, img_lora], api_name="compare",
                          concurrency_id="preview")
            grid_btn.click(self.scale_grid, inputs=[*pv_inputs, grid_scales], outputs=grid_img,
                           api_name="scale_grid", concurrency_id="preview")

            ex_run.input(self.export_info, inputs=ex_run, outputs=[ex_step, ex_summary, ex_meta],
                          api_name="export_info", show_progress="hidden")
            ex_btn.click(self.export_lora, inputs=[ex_run, ex_fmt, ex_step, ex_rank],
                         outputs=[ex_file, ex_summary, ex_meta], api_name="export").then(
                _where_to_put, inputs=[ex_file, ex_fmt], outputs=ex_where, api_visibility="private", show_progress="hidden")

            loaded = demo.load(self.on_load, inputs=None,
                               outputs=[base, pv_base, ds_existing, train_ds, ds_name, watch, pv_runs, ex_run,
                                        run_name],
                               api_visibility="private")
            loaded.then(self.poll, inputs=[watch, gr.State(None)], outputs=live_outputs, show_progress="hidden",
                        api_visibility="private")
            loaded.then(guarded(self.show_dataset), inputs_kwargs=ds_kw, outputs=[gallery, check, ds_items],
                        api_visibility="private", show_progress="hidden")
            tab_preview.select(self.refresh_preview_runs, inputs=None, outputs=pv_runs, api_visibility="private",
                               show_progress="hidden")
            tab_export.select(self.refresh_export, inputs=ex_run, outputs=[ex_run, ex_step, ex_summary, ex_meta],
                              api_visibility="private", show_progress="hidden")
        return demo


# ---------------------------------------------------------------------------------------------
def build_app(opts: ServerOptions) -> gr.Blocks:
    """The app's ``gr.Blocks`` for these server options (not launched)."""
    return App(opts).build()


def _where_to_put(path: str | None, fmt: str = "kohya") -> str:
    """The "where the file goes" line, with the exported file's name."""
    name = Path(str(path)).name if path else "FILE_NAME.safetensors"
    if fmt == "diffusers":
        return (f"**Where the file goes:** diffusers: `pipe.load_lora_weights(\"{name}\")`. For Automatic1111, "
                "Forge, ComfyUI or kohya, export the kohya format.")
    return WHERE_TO_PUT.format(stem=Path(name).stem, name=name)


def _identity(value: Any) -> Any:
    return value


def _resolution_values(res: int) -> dict[str, int]:
    """Resolution, bucket limits and preview size that suit a base model of native size ``res``."""
    res = max(64, int(res) // 8 * 8)
    steps = 64 if res % 64 == 0 else 8
    return {"resolution": res, "min_bucket_reso": max(steps, res // 2 // steps * steps), "max_bucket_reso": res * 2,
            "bucket_reso_steps": steps, "width": res, "height": res}


def _table_rows(value: Any) -> list[list[Any]]:
    """Rows of a Dataframe value as the API or the page sends it (list of lists, dict or DataFrame)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.get("data") or [])
    if hasattr(value, "values") and hasattr(value, "columns"):
        return value.values.tolist()
    return list(value)


def _weight(value: Any, name: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise UIError(f"The weight of {name} ({value!r}) is not a number.", title="LoRA weight") from None
    if not -4.0 <= w <= 4.0:
        raise UIError(f"The weight of {name} ({w:g}) is outside -4 to 4.", title="LoRA weight")
    return w


def _int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} ({value!r}) is not a number.", title="Invalid value") from None
    if number != number or number != int(number):
        raise UIError(f"{name} ({value!r}) is not a whole number.", title="Invalid value")
    n = int(number)
    if n < lo or (hi is not None and n > hi):
        raise UIError(f"{name} {n} is out of range ({lo} to {hi if hi is not None else 'any'}).",
                      title="Invalid value")
    return n


def _scales(text: str) -> list[float]:
    values = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise UIError(f"Grid scales: {part!r} is not a number; write e.g. {DEFAULT_GRID}.", title="Scale grid") from None
        if not -4 <= v <= 4:
            raise UIError(f"Grid scales: {v:g} is outside -4 to 4.", title="Scale grid")
        values.append(v)
    if not values or len(values) > 12:
        raise UIError(f"Grid scales: give 1 to 12 numbers, e.g. {DEFAULT_GRID}.", title="Scale grid")
    return values


def _inspection(path: Path) -> tuple[str, dict[str, Any]]:
    """(readable report, the metadata stored in the file's header) of a LoRA file."""
    from ..lora.formats import inspect_file
    from ..lora.formats.inspect import format_inspection

    info = inspect_file(path)
    report = format_inspection(info).replace(str(path), Path(path).name)
    return report, _jsonable(info.get("metadata") or {})


def _jsonable(value: Any) -> Any:
    """Inspection results made JSON-friendly for ``gr.JSON`` (paths and tuples as strings/lists)."""
    import json

    return json.loads(json.dumps(value, default=str))
