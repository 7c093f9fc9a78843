"""Tools tab: what people do with LoRAs after training, over :mod:`sdlora.tools` (the same functions as
``sdlora merge-into | combine | resize | extract``): bake LoRAs into a base model, combine several
into one, change a LoRA's rank, extract a LoRA from two models. Each writes one file into the runs
folder's ``_tools/`` (named by the user, sanitised) and offers it for download with the tool's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ...paths import safe_name
from .. import form
from ..context import AppContext, lora_table
from ..errors import UIError, guarded, without_server_paths

#: Resize choices: a fixed rank, or kohya's per-layer rules on the singular values.
RESIZE_CHOICES = [("fixed rank", "fixed"), ("keep a share of the Frobenius norm (sv_fro)", "sv_fro"),
                  ("keep singular values above largest / T (sv_ratio)", "sv_ratio"),
                  ("keep a share of the sum of singular values (sv_cumulative)", "sv_cumulative")]
MERGE_DTYPES = [("fp16 (half the size, what A1111 and ComfyUI use)", "fp16"), ("bf16", "bf16"), ("fp32", "fp32")]
TOOLS_FOLDER = "_tools"
MAX_RANK = 1024


class ToolsTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self) -> None:
        base_choices, base_value = self.ctx.base_dropdown()
        with gr.Tab("Tools", id="tools", elem_id="tab-tools") as self.tab:
            gr.Markdown("<span class='sdl-hint'>After training: bake LoRAs into a base model, combine several "
                        "into one, change a LoRA's rank, or extract a LoRA from two models. The same as "
                        "<code>sdlora merge-into | combine | resize | extract</code> on the command line "
                        "(docs/tools.md).</span>")
            with gr.Row():
                with gr.Column(scale=3, min_width=300):
                    self.runs = gr.Dropdown(choices=[], value=[], multiselect=True, label="LoRAs of runs",
                                            elem_id="tl-runs", allow_custom_value=True)
                    self.files = gr.File(file_count="multiple", label="Or upload LoRA .safetensors files",
                                         elem_id="tl-files", height=120)
                with gr.Column(scale=2, min_width=300):
                    self.weights = gr.Dataframe(headers=["LoRA", "weight"], value=[], type="array",
                                                datatype=["str", "number"], static_columns=[0],
                                                label="Weight of each LoRA (merge and combine)",
                                                elem_id="tl-weights", interactive=True)
                    self.out_name = gr.Textbox(value="", label="Output name",
                                               info="File name of the result (letters, digits, - and _); "
                                                    "empty: a name from the inputs.", elem_id="tl-out-name")
            self.base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                    info="The model to merge into; it also names the layers of LoRAs made for "
                                         "small models such as the demo model.",
                                    elem_id="tl-base", allow_custom_value=True)
            with gr.Accordion("Merge into a base model", open=True, elem_id="tl-merge-box"):
                gr.Markdown("<span class='sdl-hint'>Bakes the LoRAs, at their weights, into the base model's "
                            "weights: one checkpoint file in the A1111/ComfyUI layout, no LoRA needed to use it."
                            "</span>")
                with gr.Row():
                    self.merge_dtype = gr.Dropdown(choices=MERGE_DTYPES, value="fp16", label="Precision",
                                                   elem_id="tl-merge-dtype", min_width=220)
                    self.merge_btn = gr.Button("Merge into the base model", variant="primary", elem_id="tl-merge")
            with gr.Accordion("Combine LoRAs into one", open=False, elem_id="tl-combine-box"):
                gr.Markdown("<span class='sdl-hint'>Rank 0: exact (the ranks add up). A rank: the best "
                            "approximation of the weighted sum at that rank, with its error per layer.</span>")
                with gr.Row():
                    self.combine_rank = form.FieldNumber(value=0, step=1, minimum=0, maximum=MAX_RANK,
                                                         label="Rank (0 = exact)", elem_id="tl-combine-rank")
                    self.combine_btn = gr.Button("Combine", variant="primary", elem_id="tl-combine")
            with gr.Accordion("Resize a LoRA", open=False, elem_id="tl-resize-box"):
                gr.Markdown("<span class='sdl-hint'>One LoRA (the first chosen) at a lower rank, the same for "
                            "every layer or per layer from its singular values (kohya's resize_lora choices; "
                            "the rank is then the largest allowed).</span>")
                with gr.Row():
                    self.resize_method = gr.Dropdown(choices=RESIZE_CHOICES, value="fixed", label="How",
                                                     elem_id="tl-resize-method", min_width=260)
                    self.resize_rank = form.FieldNumber(value=8, step=1, minimum=1, maximum=MAX_RANK,
                                                        label="Rank (largest rank for per-layer choices)",
                                                        elem_id="tl-resize-rank")
                    self.resize_value = form.FieldNumber(value=0.9, minimum=0.0, maximum=1000.0,
                                                         label="T (share 0 to 1; sv_ratio: a ratio above 1)",
                                                         elem_id="tl-resize-value")
                self.resize_btn = gr.Button("Resize", variant="primary", elem_id="tl-resize")
            with gr.Accordion("Extract a LoRA from two models", open=False, elem_id="tl-extract-box"):
                gr.Markdown("<span class='sdl-hint'>A LoRA of the difference between a fine-tuned model and "
                            "its base (models of the app's models folder, same family).</span>")
                with gr.Row():
                    self.extract_base = gr.Dropdown(choices=base_choices, value=base_value, label="Base model",
                                                    elem_id="tl-extract-base", allow_custom_value=True,
                                                    min_width=260)
                    self.extract_tuned = gr.Dropdown(choices=base_choices, value=None, label="Fine-tuned model",
                                                     elem_id="tl-extract-tuned", allow_custom_value=True,
                                                     min_width=260)
                with gr.Row():
                    self.extract_rank = form.FieldNumber(value=32, step=1, minimum=1, maximum=MAX_RANK,
                                                         label="Rank", elem_id="tl-extract-rank")
                    self.extract_conv_rank = form.FieldNumber(value=0, step=1, minimum=0, maximum=MAX_RANK,
                                                              label="Conv rank (0 = Linear layers only)",
                                                              elem_id="tl-extract-conv-rank")
                self.extract_btn = gr.Button("Extract", variant="primary", elem_id="tl-extract")
            self.result = gr.File(label="Result", interactive=False, elem_id="tl-result", height=100)
            self.summary = gr.Textbox(label="Report", lines=4, max_lines=12, interactive=False,
                                      elem_id="tl-summary")
            self.table = gr.Dataframe(value=[], headers=["layer", "result"], label="Per layer", interactive=False,
                                      wrap=True, elem_id="tl-table", max_height=360)

    # ---- events ---------------------------------------------------------------------------------
    def wire(self) -> None:
        outputs = [self.result, self.summary, self.table]
        sources = dict(lora_runs=self.runs, lora_files=self.files, lora_weights=self.weights,
                       out_name=self.out_name, base=self.base)
        for c in (self.runs, self.files):
            c.change(lora_table, inputs=[self.runs, self.files, self.weights], outputs=self.weights,
                     api_visibility="private", show_progress="hidden")
        self.merge_btn.click(self.merge, inputs_kwargs=dict(sources, dtype=self.merge_dtype),
                             outputs=outputs, api_name="merge_into", concurrency_id="tools")
        self.combine_btn.click(self.combine, inputs_kwargs=dict(sources, rank=self.combine_rank), outputs=outputs,
                               api_name="combine", concurrency_id="tools")
        self.resize_btn.click(self.resize, inputs_kwargs=dict(sources, method=self.resize_method,
                                                              rank=self.resize_rank, value=self.resize_value),
                              outputs=outputs, api_name="resize", concurrency_id="tools")
        self.extract_btn.click(self.extract, inputs_kwargs=dict(base=self.extract_base, tuned=self.extract_tuned,
                                                                rank=self.extract_rank,
                                                                conv_rank=self.extract_conv_rank,
                                                                out_name=self.out_name),
                               outputs=outputs, api_name="extract", concurrency_id="tools")
        self.tab.select(self.refresh_runs, inputs=None, outputs=self.runs, api_visibility="private",
                        show_progress="hidden")

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        return [self.runs, self.base, self.extract_base, self.extract_tuned]

    def on_load(self) -> dict:
        base_choices, base_value = self.ctx.base_dropdown()
        return {self.runs: self.refresh_runs(), self.base: gr.update(choices=base_choices, value=base_value),
                self.extract_base: gr.update(choices=base_choices, value=base_value),
                self.extract_tuned: gr.update(choices=base_choices)}

    # ---- handlers -------------------------------------------------------------------------------
    def refresh_runs(self):
        """The runs with a finished LoRA."""
        return gr.update(choices=self.ctx.lora_run_names())

    def _out(self, name: str | None, default: str, suffix: str = ".safetensors") -> Path:
        """Where a result goes: ``<runs>/_tools/<name>.safetensors``, the name sanitised."""
        stem = safe_name(Path(str(name or "").strip()).stem, default="") or safe_name(default, default="result")
        folder = self.ctx.runs_dir / TOOLS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{stem}{suffix}"

    def _loras(self, lora_runs, lora_files, lora_weights, least: int = 1) -> list[tuple[str, float]]:
        loras = self.ctx.weighted_loras(lora_runs, lora_files, lora_weights)
        if len(loras) < least:
            raise UIError(f"Choose at least {least} LoRA{'s' if least > 1 else ''} (runs or uploaded files) above.",
                          title="LoRA")
        return loras

    def _outputs(self, report) -> dict:
        """The result file, the report's summary (no server paths) and its per-layer table."""
        rows = [[_cell(v) for v in row] for row in report.rows]
        return {self.result: str(report.out) if report.out else None,
                self.summary: without_server_paths(report.summary),
                self.table: gr.update(value=rows, headers=report.columns)}

    def _naming_base(self, base: str | None) -> str | None:
        """The chosen base model, for files whose layers only it names (loaded only when needed)."""
        return self.ctx.check_base(base) if base else None

    @guarded
    def merge(self, lora_runs: list[str] | None = None, lora_files: list[str] | None = None, lora_weights: Any = None,
              out_name: str = "", base: str | None = None, dtype: str = "fp16", progress=gr.Progress()):
        """Bake the chosen LoRAs at their weights into the base model: one A1111/ComfyUI checkpoint file."""
        from ...tools import merge_into

        loras = self._loras(lora_runs, lora_files, lora_weights)
        base = self.ctx.check_base(base)
        if dtype not in dict((v, k) for k, v in MERGE_DTYPES):
            raise UIError(f"Precision {dtype!r}: choose one of fp16, bf16, fp32.", title="Precision")
        out = self._out(out_name, "merged-" + "-".join(Path(p).stem for p, _ in loras)[:80])
        report = merge_into(base, loras, out, format="single", dtype=dtype, progress=_progress(progress))
        return self._outputs(report)

    @guarded
    def combine(self, lora_runs: list[str] | None = None, lora_files: list[str] | None = None,
                lora_weights: Any = None, out_name: str = "", rank: float | None = 0, base: str | None = None,
                progress=gr.Progress()):
        """Combine the chosen LoRAs at their weights into one file (exact, or at a rank by SVD)."""
        from ...tools import combine_loras

        loras = self._loras(lora_runs, lora_files, lora_weights, least=2)
        r = form.parse_int(rank, "Rank", 0, MAX_RANK)
        out = self._out(out_name, "combined-" + "-".join(Path(p).stem for p, _ in loras)[:80])
        report = combine_loras(loras, out, rank=r or None, base=self._naming_base(base), progress=_progress(progress))
        return self._outputs(report)

    @guarded
    def resize(self, lora_runs: list[str] | None = None, lora_files: list[str] | None = None,
               lora_weights: Any = None, out_name: str = "", method: str = "fixed", rank: float | None = 8,
               value: float | None = 0.9, base: str | None = None, progress=gr.Progress()):
        """The first chosen LoRA at a lower rank (fixed, or per layer from its singular values)."""
        from ...tools import resize_lora

        path, _ = self._loras(lora_runs, lora_files, lora_weights)[0]
        r = form.parse_int(rank, "Rank", 1, MAX_RANK)
        if method not in dict((v, k) for k, v in RESIZE_CHOICES):
            raise UIError(f"Resize {method!r}: choose one of the listed ways.", title="Resize")
        dynamic = None if method == "fixed" else (method, form.parse_float(value, "T", 0.0, 1000.0))
        out = self._out(out_name, f"{Path(path).stem}-{'r' + str(r) if dynamic is None else method}")
        report = resize_lora(path, out, rank=r, dynamic=dynamic, base=self._naming_base(base),
                             progress=_progress(progress))
        return self._outputs(report)

    @guarded
    def extract(self, base: str | None = None, tuned: str | None = None, rank: float | None = 32,
                conv_rank: float | None = 0, out_name: str = "", progress=gr.Progress()):
        """A LoRA of the difference between a fine-tuned model and its base."""
        from ...tools import extract_lora

        base = self.ctx.check_base(base)
        if not tuned:
            raise UIError("Choose the fine-tuned model to extract from.", title="Fine-tuned model")
        tuned = self.ctx.check_base(tuned)
        if tuned == base:
            raise UIError("The base and the fine-tuned model are the same model; choose two different ones.",
                          title="Fine-tuned model")
        r = form.parse_int(rank, "Rank", 1, MAX_RANK)
        rc = form.parse_int(conv_rank, "Conv rank", 0, MAX_RANK)
        out = self._out(out_name, f"extracted-{Path(tuned).stem}-r{r}")
        report = extract_lora(base, tuned, out, rank=r, conv_rank=rc, progress=_progress(progress))
        return self._outputs(report)


def _progress(bar: Any):
    """A tool's ``progress(done, total, label)`` drawn by gradio's progress bar."""

    def update(done: int, total: int, label: str) -> None:
        if bar is not None and total:
            bar((done, total), desc=label)

    return update


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value
