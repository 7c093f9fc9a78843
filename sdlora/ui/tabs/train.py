"""Train tab: the training form, start/stop/resume, and the live panel of a run (progress, loss,
samples, log, the runs table), redrawn by a timer from the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ...paths import safe_name
from ...train import TrainConfig, active_run, prepare_run, start_run, stop_run
from .. import datasets as ds
from .. import defaults, form, runview
from ..context import AppContext
from ..errors import UIError, esc, guarded, log

if TYPE_CHECKING:
    from .dataset import DatasetTab
    from .preview import PreviewTab

#: Form fields that follow the chosen base model even with the "Custom" preset: its native size and
#: its family's learning rates (each only while it holds the value the page set, so the user's own stays).
RESOLUTION_FIELDS = ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
RATE_FIELDS = ("learning_rate", "text_encoder_lr")


#: Where the browser keeps the Train form between visits (localStorage), so a reload or an app restart
#: brings back the last values (base model, preset, run name, dataset, every option).
FORM_STORAGE_KEY = "sdlora-train-form"

#: After Start or Resume the run's progress comes into view (the form above it is long).
SHOW_PROGRESS_JS = ("() => { const el = document.querySelector('#tr-message');"
                    " if (el) el.scrollIntoView({behavior: 'smooth', block: 'start'}); }")


@dataclass(frozen=True)
class PollState:
    """What the page showed at the last timer tick, so unchanged files are not redrawn."""

    runs_sig: tuple | None = None
    run_sig: tuple | None = None
    watch: str | None = None
    running: str | None = None
    state: str | None = None
    names: tuple[str, ...] | None = None


class TrainTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        #: The training form's components by config option name.
        self.cfg: dict[str, gr.components.Component] = {}

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self) -> None:
        ctx = self.ctx
        base_choices, base_value = ctx.base_dropdown()
        start = defaults.page_defaults(ctx.base_choice(base_value))
        datasets = ds.list_datasets(ctx.runs_dir)
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            with gr.Row():
                self.base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                        info=f"The bundled demo model and the models in the app's models folder "
                                             f"({ctx.models_dir.name}/).",
                                        elem_id="tr-base", scale=3, allow_custom_value=True, min_width=300)
                self.preset = gr.Radio(choices=form.available_presets(), value=defaults.DEFAULT_PRESET,
                                       label="Preset", elem_id="tr-preset", scale=3, min_width=300,
                                       info="Style: the values that show a style on the chosen base model "
                                            "(they follow the base; values you change stay).")
            with gr.Row():
                self.run_name = gr.Textbox(value="my-style", label="Run name (output_name)",
                                           info="The run folder and the name of the exported file.",
                                           elem_id="tr-run-name")
                self.dataset = gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None,
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
            for k, component in self.cfg.items():
                component.value = start[k]
            with gr.Row():
                self.start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                self.stop = gr.Button("Stop", variant="stop", elem_id="tr-stop")
                self.resume = gr.Button("Resume", elem_id="tr-resume")
            self.message = gr.Markdown("", elem_id="tr-message")
            with gr.Group():
                self.watch = gr.Dropdown(choices=[], value=None, label="Run shown below", elem_id="tr-watch",
                                         allow_custom_value=True)
                self.progress = gr.HTML(runview.progress_html(None), elem_id="tr-progress")
            with gr.Row():
                self.loss_plot = gr.LinePlot(runview.loss_frame([]), x="step", y="loss", color="series",
                                             color_map=runview.LOSS_COLORS, title="Loss", x_title="step",
                                             y_title="loss",
                                             height=260, elem_id="tr-loss", scale=3, min_width=320)
                self.samples = gr.Gallery(label="Newest samples", columns=3, height=260, object_fit="contain",
                                          elem_id="tr-samples", scale=2, min_width=320)
            self.log_box = gr.Textbox(label="Log (newest lines; the whole log is train.log in the run folder)",
                                      lines=runview.LOG_TAIL_LINES, max_lines=runview.LOG_TAIL_LINES,
                                      autoscroll=True, interactive=False, elem_id="sdl-log")
            self.runs_df = gr.Dataframe(headers=runview.RUNS_HEADERS, value=runview.runs_table(ctx.runs_dir),
                                        label="Runs", interactive=False, wrap=True, elem_id="tr-runs",
                                        column_widths=["18%", "10%", "10%", "47%", "15%"])
        # Non-visual components are placed after the tabs (App.build renders them): as direct children of
        # the tabs they took slots in gradio's tab bar (it drew tabs twice), and inside a tab that is not
        # open yet the browser's saved form is not there when the page loads.
        self.timer = gr.Timer(1.0, render=False)
        self.poll_state = gr.State(None, render=False)
        self.saved = gr.BrowserState({}, storage_key=FORM_STORAGE_KEY, secret=ctx.browser_secret(), render=False)
        #: The values the page set last (form fields, trigger word, preview prompt): a field still
        #: holding its value follows the next base or preset, a field the user changed stays.
        self.applied = gr.State(start, render=False)

    @property
    def page_components(self) -> list[gr.components.Component]:
        """Components that belong to the page rather than to the tab (see ``layout``)."""
        return [self.timer, self.poll_state, self.saved, self.applied]

    # ---- events ---------------------------------------------------------------------------------
    def wire(self, dataset: DatasetTab, preview: PreviewTab) -> None:
        self.preview_tab = preview
        self.dataset_tab = dataset
        gr.api(self.run_status, api_name="run_status")
        follow_outputs = [*self.cfg.values(), dataset.trigger, preview.prompt, preview.width, preview.height,
                          self.applied]
        follow_inputs = dict(base=self.base, preset=self.preset, applied=self.applied, trigger_word=dataset.trigger,
                             prompt=preview.prompt, **self.cfg)
        remember = dict(fn=self.remember, inputs_kwargs=dict(base=self.base, preset=self.preset, run_name=self.run_name,
                                                             dataset=self.dataset, applied=self.applied, **self.cfg),
                        outputs=self.saved, show_progress="hidden", api_visibility="private", queue=False,
                        preprocess=False)  # raw values: an out-of-range number is kept, not refused twice
        self.preset.input(self.apply_preset, inputs_kwargs=follow_inputs, outputs=follow_outputs,
                          api_visibility="private").then(**remember)
        self.base.input(self.base_changed, inputs_kwargs=follow_inputs, outputs=follow_outputs,
                        api_visibility="private").then(**remember)
        gr.on([c.input for c in (self.run_name, self.dataset, *self.cfg.values())], trigger_mode="always_last",
              **remember)
        self.start.click(self.start_training,
                         inputs_kwargs=dict(pretrained_model_name_or_path=self.base, output_name=self.run_name,
                                            dataset=self.dataset, trigger_word=dataset.trigger, **self.cfg),
                         outputs=[self.message, self.watch, self.runs_df], api_name="start_training",
                         concurrency_id="train").success(
            None, js=SHOW_PROGRESS_JS)
        self.stop.click(self.stop_training, inputs=self.watch, outputs=[self.message, self.runs_df],
                        api_name="stop_training", concurrency_id="train")
        self.resume.click(self.resume_training, inputs=self.watch, outputs=[self.message, self.watch, self.runs_df],
                          api_name="resume_training", concurrency_id="train").success(None, js=SHOW_PROGRESS_JS)
        self.live_outputs = [self.progress, self.loss_plot, self.samples, self.log_box, self.runs_df, self.watch,
                             self.poll_state]
        self.timer.tick(self.poll, inputs=[self.watch, self.poll_state], outputs=self.live_outputs,
                        show_progress="hidden", concurrency_limit=None, api_visibility="private")
        self.watch.input(self.poll, inputs=[self.watch, gr.State(None)], outputs=self.live_outputs,
                         show_progress="hidden", api_visibility="private")
        self.runs_df.select(self.pick_run, inputs=None, outputs=self.watch, api_visibility="private").then(
            self.poll, inputs=[self.watch, gr.State(None)], outputs=self.live_outputs, show_progress="hidden",
            api_visibility="private")

    def redraw_live(self, event) -> None:
        """After ``event`` (page load), draw the live panel at once instead of at the next tick."""
        event.then(self.poll, inputs=[self.watch, gr.State(None)], outputs=self.live_outputs, show_progress="hidden",
                   api_visibility="private")

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        return [self.base, self.dataset, self.watch, self.run_name, self.preset, self.applied, *self.cfg.values()]

    def on_load(self, saved: dict | None = None) -> dict:
        """A fresh page: the base models and datasets there are now (the newest with images chosen), the
        run to watch, a free run name; then the form as the browser last saw it (``saved``, see
        :meth:`remember`), as far as its values still fit (a base model or dataset that is gone is not
        brought back, nor a value out of range)."""
        base_choices, base_value = self.ctx.base_dropdown()
        datasets = ds.list_datasets(self.ctx.runs_dir)
        usable = [d for d in datasets if ds.image_files(ds.dataset_dir(self.ctx.runs_dir, d))]
        names = [r[0] for r in runview.runs_table(self.ctx.runs_dir)]
        first = (usable or datasets or [None])[0]
        saved = saved if isinstance(saved, dict) else {}
        if saved.get("base") in {value for _, value in base_choices}:
            base_value = saved["base"]
        if saved.get("dataset") in usable:
            first = saved["dataset"]
        stem = safe_name(str(saved.get("run_name") or ""), default="my-style")
        out = {self.base: gr.update(choices=base_choices, value=base_value),
               self.dataset: gr.update(choices=datasets, value=first),
               self.watch: gr.update(choices=names, value=runview.watched_default(self.ctx.runs_dir)),
               self.run_name: self._free_run_name(stem)}
        if saved.get("preset") in dict(form.available_presets()).values():
            out[self.preset] = saved["preset"]
        for key, value in (saved.get("cfg") or {}).items():
            if key in self.cfg and _fits(key, value):
                out[self.cfg[key]] = value
        if isinstance(saved.get("applied"), dict):
            out[self.applied] = saved["applied"]
        return out

    def remember(self, base: str | None = None, preset: str | None = None, run_name: str = "",
                 dataset: str | None = None, applied: dict | None = None, **cfg: Any) -> dict:
        """What the browser keeps of the form (see ``FORM_STORAGE_KEY``): written on every edit."""
        return {"base": base, "preset": preset, "run_name": run_name, "dataset": dataset,
                "applied": applied or {}, "cfg": cfg}

    def _free_run_name(self, stem: str) -> str:
        """``stem``, or ``stem-2``, ``stem-3``... : the first name no run uses yet."""
        name, n = stem, 1
        while (self.ctx.runs_dir / name).exists():
            n += 1
            name = f"{stem}-{n}"
        return name

    # ---- handlers -------------------------------------------------------------------------------
    def _runs_update(self, value: str | None = None) -> Any:
        names = [row[0] for row in runview.runs_table(self.ctx.runs_dir)]
        return gr.update(choices=names, value=value if value in names else (names[0] if names else None))

    def _refuse_if_running(self) -> None:
        running = active_run(self.ctx.runs_dir)
        if running is not None:
            raise UIError(f"Run '{running.name}' is training now (step {running.step}/{running.total_steps or '?'}). "
                          "One training runs at a time: wait until it is done or press Stop, then start again.",
                          title="A training is already running")

    @guarded
    def start_training(self, pretrained_model_name_or_path: str, output_name: str, dataset: str,
                       trigger_word: str = "", **settings: Any):
        """Write the run's config and start training it in a separate process (one training at a time)."""
        with self.ctx.train_lock:
            self._refuse_if_running()
            base = self.ctx.check_base(pretrained_model_name_or_path)
            if not (dataset or "").strip():
                raise UIError("Choose a dataset (upload images on the Dataset tab first).", title="Dataset")
            folder = ds.dataset_dir(self.ctx.runs_dir, dataset)
            if not folder.is_dir():
                raise UIError(f"Dataset {dataset!r} does not exist; upload images on the Dataset tab first.",
                              title="Dataset")
            values = form.settings_from_form(settings)
            data = dict(values, pretrained_model_name_or_path=base, output_name=(output_name or "").strip(),
                        output_dir=str(self.ctx.runs_dir), train_data_dir=str(folder),
                        trigger_word=(trigger_word or "").strip())
            if values.get("with_prior_preservation"):
                cls = safe_name(str(values.get("class_prompt", "")), default="class")
                data["class_data_dir"] = str(self.ctx.runs_dir / "_class_images" / cls)
            cfg = TrainConfig.from_dict(data)
            run = prepare_run(cfg)
            start_run(run)
        gr.Info(f"Training of {run.name} started.")
        return {self.message: f"Started **{esc(run.name)}**: {cfg.max_train_steps} steps on {esc(Path(base).name)}.",
                self.watch: self._runs_update(run.name), self.runs_df: runview.runs_table(self.ctx.runs_dir)}

    @guarded
    def stop_training(self, run: str):
        """Ask a running training to save a checkpoint and stop."""
        r = self.ctx.existing_run(run)
        if not stop_run(r):
            raise UIError(f"Run '{r.name}' is not running ({r.status().get('state')}).", title="Stop")
        gr.Info(f"Stopping {r.name}: it saves a checkpoint first; Resume continues from it.")
        return {self.message: f"Stopping **{esc(r.name)}** (saving a checkpoint).",
                self.runs_df: runview.runs_table(self.ctx.runs_dir)}

    @guarded
    def resume_training(self, run: str):
        """Continue a stopped or failed run from its newest checkpoint."""
        with self.ctx.train_lock:
            r = self.ctx.existing_run(run)
            st = r.status()
            if st.get("state") == "done":
                raise UIError(f"Run '{r.name}' is already done; start a new run to train more.", title="Resume")
            self._refuse_if_running()
            start_run(r)
        cp = st.get("checkpoint")
        gr.Info(f"Resuming {r.name}" + (f" from {cp}." if cp else " (no checkpoint yet: from the start)."))
        return {self.message: f"Resumed **{esc(r.name)}**" + (f" from {esc(cp)}." if cp else "."),
                self.watch: self._runs_update(r.name), self.runs_df: runview.runs_table(self.ctx.runs_dir)}

    def run_status(self, run: str) -> dict:
        """Status of a run: state, message, step, total_steps, checkpoint, lora (API only)."""
        try:
            return self.ctx.existing_run(run).status()
        except UIError as e:
            return {"state": "missing", "message": str(e), "name": run}

    def poll(self, watch: str | None, state: PollState | None):
        """Timer tick: redraw the live panel and the runs table when their files changed."""
        try:
            return self._poll(watch, state)
        except Exception:  # noqa: BLE001 - a tick must never break the page; the next one retries
            log.exception("poll failed")
            return gr.skip()

    def _poll(self, watch: str | None, old: PollState | None) -> dict:
        first = old is None
        old = old or PollState()
        out: dict = {}
        runs_sig = runview.runs_signature(self.ctx.runs_dir)
        running, names = old.running, old.names
        if runs_sig != old.runs_sig:
            table = runview.runs_table(self.ctx.runs_dir)
            out[self.runs_df] = table
            names = tuple(row[0] for row in table)
            now_running = [row[0] for row in table if row[1] in ("running", "queued")]
            running = now_running[0] if now_running else None
            # A run that starts (in another tab, or from the CLI) is shown; otherwise the page keeps
            # showing the run the user picked.
            shown = watch
            if running and running != old.running:
                watch = running
            if (not watch or watch not in names) and names:
                watch = names[0]
            if names != old.names or watch != shown:
                out[self.watch] = gr.update(choices=list(names), value=watch)
        run_sig = None
        state = old.state if watch == old.watch else None
        run = None
        if watch:
            try:
                run = self.ctx.existing_run(watch)
            except UIError:
                run = None
        if run is not None:
            run_sig = runview.run_signature(run)
            if run_sig != old.run_sig or watch != old.watch:
                view = runview.live_view(run)
                out.update({self.progress: view["progress"], self.loss_plot: view["loss"],
                            self.samples: gr.update(value=view["samples"], label=view["samples_label"]),
                            self.log_box: view["log"]})
                summary = view["summary"]
                if state in ("running", "queued") and summary.state != state:
                    self._announce_end(run.name, summary.state, summary.message)
                state = summary.state
        elif old.watch is not None or first:
            out.update({self.progress: runview.progress_html(None), self.loss_plot: runview.loss_frame([]),
                        self.samples: [], self.log_box: ""})
        out[self.poll_state] = PollState(runs_sig, run_sig, watch, running, state, names)
        return out

    @staticmethod
    def _announce_end(name: str, state: str, message: str) -> None:
        """The run this page watches just ended: say so in a message box too."""
        if state == "failed":
            gr.Warning(f"Training of {esc(name)} failed: {esc(message)}", title="Training failed", duration=None)
        elif state == "done":
            gr.Info(f"Training of {esc(name)} is done.")
        elif state == "stopped":
            gr.Info(f"Training of {esc(name)} stopped: {esc(message)}")

    def pick_run(self, evt: gr.SelectData):
        """Clicking a row of the runs table shows that run."""
        row = evt.row_value or []
        return {self.watch: row[0]} if row else {}

    def _follow(self, values: dict[str, Any], changes: dict[str, Any], applied: dict[str, Any]) -> dict:
        """Updates for the changed values (form fields, trigger word, preview prompt and size) and the
        new record of what the page set."""
        targets = {**self.cfg, "trigger_word": self.dataset_tab.trigger, "prompt": self.preview_tab.prompt,
                   "width": self.preview_tab.width, "height": self.preview_tab.height}
        # Plain values, not gr.update(): gradio rebuilds a component from its class on a property update,
        # which would drop the range check with the field's label that form.FieldNumber adds.
        out: dict = {targets[k]: v for k, v in changes.items() if k in targets}
        out[self.applied] = dict(applied, **values)
        return out

    @guarded
    def apply_preset(self, base: str | None = None, preset: str = "custom", applied: dict | None = None,
                     trigger_word: str = "", prompt: str = "", **current: Any):
        """A preset fills the training options it sets, for the chosen base model (paths, names and the
        seed stay; the size follows the base). "Custom" changes nothing."""
        if preset not in defaults.PRESET_FILES:
            return {}
        choice = self.ctx.base_choice(base)
        new = defaults.page_defaults(choice, preset)
        changes = {k: v for k, v in new.items() if k in self.cfg and not defaults.same_value(current.get(k), v)}
        # The trigger word and the preview prompt change only while they hold what the page wrote.
        state = {**current, "trigger_word": trigger_word, "prompt": prompt}
        changes.update(defaults.follow_base(state, applied, new, keys=("trigger_word", "prompt")))
        return self._follow(new, changes, applied or {})

    @guarded
    def base_changed(self, base: str | None = None, preset: str = "custom", applied: dict | None = None,
                     trigger_word: str = "", prompt: str = "", **current: Any):
        """A new base model brings its defaults: with a preset, the preset's values for that base (the
        demo model's style config, SDXL's or SD's); always its native size, its family's learning rates
        and a preview prompt and size that suit it. Values the user changed stay."""
        choice = self.ctx.base_choice(base)
        if choice is None or not choice.resolution:
            return {}
        new = defaults.page_defaults(choice, preset if preset in defaults.PRESET_FILES else "custom")
        keys = None if preset in defaults.PRESET_FILES else {*RESOLUTION_FIELDS, *RATE_FIELDS, "trigger_word",
                                                               "prompt"}
        state = {**current, "trigger_word": trigger_word, "prompt": prompt}
        changes = defaults.follow_base(state, applied, new, keys=keys)
        changes.update(width=new["width"], height=new["height"])
        return self._follow(new, changes, applied or {})


def _fits(key: str, value: Any) -> bool:
    """Whether a stored form value is still a valid value of option ``key``."""
    try:
        form.settings_from_form({key: value})
    except Exception:  # noqa: BLE001 - any refusal means: keep the page's own value
        return False
    return True
