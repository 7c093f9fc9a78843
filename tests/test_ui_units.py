"""Web app pieces without a server: command line, dataset storage (names, zips, limits), the page as built
(training form, base-model defaults, export choices) and its handlers called directly."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sdlora.resources import config_path
from sdlora.train import ConfigError, RunDir, TrainConfig
from sdlora.ui import datasets as ds
from sdlora.ui import form
from sdlora.ui.errors import UIError, message_for
from sdlora.ui.server import OptionError, parse_auth, parse_options


def _png(path: Path, color=(200, 30, 30), size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _png_bytes(color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- command line ---------------------------------------------------------------------------
def test_defaults_are_local_and_private(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = parse_options([])
    assert (o.host, o.port, o.share, o.auth) == ("127.0.0.1", 7860, False, None)
    assert o.runs_dir == tmp_path / "runs" and o.models_dir == tmp_path / "models"
    assert o.allowed_paths() == [str(tmp_path / "runs"), str(tmp_path / "models")]


def test_options_parse(tmp_path):
    o = parse_options(["--host", "0.0.0.0", "--port", "7999", "--runs-dir", str(tmp_path / "r"),
                       "--models-dir", str(tmp_path / "m"), "--max-upload-mb", "1.5", "--auth", "ann:secret:x",
                       "--share"])
    assert (o.host, o.port, o.share) == ("0.0.0.0", 7999, True)
    assert o.max_upload_bytes == int(1.5 * 1024 * 1024)
    assert o.auth == [("ann", "secret:x")]


def test_auth_file(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text("# people\nann:one\n\nbob:two\n")
    assert parse_auth(str(f)) == [("ann", "one"), ("bob", "two")]
    f.write_text("ann\n")
    with pytest.raises(OptionError, match="line 1"):
        parse_auth(str(f))
    with pytest.raises(OptionError, match="neither"):
        parse_auth("no-colon-and-no-file")


@pytest.mark.parametrize("args, text", [(["--port", "70000"], "--port"), (["--max-upload-mb", "0"], "--max-upload-mb"),
                                        (["--auth", "nobody"], "--auth"), (["--bogus"], "unrecognized")])
def test_bad_options_exit_2_with_one_line(args, text, capsys):
    with pytest.raises(SystemExit) as e:
        parse_options(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert text in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_runs_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        parse_options(["--runs-dir", str(f)])
    assert "--runs-dir" in capsys.readouterr().err


# ---- dataset storage ---------------------------------------------------------------------------
def test_dataset_names_stay_inside(tmp_path):
    runs = tmp_path / "runs"
    d = ds.dataset_dir(runs, "../../etc", create=True)
    assert d == runs / "_datasets" / "etc" and d.is_dir()
    assert ds.dataset_dir(runs, "my style!").name == "my_style"
    with pytest.raises(UIError):
        ds.dataset_dir(runs, "../..")
    with pytest.raises(UIError):
        ds.dataset_dir(runs, "   ")


def test_changed_dataset_names_are_said_and_never_collide(tmp_path):
    runs = tmp_path / "runs"
    assert ds.dataset_dir(runs, "图像-ünïcödé").name == "unicode"  # accents kept as letters
    first = ds.dataset_dir(runs, "a/b/c", create=True)
    assert first.name == "c" and ds.typed_name(first) == "a/b/c"
    assert ds.dataset_dir(runs, "a/b/c", create=True) == first  # the same name again: the same dataset
    assert ds.dataset_dir(runs, "c", create=True) == first  # picked by its stored name
    with pytest.raises(UIError, match="'x/c' would be stored as 'c', which is the dataset 'a/b/c'"):
        ds.dataset_dir(runs, "x/c", create=True)


def test_long_upload_names_keep_extension_and_pairs(tmp_path):
    folder = tmp_path / "ds"
    long_a, long_b = "a" * 150 + " pic", "a" * 150 + " other"
    src = _png(tmp_path / "x.png")
    cap = tmp_path / "x.txt"
    cap.write_text("a red square")
    z = tmp_path / "long.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(f"set/{long_b}.png", _png_bytes())
        zf.writestr(f"set/{long_b}.txt", "a green square")
    report = ds.add_files(folder, [(f"{long_a}.png", src), (f"{long_a}.txt", cap), ("long.zip", z)], max_bytes=10**6)
    assert report.rejected == [] and len(report.added) == 4
    stems = {}
    for name in report.added:
        assert len(name) <= ds.MAX_NAME and name.endswith((".png", ".txt")), name
        stems.setdefault(Path(name).stem, set()).add(Path(name).suffix)
    assert list(stems.values()) == [{".png", ".txt"}, {".png", ".txt"}]  # two pairs, kept apart
    from sdlora.data import scan_dataset

    scan = scan_dataset(folder)
    assert sorted(item.caption for item in scan.items) == ["a green square", "a red square"]


def test_a_huge_caption_is_cut_in_the_check(tmp_path):
    from sdlora.ui.dataview import dataset_view

    folder = tmp_path / "ds"
    _png(folder / "big.png")
    (folder / "big.txt").write_text("word " * 200_000)
    view = dataset_view(folder, "zq", {})
    assert len(view.html) < 5_000 and "more characters" in view.html
    assert all(len(label) < 400 for _, label in view.gallery)


def test_upload_names_are_made_safe(tmp_path):
    folder = tmp_path / "runs" / "_datasets" / "a"
    src = _png(tmp_path / "up" / "x.png")
    report = ds.add_files(folder, [("../../evil.png", src), ("..\\..\\win.png", src), (".hidden.png", src)],
                          max_bytes=10**6)
    assert sorted(report.added) == ["evil.png", "hidden.png", "win.png"], report
    assert sorted(p.name for p in folder.iterdir()) == ["evil.png", "hidden.png", "win.png"]
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "runs" / "evil.png").exists()


def test_upload_refuses_non_images_empty_and_too_large(tmp_path):
    folder = tmp_path / "ds"
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "empty.png").write_bytes(b"")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"0" * 5000)
    ok = _png(tmp_path / "ok.png")
    cap = tmp_path / "ok.txt"
    cap.write_text("a red square")
    report = ds.add_files(folder, [(p.name, p) for p in (tmp_path / "notes.pdf", tmp_path / "empty.png", big, ok, cap)],
                          max_bytes=4000)
    reasons = dict(report.rejected)
    assert "not an image" in reasons["notes.pdf"]
    assert "empty" in reasons["empty.png"]
    assert "upload limit" in reasons["big.png"]
    assert sorted(report.added) == ["ok.png", "ok.txt"]
    assert sorted(p.name for p in folder.iterdir()) == ["ok.png", "ok.txt"]


def test_same_name_twice_in_one_upload_keeps_both(tmp_path):
    folder = tmp_path / "ds"
    a, b = _png(tmp_path / "a" / "x.png", (1, 2, 3)), _png(tmp_path / "b" / "x.png", (4, 5, 6))
    report = ds.add_files(folder, [("x.png", a), ("x.png", b)], max_bytes=10**6)
    assert report.added == ["x.png", "x-2.png"]


def test_zip_entries_cannot_escape_and_bombs_are_stopped(tmp_path):
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../../evil.png", _png_bytes())
        zf.writestr("/abs/path/abs.png", _png_bytes())
        zf.writestr("sub/dir/one.png", _png_bytes())
        zf.writestr("sub/dir/one.txt", "a caption")
        zf.writestr("__MACOSX/sub/._one.png", b"junk")
        zf.writestr("readme.md", "hello")
        zf.writestr("huge.png", b"\0" * 300_000)  # compresses to almost nothing
    folder = tmp_path / "runs" / "_datasets" / "z"
    report = ds.add_files(folder, [("set.zip", z)], max_bytes=100_000)
    assert sorted(report.added) == ["abs.png", "evil.png", "one.png", "one.txt"]
    reasons = {name.split(": ", 1)[1]: r for name, r in report.rejected}
    assert "not an image" in reasons["readme.md"] and "upload limit" in reasons["huge.png"]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(["set.zip"] + [f"runs/_datasets/z/{n}" for n in report.added])


def test_zip_keeps_kohya_repeat_folders(tmp_path):
    z = tmp_path / "k.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("set/10_mystyle/a.png", _png_bytes())
        zf.writestr("set/10_mystyle/a.txt", "a caption")
        zf.writestr("set/plain/b.png", _png_bytes())
        zf.writestr("other/b.png", _png_bytes((1, 1, 1)))
    folder = tmp_path / "ds"
    report = ds.add_files(folder, [("k.zip", z)], max_bytes=10**6)
    assert sorted(report.added) == ["10_mystyle/a.png", "10_mystyle/a.txt", "b-2.png", "b.png"]
    assert (folder / "10_mystyle" / "a.txt").read_text() == "a caption"
    assert [ds.relative_name(folder, p) for p in ds.image_files(folder)] == ["10_mystyle/a.png", "b-2.png", "b.png"]
    ds.write_caption(folder, "10_mystyle/a.png", "new")
    assert (folder / "10_mystyle" / "a.txt").read_text() == "new\n"


def test_broken_zip_is_a_readable_refusal(tmp_path):
    z = tmp_path / "bad.zip"
    z.write_bytes(b"PK\x03\x04 not really")
    report = ds.add_files(tmp_path / "ds", [("bad.zip", z)], max_bytes=10**6)
    assert report.rejected == [("bad.zip", "not a readable .zip archive")]


def test_captions_write_and_remove(tmp_path):
    folder = tmp_path / "ds"
    _png(folder / "a.png")
    ds.write_caption(folder, "a.png", "  a red square ")
    assert (folder / "a.txt").read_text() == "a red square\n"
    assert ds.read_caption_text(folder / "a.png") == "a red square"
    ds.write_caption(folder, "a.png", "")
    assert not (folder / "a.txt").exists()
    with pytest.raises(UIError):
        ds.write_caption(folder, "../a.png", "x")
    (tmp_path / "outside.png").write_bytes(b"x")
    with pytest.raises(UIError):
        ds.remove_image(folder, "../outside.png")
    assert (tmp_path / "outside.png").exists()
    ds.remove_image(folder, "a.png")
    assert not (folder / "a.png").exists()


def test_bundled_style_sets_copy(tmp_path):
    styles = ds.list_style_sets()
    assert styles, "the bundled style sets are missing from the package"
    n = ds.copy_style_set(styles[0], tmp_path / "copy")
    assert n > 0 and len(ds.image_files(tmp_path / "copy")) > 0
    with pytest.raises(UIError, match="not a bundled style set"):
        ds.copy_style_set("../../etc", tmp_path / "x")


# ---- the page ------------------------------------------------------------------------------------
def _page(runs: Path, models: Path):
    """The app (built, not served) and its page: {elem_id: (type, props, inside "Advanced")}."""
    from sdlora.ui.app import App
    from sdlora.ui.server import ServerOptions

    app = App(ServerOptions(runs_dir=runs, models_dir=models))
    config = app.build().get_config_file()
    components = {c["id"]: c for c in config["components"]}
    page: dict[str, tuple[str, dict, bool]] = {}

    def walk(node: dict, advanced: bool) -> None:
        c = components.get(node["id"])
        elem_id = c["props"].get("elem_id") if c else None
        if elem_id:
            page[elem_id] = (c["type"], c["props"], advanced)
        for child in node.get("children", []):
            walk(child, advanced or elem_id == "tr-advanced")

    walk(config["layout"], False)
    return app, page


def _shown(updates: dict) -> dict:
    """What a handler's updates put into the page, by elem_id (nothing for gradio's "skip")."""
    if updates.get("__type__") == "update":
        return {}
    return {c.elem_id: (u.get("value") if isinstance(u, dict) else u) for c, u in updates.items()}


def test_training_form_shows_the_settings_and_no_server_paths(tmp_path):
    _, page = _page(tmp_path / "runs", tmp_path / "models")
    fields = {eid[len("cfg-"):]: v for eid, v in page.items() if eid.startswith("cfg-")}
    main = {name for name, (_, _, advanced) in fields.items() if not advanced}
    # What a style LoRA needs is on the page without opening "Advanced"; the rest is in there.
    assert {"max_train_steps", "network_dim", "learning_rate", "text_encoder_lr", "resolution", "train_batch_size",
            "train_text_encoder"} <= main
    assert {"sample_every_n_steps", "save_every_n_steps", "min_bucket_reso", "max_bucket_reso", "network_type",
            "mixed_precision", "caption_template"} <= set(fields) - main
    # Server paths are picked from lists the app controls, never typed in.
    assert not {"pretrained_model_name_or_path", "output_dir", "train_data_dir", "class_data_dir"} & set(fields)
    assert all(props.get("info") for _, props, _ in fields.values())  # every field says what it does
    kind, props, _ = fields["mixed_precision"]
    assert kind == "dropdown" and "auto" in [c[1] for c in props["choices"]]  # a fixed set of values is a list
    # An untouched form on the bundled demo model trains with the shipped demo style config (the
    # values that make its style show), the trigger word and preview prompt included.
    values = {name: props["value"] for name, (_, props, _) in fields.items()}
    chosen = TrainConfig.from_dict(form.settings_from_form(values), validate=False).to_dict()
    demo = TrainConfig.from_toml(config_path("demo_style"), validate=False).to_dict()
    differ = {k for k in chosen if chosen[k] != demo[k]}
    assert differ <= set(form.PAGE_SET) | {"seed"}, {k: (chosen[k], demo[k]) for k in differ}
    assert page["tr-preset"][1]["value"] == "style"
    assert page["ds-trigger"][1]["value"] == demo["trigger_word"] == "outlined"
    assert page["pv-prompt"][1]["value"] == "a green circle on a black background, in outlined style"


def _sdxl_folder(target: Path) -> Path:
    """An SDXL base as shared in diffusers layout (listing a model reads its configs, not its weights)."""
    import shutil

    from sdlora.models.shipped import config_dir

    shutil.copytree(config_dir("sdxl"), target)
    return target


def _values(page: dict) -> dict:
    """The page's training form, trigger word and preview prompt as a handler receives them."""
    out = {eid[len("cfg-"):]: props["value"] for eid, (_, props, _) in page.items() if eid.startswith("cfg-")}
    return dict(out, trigger_word=page["ds-trigger"][1]["value"], prompt=page["pv-prompt"][1]["value"])


