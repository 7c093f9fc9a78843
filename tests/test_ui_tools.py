"""The Tools tab through gradio_client against a launched app: merge into the tiny base, combine two
LoRAs, resize one; results land in the runs folder's _tools/ and equal what the library writes; bad
input is a readable message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app_testing import AppProcess, copy_tiny_model
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from sdlora.lora import LoraSpec, save_lora
from sdlora.models.loading import load_base
from sdlora.tools import combine_loras
from tools_helpers import random_weights


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui-tools")
    copy_tiny_model(tiny_model_dir, root / "models")
    proc = AppProcess.start(root / "runs", root / "models", env={"GRADIO_TEMP_DIR": str(root / "gradio-tmp")})
    yield proc
    proc.stop()
    for block in proc.log_text().split("Traceback (most recent call last):")[1:]:
        assert "/sdlora/" not in block, block[:3000]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ui-tools-loras")
    base = load_base(tiny_model_dir)
    models = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": None}
    a = random_weights(models, LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0), seed=1)
    b = random_weights(models, LoraSpec(preset="attn", rank=3, alpha=3.0, text_encoder=True), seed=2)
    return [save_lora(a, folder / "style-a.safetensors", family="sd1", dtype="fp32"),
            save_lora(b, folder / "style-b.safetensors", family="sd1", dtype="fp32")]


def test_tools_tab_combine_resize_merge(app, loras, tmp_path):
    client = Client(app.url, verbose=False)
    files = [handle_file(str(p)) for p in loras]
    weights = {"headers": ["LoRA", "weight"], "data": [["style-a.safetensors", 0.8], ["style-b.safetensors", -0.5]]}

    # Combine (exact): the same tensors as the library's own combine of the same files and weights.
    tiny = str((app.models_dir / "tiny").resolve())  # names the layers of files for this small model
    out, summary, _ = client.predict(lora_runs=[], lora_files=files, lora_weights=weights, out_name="../ab",
                                     rank=0, base=tiny, api_name="/combine")
    got = Path(out)
    assert got.name == "ab.safetensors"  # the name is sanitised; the file lands in _tools/
    stored = app.runs_dir / "_tools" / "ab.safetensors"
    assert stored.is_file() and summary, summary
    ref = combine_loras([(loras[0], 0.8), (loras[1], -0.5)], tmp_path / "ref.safetensors", base=tiny)
    a, b = load_file(stored), load_file(ref.out)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # Resize the first LoRA to rank 2: every module's rank is at most 2.
    out, summary, table = client.predict(lora_runs=[], lora_files=files[:1], lora_weights=weights, out_name="a-r2",
                                         method="fixed", rank=2, value=0.9, base=tiny, api_name="/resize")
    small = load_file(out)
    downs = [v for k, v in small.items() if k.endswith("lora_down.weight")]
    assert downs and max(d.shape[0] for d in downs) == 2
    rows = table.get("data") or table.get("value", {}).get("data")
    assert rows and len(rows[0]) == len(table.get("headers") or table["value"]["headers"]), table.keys()

    # Merge both into the tiny base: a single checkpoint file in the original layout.
    out, summary, _ = client.predict(lora_runs=[], lora_files=files, lora_weights=weights, out_name="merged",
                                     base=tiny, dtype="fp32", api_name="/merge_into")
    merged = load_file(out)
    assert any(k.startswith("model.diffusion_model.") for k in merged), list(merged)[:5]

    # Bad input: readable messages, no traceback, no server path.
    with pytest.raises(AppError) as e:  # without the base that names its layers
        client.predict(lora_runs=[], lora_files=files, lora_weights=weights, out_name="", rank=0, base="",
                       api_name="/combine")
    assert "style-a.safetensors" in str(e.value) and "gradio" not in str(e.value) and "/tmp" not in str(e.value)
    with pytest.raises(AppError, match="at least 2 LoRAs"):
        client.predict(lora_runs=[], lora_files=files[:1], lora_weights=weights, out_name="", rank=0,
                       api_name="/combine")
    with pytest.raises(AppError, match="not one of the listed base models"):
        client.predict(lora_runs=[], lora_files=files, lora_weights=weights, out_name="x", base="/etc",
                       dtype="fp16", api_name="/merge_into")
    with pytest.raises(AppError, match="Rank"):
        client.predict(lora_runs=[], lora_files=files[:1], lora_weights=weights, out_name="", method="fixed",
                       rank=0, value=0.9, api_name="/resize")
