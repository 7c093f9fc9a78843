"""Where the bundled data lies: the demo model, its style sets and the example training configs.

They are package data (``sdlora/sample_data/``, ``sdlora/configs/``), so a checkout, an editable
install and a wheel install find them the same way. Every user of these paths asks this module.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "sample_data"
DEMO_MODEL = SAMPLE_DATA / "demo-model"
"""The bundled demo base model (a diffusers folder); the base model called ``demo``."""
STYLES_DIR = SAMPLE_DATA / "styles"
"""The bundled style sets, one folder of images and captions each."""
CONFIGS_DIR = PACKAGE_DIR / "configs"
"""The example training configs (``*.toml``)."""

STYLE_PREFIX = "style:"
"""``train_data_dir = "style:outline"`` names the bundled style set ``outline``."""


def style_names() -> list[str]:
    """Names of the bundled style sets."""
    if not STYLES_DIR.is_dir():
        return []
    return sorted(p.name for p in STYLES_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


def style_dir(name: str) -> Path:
    """The folder of the bundled style set ``name``; :class:`FileNotFoundError` names the sets there are."""
    path = STYLES_DIR / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_dir():
        raise FileNotFoundError(f"no bundled style set {name!r}; bundled sets: {', '.join(style_names()) or 'none'}")
    return path


def config_names() -> list[str]:
    """Names of the bundled training configs (file names without ``.toml``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def config_path(name: str) -> Path:
    """The bundled training config ``name`` (``demo_style``, ``demo_style.toml`` or ``configs/demo_style.toml``)."""
    stem = Path(name).name
    if stem.endswith(".toml"):
        stem = stem[: -len(".toml")]
    path = CONFIGS_DIR / f"{stem}.toml"
    if not stem or not path.is_file():
        raise FileNotFoundError(f"no bundled config {name!r}; bundled configs: {', '.join(config_names()) or 'none'}")
    return path


def resolve_config(arg: str | Path) -> Path:
    """A config file the user named: an existing file as given, else a bundled config of that name.

    So ``sdlora train configs/demo_style.toml`` works in a checkout and in any other folder, and
    ``sdlora train demo_style`` works everywhere. A name that is neither raises :class:`FileNotFoundError`.
    """
    path = Path(arg)
    if path.is_file():
        return path
    parent = path.parent.as_posix()
    if parent in (".", "configs", "sdlora/configs"):
        try:
            return config_path(path.name)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"config file not found: {arg} (bundled configs, usable by name: "
                            f"{', '.join(config_names()) or 'none'})")


def resolve_data_dir(value: str) -> str:
    """A ``train_data_dir`` value with ``style:NAME`` replaced by that bundled style set's folder.

    Other values are returned unchanged (a folder path; it is checked where it is used).
    """
    if isinstance(value, str) and value.startswith(STYLE_PREFIX):
        return str(style_dir(value[len(STYLE_PREFIX):].strip()))
    return value
