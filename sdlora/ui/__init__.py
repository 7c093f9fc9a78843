"""The Gradio web app: a thin layer of layout and callbacks over sdlora's public API.

``python app.py`` or ``sdlora ui`` start it (:func:`sdlora.ui.server.main`). The page only reads
run directories and sends start/stop/resume to them; training itself runs as a separate process,
so a page refresh, a second tab or an app restart all see the same live run.
"""
