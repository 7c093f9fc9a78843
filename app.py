"""Start the sdlora web app: ``python app.py [--host H] [--port P] [--auth user:pw|FILE] [--runs-dir D]
[--models-dir D] [--max-upload-mb N] [--share]``. Same as ``sdlora ui``; see ``python app.py --help``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    # Runs from a checkout without installing: the package and the training processes the app
    # starts (``python -m sdlora.cli``) both find sdlora here.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    os.environ.setdefault("SDLORA_UI_PROG", "python app.py")

    from sdlora.ui.server import main

    sys.exit(main(sys.argv[1:]))