def _applied(updates: dict) -> dict:
    return next(u for c, u in updates.items() if c.elem_id is None and isinstance(u, dict) and "network_dim" in u)


def test_an_sdxl_base_sets_sdxl_size_buckets_and_rates(tmp_path):
    models = tmp_path / "models"
    xl = str(_sdxl_folder(models / "my-sdxl").resolve())
    app, page = _page(tmp_path / "runs", models)
    labels = dict((v, label) for label, v in page["tr-base"][1]["choices"])
    assert "SDXL" in labels[xl] and "1024" in labels[xl]
    assert labels == dict((v, label) for label, v in page["pv-base"][1]["choices"])
    start = _values(page)
    applied = app.train.applied.value
    updates = app.train.base_changed(xl, "style", applied, **start)
    shown = _shown(updates)
    sdxl = TrainConfig.from_toml(config_path("style_sdxl"), validate=False)
    assert {k: shown.get(k) for k in ("cfg-resolution", "cfg-min_bucket_reso", "cfg-max_bucket_reso",
                                      "cfg-learning_rate", "cfg-text_encoder_lr", "pv-width", "pv-height")} == {
        "cfg-resolution": 1024, "cfg-min_bucket_reso": 512, "cfg-max_bucket_reso": 2048,
        "cfg-learning_rate": 1e-4, "cfg-text_encoder_lr": 5e-6, "pv-width": 1024, "pv-height": 1024}
    # The SDXL style preset replaces the demo model's: its steps, batch, schedule and samples.
    assert (shown["cfg-max_train_steps"], shown["cfg-train_batch_size"], shown["cfg-enable_bucket"]) == (
        sdxl.max_train_steps, sdxl.train_batch_size, True)
    assert shown["ds-trigger"] == "mystyle" and shown["pv-prompt"] == "a house by a lake, in mystyle style"
    # The Preview tab's own base list sets the image size the same way, and picking the LoRA of a run
    # trained on the SDXL base selects that base at its size, with a prompt in the run's trigger word.
    assert _shown(app.preview.size_for_base(xl)) == {"pv-width": 1024, "pv-height": 1024}
    trained_on_xl = TrainConfig(output_name="xl-run", pretrained_model_name_or_path=xl, trigger_word="inky")
    RunDir(tmp_path / "runs" / "xl-run").write_config(trained_on_xl)
    assert _shown(app.preview.base_for_runs(["xl-run"], "demo", start["prompt"])) == {
        "pv-base": xl, "pv-width": 1024, "pv-height": 1024, "pv-prompt": "a house by a lake, in inky style"}
    assert "pv-prompt" not in _shown(app.preview.base_for_runs(["xl-run"], "demo", "my own prompt"))

    # Values the user changed stay when the base changes; the others follow it, back and forth.
    edited = dict(start, max_train_steps=321, learning_rate=3e-4, trigger_word="mine")
    updates = app.train.base_changed(xl, "style", applied, **edited)
    shown = _shown(updates)
    assert not {"cfg-max_train_steps", "cfg-learning_rate", "ds-trigger"} & set(shown)
    assert shown["cfg-resolution"] == 1024 and shown["cfg-train_batch_size"] == sdxl.train_batch_size
    on_xl = dict(edited, **{k[len("cfg-"):]: v for k, v in shown.items() if str(k).startswith("cfg-")})
    back = _shown(app.train.base_changed("demo", "style", _applied(updates), **on_xl))
    assert back["cfg-resolution"] == back["pv-width"] == 64 and back["cfg-train_batch_size"] == 4
    assert "cfg-max_train_steps" not in back and "cfg-learning_rate" not in back
    # With the "Custom" preset only the size and the family's rates follow the base.
    custom = _shown(app.train.base_changed(xl, "custom", applied, **start))
    assert {k for k in custom if str(k).startswith("cfg-")} <= {"cfg-resolution", "cfg-min_bucket_reso",
                                                            "cfg-max_bucket_reso", "cfg-bucket_reso_steps",
                                                            "cfg-learning_rate", "cfg-text_encoder_lr"}


