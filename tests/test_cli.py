"""The sdlora command line, as a user runs it: tiny-model -> train -> inspect -> export -> generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.cli import build_parser, main
from sdlora.resources import CONFIGS_DIR



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model and a LoRA trained on it with `sdlora train` (in-process main)."""
    tmp = tmp_path_factory.mktemp("cli")
    assert main(["tiny-model", str(tmp / "model")]) == 0
    data = tmp / "data"
    data.mkdir()
    for i, c in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (64, 64), c).save(data / f"{i}.png")
    rc = main(["train", str(CONFIGS_DIR / "tiny.toml"), "--no-progress", "--set", f"train_data_dir={data}",
               "--set", f"pretrained_model_name_or_path={tmp / 'model'}", "--set", f"output_dir={tmp / 'runs'}",
               "--set", "max_train_steps=4", "--set", "output_name=cli-run"])
    assert rc == 0
    run = tmp / "runs" / "cli-run"
    assert (run / "cli-run.safetensors").is_file()
    return tmp, run


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = [a for a in parser._subparsers._group_actions[0].choices]
    assert {"train", "generate", "inspect", "export", "tiny-model", "ui", "demo-base", "variants"} <= set(commands)
    for cmd in ["train", "generate", "inspect", "export", "tiny-model", "variants"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_bad_arguments_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "sdlora.cli", "generate", "--prompt", "x", "--out", "a.png",
                        "--steps", "many"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--steps" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sdlora.cli", "inspect"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    exe = shutil.which("sdlora")
    if exe:  # the console script installed by pip
        r = subprocess.run([exe, "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and "sdlora" in r.stdout


def test_inspect_trained_file(trained, capsys):
    _, run = trained
    assert main(["inspect", str(run / "cli-run.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    text = json.dumps(info)
    assert "kohya" in text.lower()
    assert main(["inspect", str(run / "cli-run.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "conv" in out.lower() and "lora" in out.lower()


def test_export_both_formats_and_generate(trained, capsys):
    tmp, run = trained
    out_k = tmp / "exp" / "style.safetensors"
    out_d = tmp / "exp" / "diffusers"
    assert main(["export", str(run), "--format", "kohya", "--out", str(out_k)]) == 0
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out_d)]) == 0
    capsys.readouterr()
    assert out_k.is_file()
    base = tmp / "base.png"
    lora = tmp / "lora.png"
    zero = tmp / "zero.png"
    common = ["generate", "--base", str(tmp / "model"), "--prompt", "a red square", "--seed", "3", "--steps", "3",
              "--width", "64", "--height", "64"]
    assert main(common + ["--out", str(base)]) == 0
    assert main(common + ["--lora", f"{out_k}:1.0", "--scale", "1", "--out", str(lora)]) == 0
    assert main(common + ["--lora", str(out_k), "--scale", "0", "--out", str(zero)]) == 0
    a, b, z = (np.asarray(Image.open(p)) for p in (base, lora, zero))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, z)          # scale 0 = base
    assert not np.array_equal(a, b)      # the LoRA changes the picture
    grid = tmp / "grid.png"
    assert main(common + ["--lora", str(out_k), "--grid", "0,0.5,1", "--out", str(grid)]) == 0
    assert Image.open(grid).width >= 3 * 64


def test_user_errors_exit_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    bad = tmp_path / "bad.safetensors"
    bad.write_text("hello")
    assert main(["inspect", str(bad)]) == 1
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(["generate", "--base", "tiny", "--lora", str(tmp_path / "nope.safetensors"), "--prompt", "x",
                 "--out", str(tmp_path / "o.png")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
    assert main(["train", "--set", "network_preset=everything", "--set", f"train_data_dir={tmp_path}"]) == 1
    assert "network_preset" in capsys.readouterr().err


def test_variants_lists_lora(capsys):
    assert main(["variants"]) == 0
    assert "lora" in capsys.readouterr().out
