"""A wheel works outside the checkout: the bundled demo model and configs ship inside the package.

Builds a wheel from the package's files, installs it into a fresh virtual environment in a temporary
folder, and from there (cwd outside the checkout, no PYTHONPATH) generates with the default base model and
trains a few steps of the bundled ``demo_style`` config. The new environment reuses this environment's
installed dependencies through a ``.pth`` line placed after its own site-packages, so only sdlora is
installed (``--no-deps``) and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a 26 MB wheel, trains, generates: about a minute

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh environment, bin folder, environment variables, a work folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # The files an sdist carries (pyproject, README, the package), without caches or build leftovers.
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "sdlora", src / "sdlora", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src], tmp, env)
    (wheel,) = wheels.glob("sdlora-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp, env)
    py = venv / "bin" / "python"
    own_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    parent_sites = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                  *site.getsitepackages()])
    (own_site / "zz_parent_env.pth").write_text("\n".join(parent_sites) + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    work = tmp / "work"
    work.mkdir()
    return py, venv / "bin", env, work


def test_wheel_carries_the_bundled_data(installed):
    py, _, env, work = installed
    code = ("import json, sdlora, sdlora.resources as r; print(json.dumps({'file': sdlora.__file__, "
            "'model': (r.DEMO_MODEL / 'model_index.json').is_file(), 'styles': r.style_names(), "
            "'configs': r.config_names()}))")
    info = json.loads(_run([py, "-c", code], work, env).stdout)
    assert Path(info["file"]).resolve().is_relative_to(py.parent.parent.resolve()), info["file"]
    assert info["model"] is True
    assert info["styles"] == ["outline", "pastel", "stripes"]
    assert {"demo_style", "tiny", "style_sd15", "dreambooth_sd15"} <= set(info["configs"])


def test_generate_and_train_outside_the_checkout(installed):
    py, bin_dir, env, work = installed
    sdlora = bin_dir / "sdlora"
    out = work / "base.png"
    _run([sdlora, "generate", "--prompt", "a red circle on a white background", "--steps", "4", "--out", out], work, env)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)  # the demo model's resolution: the default base was used

    _run([sdlora, "train", "demo_style", "--no-progress", "--set", "max_train_steps=3",
          "--set", "sample_every_n_steps=0", "--set", "sample_prompts=[]", "--set", "save_every_n_steps=0",
          "--set", f"output_dir={work / 'runs'}"], work, env)
    run = work / "runs" / "demo-outline"
    assert (run / "demo-outline.safetensors").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done"