def test_a_page_that_opens_on_an_sdxl_base_starts_with_sdxl_defaults(tmp_path, monkeypatch):
    import sdlora.models.loading as loading

    monkeypatch.setattr(loading, "DEFAULT_BASE", tmp_path / "no-demo-model")  # only the SDXL base is listed
    _sdxl_folder(tmp_path / "models" / "my-sdxl")
    _, page = _page(tmp_path / "runs", tmp_path / "models")
    value = {k: page[k][1]["value"] for k in ("cfg-resolution", "cfg-max_bucket_reso", "cfg-learning_rate",
                                              "cfg-text_encoder_lr", "pv-width", "pv-height")}
    assert value == {"cfg-resolution": 1024, "cfg-max_bucket_reso": 2048, "cfg-learning_rate": 1e-4,
                     "cfg-text_encoder_lr": 5e-6, "pv-width": 1024, "pv-height": 1024}


def test_export_offers_the_runs_checkpoints_and_refuses_others(tmp_path):
    import gradio as gr

    runs = tmp_path / "runs"
    run = RunDir(runs / "r")
    run.write_config(TrainConfig(output_name="r", output_dir=str(runs)))
    for step in (10, 20):
        (run.checkpoints_dir / f"step-{step}").mkdir(parents=True)
        (run.checkpoints_dir / f"step-{step}" / "state.json").write_text("{}")
    app, _ = _page(runs, tmp_path / "models")
    step = next(u for c, u in app.export.export_info("r").items() if c.elem_id == "ex-step")
    assert step["choices"] == [("step-20", "step-20"), ("step-10", "step-10")] and step["value"] == "step-20"
    with pytest.raises(gr.Error, match="step-20, step-10"):
        app.export.export_lora("r", "kohya", "step-15", 0)
    with pytest.raises(gr.Error, match="no final LoRA yet"):
        app.export.export_lora("r", "kohya", "final", 0)
    assert _shown(app.export.export_info("r"))["ex-embedding"] is None  # no learned tokens: no embedding file
    emb = run.path / "embeddings" / "r.safetensors"  # named after the run (no one-word trigger)
    emb.parent.mkdir()
    emb.write_bytes(b"x")
    assert _shown(app.export.export_info("r"))["ex-embedding"] == emb


