"""Export tab: a run's final LoRA or one of its checkpoints, kohya or diffusers format, optionally at a
lower rank; what the file holds and the metadata in its header; where the file goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from ...train import export_run, export_steps, final_lora, run_embedding_file
from .. import form, runview
from ..context import AppContext
from ..errors import UIError, guarded

EXPORT_FORMATS = [("kohya / A1111 / ComfyUI (.safetensors)", "kohya"), ("diffusers (PEFT .safetensors)", "diffusers")]
WHERE_TO_PUT = ("**Where the file goes:** Automatic1111/Forge: `models/Lora/`, then write `<lora:{stem}:1>` in "
                "the prompt. ComfyUI: `models/loras/`, then add a *Load LoRA* node. diffusers: "
                "`pipe.load_lora_weights(\"{name}\")`.")
#: The choice that means the run's final LoRA; checkpoints are offered as ``step-N``.
FINAL = "final"


#: What each kind of base a LoRA was trained on means for where the file works.
FITS = {
    "demo": ("**Fits the bundled demo model only** (64 px, trained for this app's demo): use it in the Preview "
             "tab or with `sdlora generate`. A1111, ComfyUI and SD checkpoints cannot use it; train on an SD "
             "1.x/2.x or SDXL base (put it into the models folder) for a LoRA those tools load."),
    "sd1": "**Fits Stable Diffusion 1.x models** (SD 1.5 and models fine-tuned from it).",
    "sd2": "**Fits Stable Diffusion 2.x models** (the 2.x family it was trained on).",
    "sdxl": "**Fits SDXL models** (SDXL 1.0 base and models fine-tuned from it).",
}


def where_to_put(path: str | None, fmt: str = "kohya", kind: str | None = None) -> str:
    """The "where the file goes" line, with the exported file's name; ``kind`` ("demo", "sd1", "sd2",
    "sdxl") says which models the file fits."""
    name = Path(str(path)).name if path else "FILE_NAME.safetensors"
    fits = FITS.get(kind or "", "")
    if kind == "demo":
        return fits
    return (fits + " " if fits else "") + _where(name, fmt)


def _where(name: str, fmt: str) -> str:
    if fmt == "diffusers":
        return (f"**Where the file goes:** diffusers: `pipe.load_lora_weights(\"{name}\")`. For Automatic1111, "
                "Forge, ComfyUI or kohya, export the kohya format.")
    return WHERE_TO_PUT.format(stem=Path(name).stem, name=name)


def inspection(path: Path) -> tuple[str, dict[str, Any]]:
    """(readable report, the metadata stored in the file's header) of a LoRA file."""
    from ...lora.formats import format_inspection, inspect_file

    info = inspect_file(path)
    report = format_inspection(info).replace(str(path), Path(path).name)
    # JSON-friendly for gr.JSON: paths and tuples as strings and lists.
    return report, json.loads(json.dumps(info.get("metadata") or {}, default=str))


class ExportTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self) -> None:
        with gr.Tab("Export", id="export", elem_id="tab-export") as self.tab:
            with gr.Row():
                self.run = gr.Dropdown(choices=[], value=None, label="Run", elem_id="ex-run", allow_custom_value=True)
                self.fmt = gr.Radio(choices=EXPORT_FORMATS, value="kohya", label="Format", elem_id="ex-format")
            with gr.Row():
                self.step = gr.Dropdown(choices=[("final LoRA", FINAL)], value=FINAL,
                                        label="Final LoRA or a checkpoint", elem_id="ex-step", allow_custom_value=True)
                self.rank = form.FieldNumber(value=0, step=1, minimum=0, maximum=form.MAX_RANK,
                                             label="Rank (0 = as trained)",
                                             info="A lower rank is made by SVD of each module's update.", elem_id="ex-rank")
            self.export_btn = gr.Button("Export", variant="primary", elem_id="ex-export")
            self.file = gr.File(label="Download", interactive=False, elem_id="ex-file")
            self.embedding = gr.File(label="Embedding of the learned trigger tokens (runs with embedding_tokens): "
                                           "for A1111/Forge/ComfyUI's embeddings folder", interactive=False,
                                     elem_id="ex-embedding", height=80)
            self.where = gr.Markdown(where_to_put(None), elem_id="ex-where")
            self.summary = gr.Textbox(label="What the file holds", lines=8, max_lines=16, interactive=False,
                                      elem_id="ex-summary")
            self.meta = gr.JSON(label="Metadata embedded in the file (safetensors header)", elem_id="ex-meta",
                                open=True)

    # ---- events ---------------------------------------------------------------------------------
    def wire(self) -> None:
        self.run.input(self.export_info, inputs=self.run, outputs=[self.step, self.summary, self.meta, self.embedding],
                       api_name="export_info", show_progress="hidden").then(
            self.where_for, inputs=[self.run, self.file, self.fmt], outputs=self.where, api_visibility="private",
            show_progress="hidden")
        self.export_btn.click(self.export_lora, inputs=[self.run, self.fmt, self.step, self.rank],
                              outputs=[self.file, self.summary, self.meta], api_name="export").then(
            self.where_for, inputs=[self.run, self.file, self.fmt], outputs=self.where, api_visibility="private",
            show_progress="hidden")
        self.tab.select(self.refresh, inputs=self.run,
                        outputs=[self.run, self.step, self.summary, self.meta, self.embedding],
                        api_visibility="private", show_progress="hidden").then(
            self.where_for, inputs=[self.run, self.file, self.fmt], outputs=self.where, api_visibility="private",
            show_progress="hidden")

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        return [self.run]

    def on_load(self) -> dict:
        names = self._run_names()
        return {self.run: gr.update(choices=names, value=names[0] if names else None)}

    # ---- handlers -------------------------------------------------------------------------------
    def _run_names(self) -> list[str]:
        return [row[0] for row in runview.runs_table(self.ctx.runs_dir)]

    def _view(self, run_name: str | None) -> dict:
        """The run's export choices (final LoRA, checkpoints newest first) and what its final file holds."""
        choices = [("final LoRA", FINAL)]
        summary, meta, embedding = "", {}, None
        if run_name:
            run = self.ctx.existing_run(run_name)
            embedding = run_embedding_file(run)
            final = final_lora(run)
            choices = ([("final LoRA", FINAL)] if final else []) + [(f"step-{n}", f"step-{n}")
                                                                    for n in export_steps(run)]
            choices = choices or [("final LoRA", FINAL)]
            if final:
                summary, meta = inspection(final)
        return {self.step: gr.update(choices=choices, value=choices[0][1]), self.summary: summary, self.meta: meta,
                self.embedding: embedding}

    def base_kind(self, run_name: str | None) -> str | None:
        """"demo", "sd1", "sd2" or "sdxl": the kind of base a run was trained on (None when unknown)."""
        if not run_name:
            return None
        try:
            spec = self.ctx.existing_run(run_name).load_config().pretrained_model_name_or_path
        except Exception:  # noqa: BLE001 - a run without a readable config: nothing to say
            return None
        if spec == "demo":
            return "demo"
        for v in (spec, str(Path(spec).resolve())):
            choice = self.ctx.base_choice(v)
            if choice is not None:
                return choice.family
        return None

    def where_for(self, run: str | None, path: str | None, fmt: str = "kohya") -> str:
        """The "where the file goes" line for a run's file: which models it fits and where it goes."""
        return where_to_put(path, fmt, self.base_kind(run))

    @guarded
    def export_info(self, run: str):
        """Checkpoints of a run and the metadata its LoRA file carries."""
        return self._view(run)

    def refresh(self, current: str | None):
        """Opening the Export tab: the runs list, and the chosen run's checkpoints and metadata."""
        names = self._run_names()
        value = current if current in names else (names[0] if names else None)
        try:
            view = self._view(value)
        except Exception:  # noqa: BLE001 - a run that cannot be inspected just shows nothing
            view = {self.summary: "", self.meta: {}, self.embedding: None}
        return {self.run: gr.update(choices=names, value=value), **view}

    @guarded
    def export_lora(self, run: str, fmt: str = "kohya", checkpoint: str = FINAL, rank: float = 0):
        """Write the chosen format of a run's LoRA (or of one checkpoint, optionally at a lower rank)."""
        r = self.ctx.existing_run(run)
        if fmt not in ("kohya", "diffusers"):
            raise UIError(f"Unknown format {fmt!r}; choose kohya or diffusers.", title="Export")
        rank_i = form.parse_int(rank or 0, "Rank", 0, form.MAX_RANK)
        step = None
        if checkpoint and checkpoint != FINAL:
            steps = export_steps(r)
            if not checkpoint.startswith("step-") or not checkpoint[5:].isdigit() or int(checkpoint[5:]) not in steps:
                raise UIError(f"{checkpoint!r} is not a checkpoint of run {r.name}"
                              + (f"; it has {', '.join(f'step-{n}' for n in steps)}." if steps else "."),
                              title="Export")
            step = int(checkpoint[5:])
        else:
            final = final_lora(r)
            if final is None:
                raise UIError(f"Run '{r.name}' has no final LoRA yet; choose one of its checkpoints.", title="Export")
            if fmt == "kohya" and not rank_i:
                # The file training wrote is the kohya/A1111 file, with all of its training metadata.
                return self._exported(final)
        return self._exported(export_run(r.path, fmt=fmt, step=step, rank=rank_i or None))

    def _exported(self, path: Path) -> dict:
        summary, meta = inspection(path)
        return {self.file: str(path), self.summary: summary, self.meta: meta}
