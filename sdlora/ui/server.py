"""Command line of the web app: ``python app.py [options]`` or ``sdlora ui [options]``.

The server listens on 127.0.0.1:7860 unless told otherwise, never opens a public share link unless
``--share`` is given, and lets gradio serve files only from the runs and models folders (plus the
files users upload, which gradio keeps in its own upload folder).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 200.0


class OptionError(ValueError):
    """A server option that cannot be used; the message names the option."""


@dataclass
class ServerOptions:
    """Everything ``main`` needs to build and launch the app."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    runs_dir: Path = field(default_factory=lambda: Path("runs"))
    models_dir: Path = field(default_factory=lambda: Path("models"))
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    auth: list[tuple[str, str]] | None = None
    share: bool = False
    quiet: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def allowed_paths(self) -> list[str]:
        """The only folders gradio may serve files from (besides its own upload/cache folders)."""
        return [str(self.runs_dir), str(self.models_dir)]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str = "sdlora ui") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Start the sdlora web app: dataset, training, preview and export in the browser.")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 makes the app reachable from other machines)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--auth", metavar="USER:PASSWORD|FILE",
                   help="require a login: 'user:password', or a file with one 'user:password' a line")
    p.add_argument("--runs-dir", default="runs", help="folder of run directories and uploaded datasets (default ./runs)")
    p.add_argument("--models-dir", default="models",
                   help="folder whose model folders and .safetensors/.ckpt files are listed as base models (default ./models)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest file a user may upload, in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    p.add_argument("--quiet", action="store_true", help="do not print the startup banner")
    return p


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """``user:password`` or the path of a file with one ``user:password`` a line (``#`` comments allowed)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise OptionError(f"--auth: {path} holds no 'user:password' line")
        source = str(path)
    else:
        if ":" not in value:
            raise OptionError(f"--auth: {value!r} is neither 'user:password' nor an existing file")
        lines = [value]
        source = "the command line"
    pairs = []
    for n, line in enumerate(lines, 1):
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise OptionError(f"--auth: line {n} of {source} is not 'user:password'")
        pairs.append((user.strip(), password))
    return pairs


def parse_options(argv: Sequence[str] | None = None, prog: str = "sdlora ui") -> ServerOptions:
    """Parse the command line (exits with code 2 and one line on a bad option)."""
    parser = build_parser(prog)
    a = parser.parse_args(list(argv) if argv is not None else None)
    try:
        auth = parse_auth(a.auth)
    except OptionError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    if not 0 <= a.port <= 65535:
        parser.exit(2, f"{prog}: error: --port {a.port} is not a port number (0-65535)\n")
    if not a.max_upload_mb > 0:
        parser.exit(2, f"{prog}: error: --max-upload-mb must be > 0\n")
    runs_dir = Path(a.runs_dir).expanduser().resolve()
    models_dir = Path(a.models_dir).expanduser().resolve()
    for opt, d in (("--runs-dir", runs_dir), ("--models-dir", models_dir)):
        if d.exists() and not d.is_dir():
            parser.exit(2, f"{prog}: error: {opt} {d} is a file, not a folder\n")
    return ServerOptions(host=a.host, port=a.port, runs_dir=runs_dir, models_dir=models_dir,
                         max_upload_mb=a.max_upload_mb, auth=auth, share=a.share, quiet=a.quiet)


def launch(opts: ServerOptions, *, block: bool = True):
    """Build the app and serve it; with ``block=False`` returns the running ``gr.Blocks``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    opts.runs_dir.mkdir(parents=True, exist_ok=True)
    opts.models_dir.mkdir(parents=True, exist_ok=True)

    from .app import build_app
    from .theme import CSS, HEAD, theme

    demo = build_app(opts)
    demo.queue(default_concurrency_limit=1)
    if not opts.quiet:
        print(f"sdlora ui: runs in {opts.runs_dir}, base models from {opts.models_dir}", flush=True)
    demo.launch(
        server_name=opts.host,
        server_port=opts.port,
        auth=opts.auth,
        share=opts.share,
        allowed_paths=opts.allowed_paths(),
        max_file_size=opts.max_upload_bytes,
        show_error=False,
        quiet=opts.quiet,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        prevent_thread_lock=not block,
        footer_links=["api", "settings"],
        theme=theme(),
        css=CSS,
        head=HEAD,
    )
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sdlora ui`` and ``python app.py``; returns the exit code."""
    opts = parse_options(argv, prog=os.environ.get("SDLORA_UI_PROG", "sdlora ui"))
    try:
        launch(opts)
    except OSError as e:
        print(f"sdlora ui: error: cannot listen on {opts.host}:{opts.port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