def test_every_number_of_the_page_has_a_range(tmp_path):
    import gradio as gr

    app, page = _page(tmp_path / "runs", tmp_path / "models")
    numbers = {c.elem_id: c for c in (*app.train.cfg.values(), *app.preview.__dict__.values(),
                                      *app.export.__dict__.values(), *app.tools.__dict__.values())
               if isinstance(c, gr.Number)}
    assert {"cfg-max_train_steps", "cfg-learning_rate", "pv-seed", "pv-steps", "ex-rank", "tl-combine-rank"} <= set(numbers)
    exclusive = {f"cfg-{f['name']}" for f in TrainConfig.field_info() if f.get("min_exclusive")}
    for eid, number in numbers.items():
        lo, hi = number.bounds
        assert hi is not None, eid
        assert lo is not None or eid in exclusive, eid  # "> 0": the config's own check says so
    info = {f["name"]: f for f in TrainConfig.field_info()}
    assert numbers["cfg-max_train_steps"].bounds[1] == info["max_train_steps"]["max"]  # the config's own bound
    assert "1 to 1,000,000" in page["cfg-max_train_steps"][1]["info"]
    # Out of range, typed in or sent through the API: the message names the field's label.
    with pytest.raises(ConfigError, match="out of range; use 1 to 1,000,000"):
        form.settings_from_form({"max_train_steps": 1e99})
    with pytest.raises(UIError, match="Seed: -1 is out of range; use 0 to"):
        form.parse_int(-1, "Seed", 0, form.MAX_SEED)


