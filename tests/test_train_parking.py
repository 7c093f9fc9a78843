"""Frozen VAE / text encoders out of memory while the steps run (sdlora.train.parking)."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.train import parking as parking_mod
from sdlora.train import train
from sdlora.train.parking import Parking

from helpers import make_images, tiny_cfg


def _snapshot(module):
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


def _outputs(pipe):
    ids = pipe.tokenizer(["a red square"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    pixels = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.vae.encode(pixels).latent_dist.mode()


@pytest.fixture(autouse=True)
def park_small_models(monkeypatch):
    """The tiny test models are far below the size worth parking on a CPU: park them anyway."""
    monkeypatch.setattr(parking_mod, "MIN_DISK_PARK_BYTES", 0)


def test_small_models_stay_in_cpu_memory_without_a_word(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setattr(parking_mod, "MIN_DISK_PARK_BYTES", 1 << 30)
    p = Parking({"vae": tiny_pipe.vae}, torch.device("cpu"), tmp_path / "park")
    assert not p.park() and p.reason is None and not p.path.exists()
    assert not any(t.is_meta for t in tiny_pipe.vae.parameters())


def test_cpu_parking_drops_the_tensors_and_restores_them_exactly(tmp_path, tiny_pipe):
    before = {name: _snapshot(m) for name, m in (("vae", tiny_pipe.vae), ("te", tiny_pipe.text_encoder))}
    outs = _outputs(tiny_pipe)
    p = Parking({"vae": tiny_pipe.vae, "te": tiny_pipe.text_encoder}, torch.device("cpu"), tmp_path / "park")
    assert p.nbytes == sum(t.numel() * t.element_size() for snap in before.values() for t in snap.values())

    assert p.park() and p.parked
    assert p.path.is_file()
    for m in (tiny_pipe.vae, tiny_pipe.text_encoder):
        assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])

    p.restore()
    for name, m in (("vae", tiny_pipe.vae), ("te", tiny_pipe.text_encoder)):
        after = _snapshot(m)
        assert after.keys() == before[name].keys()  # non-persistent buffers (position_ids) too
        for k, v in before[name].items():
            assert torch.equal(after[k], v), k
        assert not any(q.requires_grad for q in m.parameters())
    for a, b in zip(_outputs(tiny_pipe), outs):
        assert torch.equal(a, b)

    stamp = p.path.stat().st_mtime_ns
    assert p.park() and p.path.stat().st_mtime_ns == stamp  # parked again without writing again
    with p.restored():
        assert not p.parked and not any(t.is_meta for t in tiny_pipe.vae.parameters())
    assert p.parked and all(t.is_meta for t in tiny_pipe.vae.parameters())
    p.restore()
    p.discard()
    assert not p.path.exists() and not p.path.parent.exists()


def test_too_little_disk_keeps_the_models_and_says_why(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setattr(parking_mod, "DISK_MARGIN_BYTES", 1 << 60)
    p = Parking({"vae": tiny_pipe.vae}, torch.device("cpu"), tmp_path / "park")
    assert not p.park() and not p.parked
    assert "GB free" in p.reason and str(tmp_path / "park") in p.reason
    assert not p.path.exists()
    assert not any(t.is_meta for t in tiny_pipe.vae.parameters())


def _messages(run_dir):
    return [e["text"] for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
            if e["type"] == "message"]


def test_training_parks_frozen_models_and_samples_match_a_run_that_kept_them(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    data = make_images(tmp_path / "data", n=4)
    opts = ("max_train_steps=4", "save_every_n_steps=0", "sample_every_n_steps=2", "train_text_encoder=false",
            "text_encoder_lr=0")
    parked = train(tiny_cfg(tmp_path, data, "parked", *opts, model=tiny_model_dir))
    assert parked.state == "done"
    text = "\n".join(_messages(parked.run_dir))
    assert "moved the frozen vae and text_encoder_1 to disk (.parked.tmp)" in text
    assert not (parked.run_dir / ".parked.tmp").exists()

    monkeypatch.setattr(parking_mod, "DISK_MARGIN_BYTES", 1 << 60)
    kept = train(tiny_cfg(tmp_path, data, "kept", *opts, model=tiny_model_dir))
    assert "kept the frozen vae and text_encoder_1 in memory" in "\n".join(_messages(kept.run_dir))

    assert parked.lora_path.read_bytes() != b""
    from safetensors.torch import load_file

    a, b = load_file(str(parked.lora_path)), load_file(str(kept.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (parked.run_dir / "samples").glob("*.png"))
    assert names == ["step-000002-0.png", "step-000004-0.png"]
    for name in names:  # mid-run samples (models read back, parked again) and the final ones
        assert (parked.run_dir / "samples" / name).read_bytes() == (kept.run_dir / "samples" / name).read_bytes()


def test_trained_text_encoder_stays_and_only_the_vae_parks(tmp_path, tiny_model_dir):
    data = make_images(tmp_path / "data", n=4)
    res = train(tiny_cfg(tmp_path, data, "te", "max_train_steps=2", "save_every_n_steps=0", model=tiny_model_dir))
    assert res.state == "done"
    moved = [t for t in _messages(res.run_dir) if t.startswith("moved the frozen")]
    assert len(moved) == 1 and moved[0].startswith("moved the frozen vae to disk")
