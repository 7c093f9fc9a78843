"""Exporting a run: one path for the final file, `export RUN` and `export RUN --step N`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.lora import load_lora
from sdlora.models.loading import load_base
from sdlora.train import RunExportError, export_run
from sdlora.train.checkpoint import load_run_adapter
from variant_helpers import assert_step_export_is_the_final_file, train_method


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_run_exports_share_one_path(tmp_path, tiny_model_dir):
    result = train_method(tmp_path, tiny_model_dir, "lora", "save_precision=float", "resolution=64", steps=4, save_every=2)
    # The final file, `export RUN` and `export RUN --step <last>`: same tensors, same metadata.
    assert_step_export_is_the_final_file(result)
    final = _meta(result.lora_path)
    assert final["modelspec.resolution"] == "64x64"
    assert final["ss_steps"] == "4"

    # An earlier checkpoint: its own weights (as restored by a resume), the run's metadata but its step,
    # in the run's save precision (float here, not fp16).
    early = export_run(result.run_dir, step=2, fmt="kohya")
    assert early.name == "lora-step2.safetensors"
    tensors = load_file(str(early))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    meta = _meta(early)
    assert meta["ss_steps"] == "2"
    for key in ("ss_network_module", "ss_network_dim", "sdlora_spec", "sdlora_trigger_word", "ss_tag_frequency",
                "modelspec.resolution"):
        assert meta[key] == final[key], key
    _, adapter = load_run_adapter(result.run_dir, step=2)
    base = load_base(str(tiny_model_dir))
    loaded, report = load_lora(early, base.unet, base.text_encoder)
    assert report.unknown_keys == []
    expected, got = adapter.export(), loaded.export()
    assert len(got) == len(expected) > 0
    for component, path, module in expected.items():
        other = got.component(component)[path]
        assert torch.equal(module.down, other.down) and torch.equal(module.up, other.up), path

    with pytest.raises(RunExportError, match="no checkpoint step-7"):
        export_run(result.run_dir, step=7)


def test_tag_frequency_counts_caption_file_tags(tmp_path, tiny_model_dir):
    """kohya's ss_tag_frequency counts the caption files' tags, not the templated training caption."""
    import json

    result = train_method(tmp_path, tiny_model_dir, "lora", "trigger_word=zq", steps=1, save_every=0)
    freq = json.loads(_meta(result.lora_path)["ss_tag_frequency"])
    tags = {tag for group in freq.values() for tag in group}
    assert tags and not any("zq" in tag or "style" in tag for tag in tags)