def test_form_values_become_config_values():
    out = form.settings_from_form({"max_train_steps": 12.0, "learning_rate": "0.001", "train_text_encoder": False,
                                   "sample_prompts": "a cat\n\n a dog "})
    assert out == {"max_train_steps": 12, "learning_rate": 0.001, "train_text_encoder": False,
                   "sample_prompts": ["a cat", "a dog"]}
    with pytest.raises(ConfigError) as e:
        form.settings_from_form({"max_train_steps": 2.5})
    assert e.value.key == "max_train_steps"
    with pytest.raises(ConfigError) as e:
        form.settings_from_form({"network_dim": None})
    assert e.value.key == "network_dim"
    with pytest.raises(ConfigError):
        form.settings_from_form({"pretrained_model_name_or_path": "/etc"})


def test_style_preset_follows_the_base_and_leaves_paths_and_seed(tmp_path):
    models = tmp_path / "models"
    xl = str(_sdxl_folder(models / "my-sdxl").resolve())
    app, page = _page(tmp_path / "runs", models)
    assert [label for label, _ in page["tr-preset"][1]["choices"]] == ["Style", "Subject with prior preservation",
                                                                       "Custom"]
    start = _values(page)
    applied = app.train.applied.value
    # "Subject" then "Style" again on the demo model: the demo style config comes back.
    subject = _shown(app.train.apply_preset("demo", "subject", applied, **start))
    assert subject["cfg-with_prior_preservation"] is True
    assert not {"cfg-seed", "cfg-resolution"} & set(subject)
    back = dict(start, **{k[len("cfg-"):]: v for k, v in subject.items() if str(k).startswith("cfg-")})
    demo = TrainConfig.from_toml(config_path("demo_style"), validate=False)
    shown = _shown(app.train.apply_preset("demo", "style", applied, **back))
    assert shown["cfg-max_train_steps"] == demo.max_train_steps and shown["cfg-learning_rate"] == demo.learning_rate
    # On an SDXL base the shipped SDXL style config applies, at the base's own size.
    style = TrainConfig.from_toml(config_path("style_sdxl"), validate=False)
    shown = _shown(app.train.apply_preset(xl, "style", applied, **start))
    assert (shown["cfg-max_train_steps"], shown["cfg-gradient_checkpointing"]) == (style.max_train_steps, True)
    assert shown["cfg-resolution"] == 1024 and "cfg-seed" not in shown
    assert _shown(app.train.apply_preset("demo", "custom", applied, **start)) == {}


