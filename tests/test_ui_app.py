"""The web app through gradio_client, against a really launched ``python app.py`` (one per module).

Covers: serving and API names, file-route security, uploads (images, zip, bad files, path-like
names, the size limit), every error case giving a readable message, and a whole run: train a few
steps on the tiny model, poll until done, preview at scale 0 (= base, identical pixels) and 1,
export both formats and load the export into a fresh diffusers pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app_testing import (QUICK, AppProcess, broken_model, copy_tiny_model, make_images, make_zip, png_bytes, striped,
                         wait_for)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui-app")
    models = root / "models"
    copy_tiny_model(tiny_model_dir, models)
    broken_model(tiny_model_dir, models)
    proc = AppProcess.start(root / "runs", models, extra_args=["--max-upload-mb", str(MAX_UPLOAD_MB)],
                            env={"GRADIO_TEMP_DIR": str(root / "gradio-tmp")})
    yield proc
    proc.stop()
    # Every failure inside the app's own code became a message in the page: no traceback of the
    # server log passes through sdlora (gradio logs its own input validation errors).
    for block in proc.log_text().split("Traceback (most recent call last):")[1:]:
        assert "/sdlora/" not in block, block[:3000]


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def tiny_spec(app):
    return str((app.models_dir / "tiny").resolve())


def _message(excinfo) -> str:
    return str(excinfo.value)


def _upload(client, name: str, files: list, **kw):
    return client.predict(dataset_name=name, files=files, trigger_word="zq", **kw, api_name="/upload_dataset")


# ---- serving ------------------------------------------------------------------------------------
def test_serves_with_named_api(app, client):
    assert app.url.startswith("http://127.0.0.1:")
    assert httpx.get(app.url).status_code == 200
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/upload_dataset", "/check_dataset", "/start_training", "/stop_training", "/resume_training",
            "/run_status", "/preview", "/compare", "/scale_grid", "/export", "/export_info"} <= names


def test_file_routes_serve_only_allowed_folders(app, tmp_path):
    inside = app.runs_dir / "served.txt"
    inside.write_text("fine")
    secret = app.runs_dir.parent / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    repo_file = Path(__file__).resolve().parent.parent / "pyproject.toml"

    def get(path: str) -> httpx.Response:
        return httpx.get(f"{app.url}gradio_api/file={path}")

    assert get(str(inside)).status_code == 200 and get(str(inside)).text == "fine"
    for path in (str(secret), f"{app.runs_dir}/../secret.txt", f"{app.runs_dir}/%2e%2e/secret.txt", "/etc/passwd",
                 str(repo_file), str(app.log_path)):
        r = get(path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "TOP-SECRET-CONTENT" not in r.text
    assert httpx.get(f"{app.url}gradio_api/file/{secret}").status_code in (403, 404)


# ---- dataset ------------------------------------------------------------------------------------
def test_upload_images_zip_and_unusable_files(app, client, tmp_path):
    imgs = make_images(tmp_path / "imgs", 3)
    caps = [p.with_suffix(".txt") for p in imgs]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes(striped((1, 2, 3)))[:60])
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(b"%PDF-1.4 hello")
    zpath = make_zip(tmp_path / "more.zip", 2)
    files = [handle_file(str(p)) for p in [*imgs, *caps, corrupt, pdf, zpath]]
    gallery, check, _, _, upload_value, name = _upload(client, "mixed", files)
    assert name == "mixed"
    folder = app.runs_dir / "_datasets" / "mixed"
    assert sorted(p.name for p in folder.glob("*.png")) == ["corrupt.png", "img0.png", "img1.png", "img2.png",
                                                            "z0.png", "z1.png"]
    assert (folder / "img1.txt").read_text().strip() == "stripes number 1"
    assert len(gallery) == 5  # the corrupt file is not shown as usable
    assert "5 image(s) will be used" in check and "1 bucket(s): 64x64" in check
    assert "corrupt.png" in check and "cannot be used" in check  # the reason of the loader's check
    assert "notes.pdf" in check and "not an image" in check
    assert upload_value is None

    # Captions are editable; the check of a folder with only unusable files says training cannot start.
    out = client.predict(dataset_name="mixed", image="img0.png", caption="hand written", api_name="/save_caption")
    assert (folder / "img0.txt").read_text().strip() == "hand written"
    assert any("hand written" in (item.get("caption") or "") for item in out[0])
    gallery, check, *_ = client.predict(dataset_name="mixed", api_name="/remove_unusable")
    assert not (folder / "corrupt.png").exists() and "cannot be used" not in check


def test_path_like_upload_names_land_inside(app, client, tmp_path):
    data = png_bytes(striped((200, 0, 0)))
    stored = []
    for name in ("../../evil.png", "..\\..\\evil2.png"):
        r = httpx.post(f"{app.url}gradio_api/upload", files={"files": (name, data, "image/png")})
        assert r.status_code == 200, r.text
        stored += r.json()
    zpath = tmp_path / "slip.zip"
    import zipfile

    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../../evil3.png", data)
        zf.writestr("/abs/evil4.png", data)
    files = [handle_file(p) for p in stored] + [handle_file(str(zpath))]
    out = _upload(client, "../../evil-set", files)
    folder = app.runs_dir / "_datasets" / "evil-set"
    assert out[-1] == "evil-set"  # the name box shows what the name became
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "evil.png", "evil2.png", "evil3.png", "evil4.png"]
    outside = [p for p in app.runs_dir.parent.rglob("evil*.png") if app.runs_dir not in p.parents]
    outside = [p for p in outside if "gradio-tmp" not in p.parts]
    assert outside == []


def test_over_limit_upload_is_refused_and_app_keeps_serving(app, client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom((MAX_UPLOAD_MB + 1) * 1024 * 1024))
    r = httpx.post(f"{app.url}gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert r.status_code == 413 and "size" in r.text.lower()
    with pytest.raises(Exception) as e:
        _upload(client, "big", [handle_file(str(big))])
    assert "Traceback" not in str(e.value)
    # A zip whose entry unpacks past the limit (it compresses to almost nothing) is refused by name.
    import zipfile

    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.png", b"\0" * ((MAX_UPLOAD_MB + 1) * 1024 * 1024))
    with pytest.raises(AppError) as e:
        _upload(client, "big", [handle_file(str(z))])
    assert "huge.png" in _message(e) and "upload limit" in _message(e)
    assert "huge.png" not in {p.name for p in app.runs_dir.rglob("*")}
    assert client.predict(dataset_name="mixed", api_name="/check_dataset")  # still serving


def test_non_image_only_upload_is_a_readable_error(client, tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"\0" * 100)
    with pytest.raises(AppError) as e:
        _upload(client, "nothing", [handle_file(str(f))])
    assert "model.ckpt" in _message(e) and "not an image" in _message(e)


# ---- invalid settings ---------------------------------------------------------------------------
def _start(client, tiny_spec, name, dataset, **overrides):
    settings = dict(QUICK, max_train_steps=4)
    settings.update(overrides)
    return client.predict(pretrained_model_name_or_path=tiny_spec, output_name=name, dataset=dataset,
                          trigger_word="zq", **settings, api_name="/start_training")


@pytest.mark.parametrize("overrides, words", [
    (dict(network_dim=0), ["Rank", "out of range", "1 to 1,024"]),
    (dict(learning_rate=-1.0), ["Learning rate", "out of range"]),
    (dict(resolution=100), ["Resolution", "multiple of 8"]),
    (dict(max_train_steps=2.5), ["Steps", "whole number"]),
    (dict(max_train_steps=1e99), ["Steps", "out of range", "1 to 1,000,000"]),
    (dict(output_name="bad name!"), ["Run name"]),
    (dict(with_prior_preservation=True, class_prompt=""), ["Class prompt", "required"]),
])
def test_invalid_settings_name_the_option(client, tiny_spec, app, tmp_path, overrides, words):
    name = overrides.pop("output_name", "invalid-run")
    make_images(tmp_path / "i", 2)
    _upload(client, "valid-set", [handle_file(str(p)) for p in (tmp_path / "i").glob("*.png")])
    with pytest.raises(AppError) as e:
        _start(client, tiny_spec, name, "valid-set", **overrides)
    msg = _message(e)
    assert all(w in msg for w in words), msg
    assert "Traceback" not in msg and str(app.runs_dir) not in msg
    assert not {"max_train_steps", "learning_rate", "output_name", "class_prompt"} & set(msg.replace(":", " ").split())
    assert not (app.runs_dir / "invalid-run").exists()


def test_empty_dataset_and_unknown_choices_are_refused(client, tiny_spec, app, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _upload(client, "only-bad", [handle_file(str(bad))])
    with pytest.raises(AppError) as e:
        _start(client, tiny_spec, "empty-run", "only-bad")
    assert "no usable" in _message(e).lower(), _message(e)
    with pytest.raises(AppError) as e:
        _start(client, tiny_spec, "empty-run", "no-such-dataset")
    assert "does not exist" in _message(e)
    with pytest.raises(AppError) as e:
        _start(client, "/etc", "empty-run", "only-bad")
    assert "not one of the listed base models" in _message(e)
    with pytest.raises(AppError) as e:
        client.predict(run="../../etc", api_name="/resume_training")
    assert "not a run name" in _message(e)


# ---- a whole run --------------------------------------------------------------------------------
def _status(client, run):
    return client.predict(run=run, api_name="/run_status")


def test_train_preview_export_round_trip(app, client, tiny_spec, tmp_path):
    make_images(tmp_path / "style", 4)
    _upload(client, "stripes", [handle_file(str(p)) for p in sorted((tmp_path / "style").iterdir())])
    msg, _, _ = _start(client, tiny_spec, "ui-run", "stripes", max_train_steps=6, sample_every_n_steps=3)
    assert "ui-run" in msg
    # One training at a time: a second start is refused while the first runs.
    with pytest.raises(AppError) as e:
        _start(client, tiny_spec, "ui-run-2", "stripes")
    assert "already running" in _message(e) or "is training now" in _message(e)
    st = wait_for(lambda: (s := _status(client, "ui-run"))["state"] in ("done", "failed") and s, 240, "training end")
    assert st["state"] == "done", st
    assert st["step"] == 6 and st["lora"]
    assert not (app.runs_dir / "ui-run-2").exists()

    # Preview: scale 0 is exactly the base model; scale 1 differs.
    kw = dict(base_model=tiny_spec, lora_runs=["ui-run"], lora_files=None, prompt="stripes, in zq style",
              negative_prompt="", seed=3, steps=4, width=64, height=64, guidance=5.0, sampler="Euler")
    base_only = np.asarray(Image.open(client.predict(**{**kw, "lora_runs": []}, scale=1.0, api_name="/preview")))
    at0 = np.asarray(Image.open(client.predict(**kw, scale=0.0, api_name="/preview")))
    at1 = np.asarray(Image.open(client.predict(**kw, scale=1.0, api_name="/preview")))
    assert at0.shape == (64, 64, 3)
    assert np.array_equal(at0, base_only)
    assert np.abs(at1.astype(int) - at0.astype(int)).mean() > 0.5
    left, right = client.predict(**kw, scale=1.0, api_name="/compare")
    assert np.array_equal(np.asarray(Image.open(left)), at0)
    assert np.array_equal(np.asarray(Image.open(right)), at1)
    grid = Image.open(client.predict(**kw, scales="0, 0.5, 1", api_name="/scale_grid"))
    assert grid.size[0] == 3 * 256  # 64 px images drawn 4x, pixel for pixel
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:256:4, :256:4], at0)

    # Export: kohya file with metadata, loaded by a fresh diffusers pipeline.
    path, summary, meta = client.predict(run="ui-run", fmt="kohya", checkpoint="final", rank=0, api_name="/export")
    assert Path(path).suffix == ".safetensors" and "kohya" in summary
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "6" and meta["ss_output_name"] == "ui-run"
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model_") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_spec, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    import torch

    def render():
        return pipe("stripes, in zq style", num_inference_steps=3, width=64, height=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    plain = render()
    pipe.load_lora_weights(path)
    assert np.abs(render() - plain).mean() > 1e-4

    dpath, _, _ = client.predict(run="ui-run", fmt="diffusers", checkpoint="final", rank=0, api_name="/export")
    pipe2 = StableDiffusionPipeline.from_pretrained(tiny_spec, safety_checker=None, requires_safety_checker=False)
    pipe2.set_progress_bar_config(disable=True)
    pipe2.load_lora_weights(dpath)
    pipe = pipe2
    assert np.abs(render() - plain).mean() > 1e-4
    # A checkpoint at a lower rank exports too.
    choices, _, shown, embedding = client.predict(run="ui-run", api_name="/export_info")
    assert shown == meta  # the metadata shown before exporting is what the file carries
    assert embedding is None  # no learned trigger tokens in this run: no embedding file offered
    steps = [c[1] if isinstance(c, (list, tuple)) else c for c in choices["choices"]]
    assert "final" in steps and any(s.startswith("step-") for s in steps)
    cp = next(s for s in steps if s.startswith("step-"))
    rpath, _, _ = client.predict(run="ui-run", fmt="kohya", checkpoint=cp, rank=2, api_name="/export")
    down = [v for k, v in load_file(rpath).items() if k.endswith("lora_down.weight")]
    assert down and all(t.shape[0] <= 2 for t in down)


def test_training_failure_is_reported(app, client, tmp_path):
    make_images(tmp_path / "f", 2)
    _upload(client, "fail-set", [handle_file(str(p)) for p in (tmp_path / "f").glob("*.png")])
    broken = str((app.models_dir / "broken").resolve())
    _start(client, broken, "fail-run", "fail-set", max_train_steps=3)
    st = wait_for(lambda: (s := _status(client, "fail-run"))["state"] in ("done", "failed", "stopped") and s, 180,
                  "the failure")
    assert st["state"] == "failed", st
    assert st["message"] and "Traceback" not in st["message"]
    # The page's log view of the run says why, without a traceback.
    from sdlora.train import RunDir
    from sdlora.ui.runview import live_view

    view = live_view(RunDir(app.runs_dir / "fail-run"))
    assert "failed" in view["progress"] and "broken" in view["log"] and "Traceback" not in view["log"]
    # The app keeps serving, and the next start works.
    assert client.predict(dataset_name="fail-set", api_name="/check_dataset")


def test_bad_lora_files_are_readable_errors(client, tiny_spec, tmp_path):
    junk = tmp_path / "not-a-lora.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    kw = dict(base_model=tiny_spec, prompt="x", steps=2, width=64, height=64, api_name="/preview")
    with pytest.raises(AppError) as e:
        client.predict(lora_files=[handle_file(str(junk))], **kw)
    assert "not-a-lora" in _message(e) and "Traceback" not in _message(e)
    with pytest.raises(AppError) as e:
        client.predict(lora_files=[handle_file(str(text))], **kw)
    assert "not a .safetensors LoRA file" in _message(e)
    with pytest.raises(AppError) as e:
        client.predict(lora_runs=["no-such-run"], **kw)
    assert "no run named" in _message(e)


def test_bundled_style_set_becomes_an_editable_dataset(app, client):
    from sdlora.ui.datasets import list_style_sets

    styles = list_style_sets()
    assert styles, "the bundled style sets are missing from the package"
    out = client.predict(dataset_name="from-bundle", style=styles[0], trigger_word="", api_name="/use_style_set")
    gallery, check, name, trigger = out[0], out[1], out[-2], out[-1]
    # The set lands in a dataset of its own name (not the name box's), with its own trigger word.
    folder = app.runs_dir / "_datasets" / styles[0]
    assert name == styles[0] and not (app.runs_dir / "_datasets" / "from-bundle").exists()
    assert trigger == {"outline": "outlined", "pastel": "pastelish", "stripes": "stripey"}[styles[0]]
    assert len(gallery) == len(list(folder.glob("*.png"))) > 0
    assert f"{len(gallery)} image(s) will be used" in check
    # A trigger word of the user's own stays.
    assert client.predict(dataset_name="", style=styles[0], trigger_word="zq", api_name="/use_style_set")[-1] == "zq"
    with pytest.raises(AppError) as e:
        client.predict(dataset_name="x", style="../../etc", api_name="/use_style_set")
    assert "../../etc" in _message(e) and "Traceback" not in _message(e)  # gradio's own choice check
    assert not (app.runs_dir / "_datasets" / "x").exists()
