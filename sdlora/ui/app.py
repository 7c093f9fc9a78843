"""The web app's page: a header and the Dataset, Train, Preview, Export and Tools tabs (``tabs/``).

Handlers only call the library's public API - :mod:`sdlora.train` (config, start/stop, run summaries,
the dataset check, export), :class:`sdlora.generate.Previewer`, :mod:`sdlora.lora.formats` inspection,
the models folder's list from :mod:`sdlora.models.loading` - and read run directories. Every handler
a script may call has an ``api_name``, so ``gradio_client`` drives the app exactly as the page does.
"""

from __future__ import annotations

import gradio as gr

from .context import AppContext
from .errors import guarded
from .server import ServerOptions
from .tabs import DatasetTab, ExportTab, PreviewTab, ToolsTab, TrainTab

HEADER = ("## sdlora: train a style LoRA\n"
          "<span class='sdl-hint'>1. Dataset: upload images &nbsp; 2. Train &nbsp; 3. Preview with the "
          "LoRA-scale slider &nbsp; 4. Export the file for A1111, ComfyUI, kohya or diffusers.</span>")


class App:
    """The tabs of one app (bound to one :class:`AppContext`) and the page that holds them."""

    def __init__(self, opts: ServerOptions):
        self.ctx = AppContext(opts)
        self.dataset = DatasetTab(self.ctx)
        self.train = TrainTab(self.ctx)
        self.preview = PreviewTab(self.ctx)
        self.export = ExportTab(self.ctx)
        self.tools = ToolsTab(self.ctx)
        self.tabs = (self.dataset, self.train, self.preview, self.export, self.tools)

    def build(self) -> gr.Blocks:
        # Generated previews and copies of served files go to gradio's cache: files older than a day
        # are removed every hour so a long-running app does not fill the disk.
        with gr.Blocks(title="sdlora: train style LoRAs", analytics_enabled=False,
                       delete_cache=(3600, 86400)) as demo:
            gr.Markdown(HEADER)
            with gr.Tabs(elem_id="sdl-tabs") as self.tabs_block:
                for tab in self.tabs:
                    tab.layout()
            for component in self.train.page_components:
                component.render()
            # Tabs update each other's lists, so events are connected once every tab exists.
            self.dataset.wire(self.train)
            self.train.wire(self.dataset, self.preview)
            self.preview.wire()
            self.export.wire()
            self.tools.wire()

            load_outputs = [c for tab in self.tabs for c in tab.load_outputs] + [self.tabs_block]
            loaded = demo.load(self.on_load, inputs=[self.train.saved], outputs=load_outputs,
                               api_visibility="private")
            self.train.redraw_live(loaded)
            loaded.then(guarded(self.dataset.show_dataset), inputs_kwargs=self.dataset.inputs_kw,
                        outputs=[self.dataset.gallery, self.dataset.check, self.dataset.items],
                        api_visibility="private", show_progress="hidden")
        return demo

    def on_load(self, saved_form: dict | None = None) -> dict:
        """A fresh page: every tab fills its lists (models folder, datasets, runs), the Train form comes
        back as the browser kept it (``saved_form``); while a training runs, the page opens on the Train tab."""
        from ..train import active_run

        out: dict = {}
        for tab in self.tabs:
            out.update(tab.on_load(saved_form) if tab is self.train else tab.on_load())
        if active_run(self.ctx.runs_dir) is not None:
            out[self.tabs_block] = gr.Tabs(selected="train")  # a training runs: open on its progress
        return out


def build_app(opts: ServerOptions) -> gr.Blocks:
    """The app's ``gr.Blocks`` for these server options (not launched)."""
    return App(opts).build()