def test_export_says_which_base_the_file_fits(tmp_path):
    runs = tmp_path / "runs"
    RunDir(runs / "on-demo").write_config(TrainConfig(output_name="on-demo", pretrained_model_name_or_path="demo"))
    app, _ = _page(runs, tmp_path / "models")
    text = app.export.where_for("on-demo", str(runs / "on-demo" / "on-demo.safetensors"), "kohya")
    assert "demo model only" in text and "models/Lora" not in text
    from sdlora.ui.tabs.export import where_to_put

    assert "SDXL" in where_to_put("x.safetensors", "kohya", "sdxl") and "models/Lora" in where_to_put(
        "x.safetensors", "kohya", "sd1")


def test_error_messages_name_the_setting():
    title, text = message_for(ConfigError("network_dim", "0 is out of range; must be >= 1"))
    assert title == "Invalid setting" and text.startswith("Rank (network_dim): ") and "out of range" in text
    title, text = message_for(ConfigError("min_bucket_reso", "512 is larger than max_bucket_reso 256"))
    assert text == "Smallest bucket side: 512 is larger than 'Largest bucket side' 256"
    title, text = message_for(RuntimeError("boom"))
    assert title == "Unexpected error" and "boom" in text and "Traceback" not in text


# ---- base models -------------------------------------------------------------------------------
def test_bundled_model_is_preselected_then_the_models_folder(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    import sdlora.models.loading as loading
    from sdlora.ui.context import AppContext
    from sdlora.ui.server import ServerOptions

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "mine")
    (models / "notes.txt").write_text("not a model")
    monkeypatch.setattr(loading, "DEFAULT_BASE", Path(tiny_model_dir))  # stands in for sample_data/demo-model
    ctx = AppContext(ServerOptions(runs_dir=tmp_path / "runs", models_dir=models))
    choices, value = ctx.base_dropdown()
    assert value == "demo"
    assert [v for _, v in choices] == ["demo", str((models / "mine").resolve())]
    assert ctx.check_base("demo") == "demo"
    with pytest.raises(UIError, match="not one of the listed"):
        ctx.check_base(str(tiny_model_dir))  # a real model folder, but not one the app lists
    with pytest.raises(UIError):
        ctx.run_path("../outside")


