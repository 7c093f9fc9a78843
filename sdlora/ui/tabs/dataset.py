"""Dataset tab: upload images, captions and zips, edit captions, and the dataset check."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import gradio as gr

from .. import datasets as ds
from .. import defaults
from ..context import AppContext
from ..dataview import CHECK_FIELDS, dataset_view
from ..errors import UIError, esc, guarded

if TYPE_CHECKING:
    from .train import TrainTab

#: Most dataset problems listed in the message box (the check lists all of them).
MAX_PROBLEMS_SHOWN = 8


class DatasetTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # ---- layout ---------------------------------------------------------------------------------
    def layout(self) -> None:
        datasets = ds.list_datasets(self.ctx.runs_dir)
        styles = ds.list_style_sets()
        trigger = defaults.trigger_word(self.ctx.base_choice(self.ctx.base_dropdown()[1]))
        with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
            with gr.Row():
                self.name = gr.Textbox(value=datasets[0] if datasets else "my-style", label="Dataset name",
                                       info="Uploads are stored under this name (letters, digits, - _ .).",
                                       elem_id="ds-name", scale=2)
                self.existing = gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None,
                                            label="Open a dataset",
                                            info="Datasets uploaded here or made from a bundled style set.",
                                            elem_id="ds-existing", scale=2, allow_custom_value=True)
                self.trigger = gr.Textbox(value=trigger, label="Trigger word",
                                          info="The word that calls up the style in prompts, e.g. 'mystyle'.",
                                          elem_id="ds-trigger", scale=2)
            with gr.Row():
                with gr.Column(scale=3):
                    self.upload = gr.File(file_count="multiple", label="Upload images, .txt captions or a .zip",
                                          elem_id="ds-upload", height=140)
                with gr.Column(scale=2):
                    self.style = gr.Dropdown(choices=styles, value=styles[0] if styles else None,
                                             label="Or start from a bundled style set", elem_id="ds-style",
                                             interactive=bool(styles))
                    self.use_style = gr.Button("Use this style set", elem_id="ds-use-style", interactive=bool(styles))
            self.check = gr.HTML(value='<div class="sdl-check" id="sdl-check">No dataset checked yet.</div>',
                                 label="Dataset check", elem_id="ds-check")
            self.gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                                      object_fit="contain", allow_preview=False, elem_id="ds-gallery")
            with gr.Row():
                self.selected = gr.Textbox(label="Selected image", interactive=False, elem_id="ds-selected", scale=1)
                self.caption = gr.Textbox(label="Caption", lines=2, elem_id="ds-caption", scale=3,
                                          info="Saved as a .txt next to the image; the trigger word is added by "
                                               "the template.")
            with gr.Row():
                self.save_caption_btn = gr.Button("Save caption", elem_id="ds-save-caption")
                self.remove_btn = gr.Button("Remove image", variant="stop", elem_id="ds-remove")
                self.recheck = gr.Button("Check dataset", elem_id="ds-recheck")
                self.remove_bad = gr.Button("Remove unusable files", elem_id="ds-remove-unusable")
            self.items = gr.State([])  # names of the gallery's images, in gallery order

    # ---- events ---------------------------------------------------------------------------------
    def wire(self, train: TrainTab) -> None:
        self.train = train
        check_kw = {k: train.cfg[k] for k in CHECK_FIELDS if k in train.cfg}
        self.inputs_kw = dict(dataset_name=self.name, trigger_word=self.trigger, **check_kw)
        #: What every change of the dataset redraws: gallery, check, the dataset lists of both tabs.
        self.view_outputs = [self.gallery, self.check, self.existing, train.dataset, self.items]
        self.upload.upload(self.upload_dataset, inputs_kwargs=dict(self.inputs_kw, files=self.upload),
                           outputs=[*self.view_outputs, self.upload, self.name], api_name="upload_dataset")
        self.existing.input(_same, inputs=self.existing, outputs=self.name, api_visibility="private").then(
            self.open_dataset, inputs_kwargs=self.inputs_kw, outputs=self.view_outputs, api_name="open_dataset")
        self.use_style.click(self.use_style_set, inputs_kwargs=dict(self.inputs_kw, style=self.style),
                             outputs=[*self.view_outputs, self.name, self.trigger], api_name="use_style_set")
        self.recheck.click(self.check_dataset, inputs_kwargs=self.inputs_kw, outputs=self.check,
                           api_name="check_dataset")
        self.gallery.select(self.select_image, inputs=[self.name, self.items], outputs=[self.selected, self.caption],
                            api_visibility="private")
        self.save_caption_btn.click(self.save_caption,
                                    inputs_kwargs=dict(self.inputs_kw, image=self.selected, caption=self.caption),
                                    outputs=[self.gallery, self.check, self.items], api_name="save_caption")
        self.remove_btn.click(self.remove_image, inputs_kwargs=dict(self.inputs_kw, image=self.selected),
                              outputs=[*self.view_outputs, self.selected, self.caption], api_name="remove_image")
        self.remove_bad.click(self.remove_unusable, inputs_kwargs=self.inputs_kw, outputs=self.view_outputs,
                              api_name="remove_unusable")

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        return [self.existing, self.name]

    def on_load(self) -> dict:
        """A fresh page opens the newest dataset."""
        datasets = ds.list_datasets(self.ctx.runs_dir)
        first = datasets[0] if datasets else None
        return {self.existing: gr.update(choices=datasets, value=first), self.name: first if first else gr.skip()}

    # ---- handlers -------------------------------------------------------------------------------
    def _folder(self, name: str, *, create: bool = False) -> Path:
        return ds.dataset_dir(self.ctx.runs_dir, name, create=create)

    def _redraw(self, folder: Path, trigger_word: str, check: dict[str, Any], refused: Sequence[str] = ()) -> dict:
        """Gallery, check and both dataset lists for ``folder``; its problems also go to a message box."""
        view = dataset_view(folder, trigger_word, check, refused)
        if view.problems:
            shown = view.problems[:MAX_PROBLEMS_SHOWN]
            if len(view.problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"... and {len(view.problems) - MAX_PROBLEMS_SHOWN} more (see the dataset check)")
            gr.Warning("<br>".join(esc(p) for p in shown), title="Dataset check")
        names = ds.list_datasets(self.ctx.runs_dir)
        return {self.gallery: view.gallery, self.check: view.html,
                self.existing: gr.update(choices=names, value=folder.name),
                self.train.dataset: gr.update(choices=names, value=folder.name), self.items: view.names}

    @guarded
    def upload_dataset(self, dataset_name: str, files: list[str] | None = None, trigger_word: str = "", **check: Any):
        """Add uploaded images, captions or .zip files to a dataset and check it."""
        if not files:
            raise UIError("No files were uploaded. Choose images, .txt captions or a .zip.", title="Upload")
        new = not self._folder(dataset_name).exists()
        folder = self._folder(dataset_name, create=True)
        uploads = [(Path(str(f)).name, str(f)) for f in files]
        report = ds.add_files(folder, uploads, self.ctx.opts.max_upload_bytes)
        refused = [f"{name}: {reason}" for name, reason in report.rejected]
        if not report.added and refused:
            if new:
                shutil.rmtree(folder, ignore_errors=True)  # no empty dataset left behind
            raise UIError("Nothing was added. " + " ; ".join(refused), title="Upload")
        if report.added:
            renamed = (f" (the name {dataset_name.strip()!r} is stored as {folder.name!r}: letters, digits, "
                       "'-', '_' and '.' only)") if folder.name != (dataset_name or "").strip() else ""
            gr.Info(f"Added {len(report.added)} file(s) to dataset {folder.name}{renamed}.")
        return {**self._redraw(folder, trigger_word, check, refused), self.upload: None, self.name: folder.name}

    @guarded
    def open_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """Show a dataset's images, captions and check."""
        folder = self._folder(dataset_name)
        if not folder.is_dir():
            raise UIError(f"There is no dataset named {dataset_name!r} yet; upload images to create it.",
                          title="Dataset")
        return self._redraw(folder, trigger_word, check)

    @guarded
    def use_style_set(self, dataset_name: str = "", style: str = "", trigger_word: str = "", **check: Any):
        """Copy a bundled style set into a dataset of its own name (so its captions can be edited), with
        the trigger word it was made for unless the user wrote their own."""
        if not style:
            raise UIError("Choose a bundled style set first.", title="Style set")
        folder = self._folder(style, create=True)
        ds.copy_style_set(style, folder)
        images = len(ds.image_files(folder))
        trigger = (trigger_word or "").strip()
        if not trigger or trigger in _page_triggers():
            trigger = defaults.STYLE_TRIGGERS.get(style, trigger)
        gr.Info(f"Dataset {folder.name}: {images} images with captions from the bundled style set {style}. "
                f"Trigger word: {trigger or '(none)'}.")
        return {**self._redraw(folder, trigger, check), self.name: folder.name, self.trigger: trigger}

    @guarded
    def check_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any) -> str:
        """The dataset check alone: usable images, buckets and every unusable file with its reason."""
        return dataset_view(self._folder(dataset_name), trigger_word, check).html

    @guarded
    def select_image(self, dataset_name: str, names: list[str] | None, evt: gr.SelectData):
        """Clicking a gallery image opens its caption for editing."""
        names = names or []
        if evt.index is None or not 0 <= int(evt.index) < len(names):
            return {self.selected: "", self.caption: ""}
        name = names[int(evt.index)]
        return {self.selected: name, self.caption: ds.read_caption_text(self._folder(dataset_name) / name)}

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
        return {self.gallery: view.gallery, self.check: view.html, self.items: view.names}

    @guarded
    def remove_image(self, dataset_name: str, image: str | None = None, trigger_word: str = "", **check: Any):
        """Delete an image (and its caption) from the dataset."""
        if not image:
            raise UIError("Click an image in the gallery first.", title="Remove image")
        folder = self._folder(dataset_name)
        ds.remove_image(folder, image)
        return {**self._redraw(folder, trigger_word, check), self.selected: "", self.caption: ""}

    @guarded
    def remove_unusable(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """Delete the files the dataset check lists as unusable."""
        folder = self._folder(dataset_name)
        view = dataset_view(folder, trigger_word, check)
        for rel in view.skipped:
            ds.remove_image(folder, rel)
        gr.Info(f"Removed {len(view.skipped)} unusable file(s).")
        return self._redraw(folder, trigger_word, check)

    def show_dataset(self, dataset_name: str, trigger_word: str = "", **check: Any):
        """The gallery and check of the dataset a fresh page opens with (nothing when there is none)."""
        try:
            folder = self._folder(dataset_name)
        except UIError:
            return {}
        if not folder.is_dir():
            return {}
        view = dataset_view(folder, trigger_word, check)
        return {self.gallery: view.gallery, self.check: view.html, self.items: view.names}


def _page_triggers() -> set[str]:
    """Trigger words the page itself writes (of presets and bundled style sets), not the user's own."""
    out = set(defaults.STYLE_TRIGGERS.values())
    for files in defaults.PRESET_FILES.values():
        for name in files.values():
            out.add(str(defaults.file_options(name).get("trigger_word") or ""))
    return out - {""}


def _same(value: Any) -> Any:
    """Copies a value from one component to another (picking a dataset names it in the name box)."""
    return value
