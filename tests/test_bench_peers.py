"""benchmarks/peers.py: a whole `sdlora train` process timed the way the peer trainers are."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402

from helpers import make_images  # noqa: E402


def test_sdlora_process_is_timed_step_to_step(tmp_path, tiny_model_dir):
    folder = tmp_path / "peers"
    (folder / "data").mkdir(parents=True)
    (folder / "sd15-random").symlink_to(tiny_model_dir)
    make_images(folder / "data" / "kohya" / "1_sks", n=4, size=64)
    assert "sd-scripts/train_network.py" in peers.check_peers(folder, "sd15", ["kohya"])
    assert peers.check_peers(folder, "sd15", []) == []

    job = peers.Job("sd15", 64, 4, preset="attn-mlp", rank=4)
    r = peers.run("sdlora", folder, job, name="t")
    assert r.error is None and r.rc == 0
    assert [s["step"] for s in r.steps] == [1, 2, 3, 4]
    assert all(s["wall"] > 0 for s in r.steps)
    assert 0 < r.start_s < r.steps_end_s <= r.wall_s
    assert r.median_step() == sorted(s["wall"] for s in r.steps[1:])[1]
    assert r.maxrss_gb and 0.1 < r.maxrss_gb < 20
    assert (folder / "runs" / "t-out" / "t" / "t.safetensors").is_file()
    assert not list((folder / "runs" / "t-out" / "t").glob("samples/*.png"))  # sample_at_end=false
    text = peers.describe(r)
    assert text.startswith("sdlora attn-mlp 64 px no: done; step ") and "job " in text


def test_a_failing_process_reports_its_output(tmp_path):
    folder = tmp_path / "peers"
    (folder / "data" / "kohya").mkdir(parents=True)
    r = peers.run("sdlora", folder, peers.Job("sd15", 64, 2), name="bad")
    assert r.rc != 0 and r.error.startswith(f"exit {r.rc}:") and "train_data_dir" in r.error
    assert r.steps == []
