"""Look of the app: a gradio theme with system fonts (nothing is fetched from font servers) and a little CSS."""

from __future__ import annotations

import gradio as gr

_SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]


def theme() -> gr.themes.Base:
    """The default gradio theme with local fonts only (plain strings are system fonts, never downloads)."""
    return gr.themes.Default(primary_hue="indigo", secondary_hue="slate", font=_SANS, font_mono=_MONO)


CSS = """
/* A handler's error is a message box (toast); gradio would also lay an "Error" badge over every output
   of the event, which hides the component and catches clicks until its x is pressed. */
[data-testid="status-tracker"]:has(> span.error) { display: none !important; }
.sdl-progress { display: flex; flex-direction: column; gap: 6px; padding: 10px 12px;
  border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg); background: var(--block-background-fill); }
.sdl-progress .sdl-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.dark .sdl-progress .sdl-bar { background: var(--neutral-700); }
.sdl-progress .sdl-fill { height: 100%; background: var(--color-accent); transition: width 0.4s ease; }
.sdl-progress .sdl-fill.done { background: #16a34a; }
.sdl-progress .sdl-fill.failed { background: #dc2626; }
.sdl-progress .sdl-fill.stopped { background: #d97706; }
.sdl-progress .sdl-line { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: var(--text-md); }
.sdl-progress .sdl-state { font-weight: 600; }
.sdl-progress .sdl-msg { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
.sdl-progress[data-state="failed"] .sdl-msg { color: #b91c1c; font-size: var(--text-md); }
.dark .sdl-progress[data-state="failed"] .sdl-msg { color: #f87171; }
.sdl-check { font-size: var(--text-md); }
.sdl-check .bad { color: #b91c1c; }
.dark .sdl-check .bad { color: #f87171; }
.sdl-check ul { margin: 4px 0 4px 18px; }
.sdl-hint { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
#sdl-log textarea, #ex-summary textarea { font-family: var(--font-mono); font-size: 12px; }
/* Small previews (64 px models) are shown enlarged, pixel for pixel. */
.sdl-preview img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }
"""

HEAD = ""
