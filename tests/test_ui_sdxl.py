"""An SDXL base in the app's models folder, through gradio_client against a launched ``python app.py``:
train a few steps on the tiny SDXL model, preview (scale 0 is the base's own image), and export the
kohya file with SDXL's names (both text encoders, the UNet in SDXL's original block naming)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_testing import QUICK, AppProcess, make_images, wait_for
from gradio_client import Client, handle_file
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sdlora.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("ui-sdxl")
    save_tiny_model(root / "models" / "tiny-xl", family="sdxl")
    proc = AppProcess.start(root / "runs", root / "models", env={"GRADIO_TEMP_DIR": str(root / "gradio-tmp")})
    yield proc
    proc.stop()


def test_sdxl_train_preview_export(app, tmp_path):
    client = Client(app.url, verbose=False)
    spec = str((app.models_dir / "tiny-xl").resolve())
    make_images(tmp_path / "imgs", 4)
    client.predict(dataset_name="xl-set", files=[handle_file(str(p)) for p in sorted((tmp_path / "imgs").iterdir())],
                   trigger_word="zq", api_name="/upload_dataset")
    msg, _, _ = client.predict(pretrained_model_name_or_path=spec, output_name="xl-run", dataset="xl-set",
                               trigger_word="zq", **dict(QUICK, max_train_steps=4), api_name="/start_training")
    assert "xl-run" in msg
    st = wait_for(lambda: (s := client.predict(run="xl-run", api_name="/run_status"))["state"]
                  in ("done", "failed") and s, 600, "the SDXL run to end")
    assert st["state"] == "done" and st["step"] == 4, st

    kw = dict(base_model=spec, lora_runs=["xl-run"], lora_files=None, prompt="stripes, in zq style",
              negative_prompt="", seed=1, steps=3, width=64, height=64, guidance=5.0, sampler="Euler")
    base_only = np.asarray(Image.open(client.predict(**{**kw, "lora_runs": []}, scale=1.0, api_name="/preview")))
    at0 = np.asarray(Image.open(client.predict(**kw, scale=0.0, api_name="/preview")))
    at1 = np.asarray(Image.open(client.predict(**kw, scale=1.0, api_name="/preview")))
    assert at0.shape == (64, 64, 3) and np.array_equal(at0, base_only)
    assert not np.array_equal(at1, at0)

    path, summary, meta = client.predict(run="xl-run", fmt="kohya", checkpoint="final", rank=0, api_name="/export")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in keys)  # SDXL's original naming, as kohya writes
    assert meta["ss_base_model_version"].startswith("sdxl") and Path(path).name == "xl-run.safetensors"
