"""The demo-base training command: runs end to end at a tiny size, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdlora.demo import train_base

TINY = ["--set", "vae_steps=3", "--set", "vae_batch=4", "--set", "decoder_steps=2", "--set", "num_cached=24", "--set", "unet_steps=4",
        "--set", "unet_batch=4", "--set", "warmup_steps=1", "--set", "checkpoint_every=2",
        "--set", "threads=1"]


def _final_weights(work: Path) -> dict[str, torch.Tensor]:
    state = torch.load(work / "unet_final.pt", map_location="cpu", weights_only=True)
    vae = torch.load(work / "vae_final.pt", map_location="cpu", weights_only=True)
    out = {"unet." + k: v for k, v in state["unet"].items()}
    out.update({"te." + k: v for k, v in state["text_encoder"].items()})
    out.update({"vae." + k: v for k, v in vae["model"].items()})
    return out


@pytest.mark.slow  # 64 s measured on a busy 2-core machine
def test_training_in_pieces_equals_training_in_one_go(tmp_path):
    one = tmp_path / "one.work"
    for stage in ("vae", "latents", "unet"):
        assert train_base.main(["--out", str(tmp_path / "one"), "--work-dir", str(one), "--stage", stage, *TINY]) == 0

    pieces = tmp_path / "pieces.work"
    calls = 0
    while not (pieces / "unet_final.pt").exists():
        calls += 1
        assert calls < 20, "training in pieces does not finish"
        # --max-minutes 0: every call stops right after its first step (with a checkpoint)
        train_base.main(["--out", str(tmp_path / "pieces"), "--work-dir", str(pieces), "--stage", "train",
                         "--max-minutes", "0", *TINY])
    assert calls >= 3  # it really ran in pieces

    a, b = _final_weights(one), _final_weights(pieces)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (pieces / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "latents" for r in log)


@pytest.mark.slow  # 58 s measured on a busy 2-core machine
def test_export_writes_a_loadable_model_with_prefixed_text_encoder(tmp_path):
    out = tmp_path / "model"
    args = ["--out", str(out), "--work-dir", str(tmp_path / "work"), *TINY,
            "--set", "eval_per_combo=1", "--set", "eval_steps=2"]
    assert train_base.main(args) == 0
    for name in ("model_index.json", "README.md", "samples.png", "unet/config.json", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    card = (out / "README.md").read_text()
    assert "python -m sdlora.demo.train_base" in card and "64 x 64" in card


def test_settings_must_match_to_resume_and_bad_overrides_are_named(tmp_path):
    work = tmp_path / "work"
    assert train_base.main(["--out", str(tmp_path / "m"), "--work-dir", str(work), "--stage", "vae", *TINY]) == 0
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "m"), "--work-dir", str(work), "--stage", "vae", *TINY,
                         "--set", "vae_lr=0.5"])
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "m"), "--set", "no_such_setting=1"])
    with pytest.raises(SystemExit):  # the UNet needs cached latents first
        train_base.main(["--out", str(tmp_path / "m2"), "--work-dir", str(tmp_path / "w2"), "--stage", "unet", *TINY])
