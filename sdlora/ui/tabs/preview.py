"""Preview tab: generate with the LoRAs of runs or uploaded files at any scale (the base model stays
loaded, so the scale slider only changes weights), base vs LoRA side by side, and a scale grid."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from .. import defaults, form
from ..context import AppContext, lora_table
from ..errors import UIError, guarded, updates_only


@dataclass
class GenerationForm:
    """The inputs every generation takes, as the page (or an API call) sends them; the scale, or the
    grid's scales, come on top. Field names are the API's parameter names."""

    base_model: str | None = None
    lora_runs: list[str] | None = None
    lora_files: list[str] | None = None
    lora_weights: Any = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: float = 0
    steps: float = 20
    width: float = 512
    height: float = 512
    guidance: float = 7.0
    sampler: str = "DPM++ 2M Karras"


GENERATION_INPUTS = tuple(f.name for f in fields(GenerationForm))


@dataclass
class Generation:
    """A :class:`GenerationForm` checked: the base, the LoRAs (path, weight) and the arguments of
    :meth:`sdlora.generate.Previewer.generate`."""

    base: str
    loras: list[tuple[str, float]]
    kwargs: dict[str, Any]


def takes_generation_form(fn: Callable) -> Callable:
    """Give a handler ``fn(self, <its own parameters>, **request)`` the named parameters of
    :class:`GenerationForm` in its signature, before its own, so that gradio lists them (with their
    defaults) in the API as it would for written-out parameters."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    form_params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                     annotation=f.type) for f in fields(GenerationForm)]

    @functools.wraps(fn)
    def wrapper(self, *args: Any, **kwargs: Any):
        bound = wrapper.__signature__.bind(self, *args, **kwargs)
        values = dict(bound.arguments)
        values.pop("self")
        request = {name: values.pop(name) for name in GENERATION_INPUTS if name in values}
        return fn(self, **values, **request)

    wrapper.__signature__ = sig.replace(parameters=[own[0], *form_params, *own[1:]])  # type: ignore[attr-defined]
    return wrapper


class PreviewTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self) -> None:
        from ...generate import DEFAULT_SCHEDULER, scheduler_names

        base_choices, base_value = self.ctx.base_dropdown()
        choice = self.ctx.base_choice(base_value)
        start = defaults.page_defaults(choice)
        with gr.Tab("Preview", id="preview", elem_id="tab-preview") as self.tab:
            with gr.Row():
                with gr.Column(scale=2):
                    self.base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                            elem_id="pv-base", allow_custom_value=True)
                    self.runs = gr.Dropdown(choices=[], value=[], multiselect=True, label="LoRAs of runs",
                                            elem_id="pv-runs", allow_custom_value=True)
                    self.files = gr.File(file_count="multiple",
                                         label="Or upload LoRA .safetensors files (kohya or diffusers)",
                                         elem_id="pv-files")
                    self.weights = gr.Dataframe(headers=["LoRA", "weight"], value=[], type="array",
                                                datatype=["str", "number"], static_columns=[0],
                                                label="Weight of each LoRA", elem_id="pv-weights", interactive=True)
                    self.prompt = gr.Textbox(value=start["prompt"], label="Prompt", lines=2, elem_id="pv-prompt",
                                             info="With the LoRA's trigger word, as it was trained.")
                    self.negative = gr.Textbox(value="", label="Negative prompt", elem_id="pv-negative")
                    with gr.Row():
                        self.seed = form.FieldNumber(value=0, step=1, minimum=0, maximum=form.MAX_SEED,
                                                     label="Seed", elem_id="pv-seed")
                        self.steps = form.FieldNumber(value=20, step=1, minimum=1, maximum=form.MAX_PREVIEW_STEPS,
                                                      label="Steps", elem_id="pv-steps")
                        self.width = form.FieldNumber(value=start["width"], step=8, minimum=64,
                                                      maximum=form.MAX_PREVIEW_SIZE, label="Width", elem_id="pv-width")
                        self.height = form.FieldNumber(value=start["height"], step=8, minimum=64,
                                                       maximum=form.MAX_PREVIEW_SIZE, label="Height",
                                                       elem_id="pv-height")
                    with gr.Row():
                        self.guidance = form.FieldNumber(value=7.0, step=0.5, minimum=0, maximum=30, label="Guidance",
                                                         elem_id="pv-guidance")
                        self.sampler = gr.Dropdown(choices=scheduler_names(), value=DEFAULT_SCHEDULER, label="Sampler",
                                                   elem_id="pv-sampler", allow_custom_value=True)
                with gr.Column(scale=3):
                    self.scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale",
                                           info="0 = base model; the image follows the slider (model stays loaded).",
                                           elem_id="pv-scale")
                    self.generate = gr.Button("Generate", variant="primary", elem_id="pv-generate")
                    self.image = gr.Image(label="Image", format="png", type="pil", interactive=False,
                                          elem_id="pv-image", elem_classes="sdl-preview", height=320)
            with gr.Accordion("Base vs LoRA, and a scale grid (same seed)", open=True):
                with gr.Row():
                    self.compare_btn = gr.Button("Compare base vs LoRA", elem_id="pv-compare")
                    self.grid_scales = gr.Textbox(value=form.DEFAULT_GRID, label="Grid scales",
                                                  elem_id="pv-grid-scales")
                    self.grid_btn = gr.Button("Scale grid", elem_id="pv-grid")
                with gr.Row():
                    self.img_base = gr.Image(label="Base model (scale 0)", format="png", type="pil", interactive=False,
                                             elem_id="pv-img-base", elem_classes="sdl-preview", height=256)
                    self.img_lora = gr.Image(label="With LoRA", format="png", type="pil", interactive=False,
                                             elem_id="pv-img-lora", elem_classes="sdl-preview", height=256)
                self.grid_image = gr.Image(label="Scale grid", format="png", type="pil", interactive=False,
                                           elem_id="pv-grid-image", elem_classes="sdl-preview")

    # ---- events ---------------------------------------------------------------------------------
    def wire(self) -> None:
        gen = dict(zip(GENERATION_INPUTS, (self.base, self.runs, self.files, self.weights, self.prompt, self.negative,
                                           self.seed, self.steps, self.width, self.height, self.guidance,
                                           self.sampler)))
        for changed in (self.runs.change, self.files.change):
            changed(self.lora_table, inputs=[self.runs, self.files, self.weights], outputs=self.weights,
                    api_visibility="private", show_progress="hidden")
        self.runs.input(updates_only(self.base_for_runs), inputs=[self.runs, self.base, self.prompt],
                        outputs=[self.base, self.width, self.height, self.prompt],
                        api_visibility="private", show_progress="hidden")
        self.base.input(updates_only(self.size_for_base), inputs=self.base, outputs=[self.width, self.height],
                        api_visibility="private", show_progress="hidden")
        self.generate.click(self.preview, inputs_kwargs=dict(gen, scale=self.scale), outputs=self.image,
                            api_name="preview", concurrency_id="preview")
        self.scale.input(self.preview, inputs_kwargs=dict(gen, scale=self.scale), outputs=self.image,
                         api_visibility="private", concurrency_id="preview", trigger_mode="always_last",
                         show_progress="minimal")
        self.compare_btn.click(self.compare, inputs_kwargs=dict(gen, scale=self.scale),
                               outputs=[self.img_base, self.img_lora], api_name="compare", concurrency_id="preview")
        self.grid_btn.click(self.scale_grid, inputs_kwargs=dict(gen, scales=self.grid_scales), outputs=self.grid_image,
                            api_name="scale_grid", concurrency_id="preview")
        self.tab.select(self.open_tab, inputs=[self.runs, self.files, self.base, self.prompt],
                        outputs=[self.runs, self.base, self.width, self.height, self.prompt],
                        api_visibility="private", show_progress="hidden")

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        return [self.base, self.runs]

    def on_load(self) -> dict:
        base_choices, base_value = self.ctx.base_dropdown()
        return {self.base: gr.update(choices=base_choices, value=base_value), **self.refresh_runs()}

    # ---- handlers -------------------------------------------------------------------------------
    def _lora_runs(self) -> list[str]:
        return self.ctx.lora_run_names()

    def refresh_runs(self) -> dict:
        """The runs with a finished LoRA (opening the tab shows runs that finished meanwhile)."""
        return {self.runs: gr.update(choices=self._lora_runs())}

    def open_tab(self, lora_runs: list[str] | None, lora_files: list[str] | None, base: str | None,
                 prompt: str | None = ""):
        """Opening the tab: the runs that have a LoRA now; with no LoRA chosen yet, the newest run's
        LoRA is chosen, with the base it was trained on and a prompt in its trigger word."""
        names = self._lora_runs()
        if lora_runs or lora_files or not names:
            return {self.runs: gr.update(choices=names)}
        return {self.runs: gr.update(choices=names, value=[names[0]]),
                **self.base_for_runs([names[0]], base, prompt)}

    def _request(self, values: dict[str, Any]) -> Generation:
        """The form's generation inputs, checked (every problem names the field)."""
        from ...generate import scheduler_names

        f = GenerationForm(**values)
        if not (f.prompt or "").strip():
            raise UIError("Write a prompt first.", title="Prompt")
        if f.sampler not in scheduler_names():
            raise UIError(f"Unknown sampler {f.sampler!r}; choose one of: {', '.join(scheduler_names())}.",
                          title="Sampler")
        # Lists for both: the pipeline wants the negative prompt of the same type as the prompt.
        kwargs = dict(prompt=[f.prompt], negative_prompt=[f.negative_prompt or ""],
                      seed=form.parse_int(f.seed, "Seed", 0, form.MAX_SEED),
                      steps=form.parse_int(f.steps, "Steps", 1, form.MAX_PREVIEW_STEPS),
                      width=form.parse_int(f.width, "Width", 64, form.MAX_PREVIEW_SIZE),
                      height=form.parse_int(f.height, "Height", 64, form.MAX_PREVIEW_SIZE),
                      guidance=form.parse_float(f.guidance, "Guidance", 0, 30), scheduler=f.sampler)
        for k in ("width", "height"):
            if kwargs[k] % 8:
                raise UIError(f"{k.title()}: {kwargs[k]} is not a multiple of 8.", title="Size")
        loras = self.ctx.weighted_loras(f.lora_runs, f.lora_files, f.lora_weights)
        base = self.ctx.check_base(f.base_model)
        if self.ctx.needs_loading(base):
            choice = self.ctx.base_choice(base)
            gr.Info(f"Loading the base model ({choice.label if choice else 'base'}) for the first preview; this "
                    "takes a while once, then the scale slider only changes weights.", duration=10)
        return Generation(base, loras, kwargs)

    @guarded
    @takes_generation_form
    def preview(self, scale: float = 1.0, **request: Any):
        """Generate one image with the LoRAs at ``scale`` (0 = the base model alone)."""
        req = self._request(request)
        with self.ctx.preview_lock:
            prev = self.ctx.previewer(req.base, req.loras)
            return prev.generate(scale=float(scale), **req.kwargs)[0]

    @guarded
    @takes_generation_form
    def compare(self, scale: float = 1.0, **request: Any):
        """The base model and the LoRA at ``scale``, same prompt and seed, side by side."""
        req = self._request(request)
        if not req.loras:
            raise UIError("Pick a run's LoRA or upload a LoRA file to compare with the base model.", title="LoRA")
        with self.ctx.preview_lock:
            prev = self.ctx.previewer(req.base, req.loras)
            return {self.img_base: prev.generate(scale=0.0, **req.kwargs)[0],
                    self.img_lora: prev.generate(scale=float(scale), **req.kwargs)[0]}

    @guarded
    @takes_generation_form
    def scale_grid(self, scales: str = form.DEFAULT_GRID, **request: Any):
        """One image per LoRA scale, same seed, in a labelled row."""
        from ...generate import image_grid

        req = self._request(request)
        values = form.parse_scales(scales)
        with self.ctx.preview_lock:
            prev = self.ctx.previewer(req.base, req.loras)
            images = prev.scale_grid(values, **req.kwargs)
        return image_grid(images, labels=[f"scale {s:g}" for s in values])

    def lora_table(self, lora_runs: list[str] | None, lora_files: list[str] | None, lora_weights: Any):
        """Rows (LoRA, weight) for the chosen runs and files, keeping weights already typed in."""
        return lora_table(lora_runs, lora_files, lora_weights)

    def size_for_base(self, base: str):
        """Choosing a base model sets the image size to its native size (1024 px for SDXL)."""
        choice = self.ctx.base_choice(base)
        if choice is None or not choice.resolution:
            return {}
        size = form.base_defaults(choice.resolution, choice.family)
        return {self.width: size["width"], self.height: size["height"]}

    def base_for_runs(self, lora_runs: list[str] | None, base: str | None, prompt: str | None = None):
        """Picking a run's LoRA selects the base model it was trained on (when listed), at its size, and
        (unless the user wrote a prompt of their own) a prompt for that base in the run's trigger word
        and caption template."""
        values = [m.value for m in self.ctx.base_models()]
        for name in lora_runs or []:
            try:
                cfg = self.ctx.existing_run(name).load_config()
            except Exception:  # noqa: BLE001 - a run without a readable config keeps the current base
                continue
            spec = cfg.pretrained_model_name_or_path
            for v in (spec, str(Path(spec).resolve()) if spec not in ("demo", "tiny") else spec):
                if v in values:
                    out = {self.base: v, **self.size_for_base(v)}
                    if prompt is not None and defaults.is_default_prompt(prompt):
                        out[self.prompt] = defaults.preview_prompt(self.ctx.base_choice(v), cfg.trigger_word,
                                                                   cfg.caption_template)
                    return out
        return {}