def test_app_py_help_and_bad_option(capsys):
    from sdlora.ui.server import main as ui_main

    with pytest.raises(SystemExit) as e:
        ui_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--auth", "--runs-dir", "--models-dir", "--max-upload-mb", "--share"):
        assert opt in out
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "app.py"), "--port", "-1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "python app.py: error: --port" in r.stderr and "Traceback" not in r.stderr


def test_sdlora_ui_passes_its_options(capsys):
    from sdlora.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["ui", "--help"])
    assert e.value.code == 0
    assert "--max-upload-mb" in capsys.readouterr().out


# ---- the live panel ----------------------------------------------------------------------------
def test_loss_plot_has_a_smoothed_line_and_samples_say_when_the_next_come(tmp_path):
    from sdlora.ui import runview

    frame = runview.loss_frame([(i, 1.0 if i % 2 else 0.0) for i in range(1, 101)])
    raw = frame[frame.series == runview.RAW]["loss"].tolist()
    smooth = frame[frame.series == runview.SMOOTHED]["loss"].tolist()
    assert len(raw) == len(smooth) == 100
    assert max(smooth[50:]) - min(smooth[50:]) < 0.3 < max(raw) - min(raw)  # calmer than the raw points
    assert runview.sample_label(Path("step-000100-1.png")) == "step 100 #2"
    run = RunDir(tmp_path / "r")
    run.write_config(TrainConfig(output_name="r", sample_every_n_steps=50))
    summary = runview.RunSummary(name="r", state="running", message="", activity="", step=120, total_steps=130,
                                 loss=None, it_per_s=None, eta_s=None, checkpoint=None, lora=None, updated=None,
                                 pid=None)
    assert runview.samples_label(run, summary) == "Newest samples (next at step 130)"
    run.write_config(TrainConfig(output_name="r", sample_every_n_steps=0))
    assert "at the end" in runview.samples_label(run, summary)
