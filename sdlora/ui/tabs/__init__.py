"""The app's tabs, one module each: the tab's layout and its handlers together.

Each tab is a class built on the shared :class:`~sdlora.ui.context.AppContext`: ``layout()`` creates
its components (inside ``gr.Blocks``), ``wire(...)`` connects its events once every tab exists
(tabs update each other's lists), and ``on_load()`` fills its lists for a fresh page. Handlers
return updates keyed by component, so an output list never has to line up with a tuple.
"""

from .dataset import DatasetTab
from .export import ExportTab
from .preview import PreviewTab
from .tools import ToolsTab
from .train import TrainTab

__all__ = ["DatasetTab", "ExportTab", "PreviewTab", "ToolsTab", "TrainTab"]
