"""LoHa and LoKr (LyCORIS): the file's delta is what ComfyUI computes from it, files written by other
tools load, training resumes exactly, the file previews like the trained adapter, SDXL names, bad
options and the diffusers refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sdlora.generate import Previewer
from sdlora.lora import LoraError, LoraFileError, LoraSpec, export_from, inject_adapters, inspect_file, load_lora, save_lora
from sdlora.lora.formats import kohya
from sdlora.lora.targets import base_layer, model_path
from sdlora.lora.variants import get_method
from sdlora.models.tiny import build_tiny_pipeline
from helpers import diffusers_load_checked, fresh_pipeline
from variant_helpers import PREVIEW, PROMPT, assert_same_file, assert_step_export_is_the_final_file, native_preview, resume_from, train_method

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- ComfyUI's formulas, re-implemented from comfy/weight_adapter/loha.py and lokr.py ------------------------
def comfy_loha_delta(t: dict[str, torch.Tensor], alpha: float | None, shape) -> torch.Tensor:
    """``LoHaAdapter.calculate_weight`` (ComfyUI comfy/weight_adapter/loha.py) at strength 1."""
    w1a, w1b, w2a, w2b = (t[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    if "hada_t1" in t:  # cp decomposition
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"].float(), w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"].float(), w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return (m1 * m2).reshape(shape) * scale


def comfy_lokr_delta(t: dict[str, torch.Tensor], alpha: float | None, shape) -> torch.Tensor:
    """``LoKrAdapter.calculate_weight`` (ComfyUI comfy/weight_adapter/lokr.py) at strength 1: the scale is
    alpha / dim only when a factor is decomposed (dim: w2_b's rank, else w1_b's), else 1."""
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"].float(), t["lokr_w2_b"].float(), t["lokr_w2_a"].float())
        else:
            w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def _random_adapter(method: str, rank: int, **options):
    pipe = build_tiny_pipeline(seed=0)
    spec = LoraSpec(method=method, preset="full", rank=rank, alpha=rank * 0.75, text_encoder=True, options=options)
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe, adapter


def _layers(pipe) -> dict[str, nn.Module]:
    """kohya module name -> the base layer of a pipeline (UNet and text encoder)."""
    out = {}
    for name, (component, canonical) in kohya.name_index(pipe.unet, pipe.text_encoder).items():
        model = pipe.unet if component == "unet" else pipe.text_encoder
        out[name] = base_layer(model.get_submodule(model_path(model, component, canonical)))
    return out


def _file_delta(tensors: dict[str, torch.Tensor], name: str, method: str, shape) -> torch.Tensor:
    """ComfyUI's delta of module ``name`` of a file."""
    parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    alpha = float(parts.pop("alpha"))
    return (comfy_loha_delta if method == "loha" else comfy_lokr_delta)(parts, alpha, shape)


def _form(suffixes: set[str], conv: bool) -> str:
    """Which layout a module has, for coverage: e.g. 'lokr conv w1 w2_a/b tucker'."""
    kind = "loha" if any(s.startswith("hada_") for s in suffixes) else "lokr"
    parts = [kind, "conv" if conv else "linear"]
    if kind == "lokr":
        parts += ["w1" if "lokr_w1" in suffixes else "w1_a/b", "w2" if "lokr_w2" in suffixes else "w2_a/b"]
    if "hada_t1" in suffixes or "lokr_t2" in suffixes:
        parts.append("tucker")
    return " ".join(parts)


CASES = [  # (method, rank, options): together every LoHa/LoKr layout on Linear and Conv2d
    ("loha", 2, {}),
    ("loha", 2, {"use_tucker": True}),
    ("lokr", 2, {}),  # w2 decomposed
    ("lokr", 4, {}),  # tiny layers: w1 and w2 both full matrices (scale 1)
    ("lokr", 4, {"decompose_both": True, "factor": 16}),  # w1 decomposed, w2 full
]
EXPECTED_FORMS = {
    "loha linear", "loha conv", "loha conv tucker",
    "lokr linear w1 w2_a/b", "lokr conv w1 w2_a/b", "lokr linear w1 w2", "lokr conv w1 w2",
    "lokr linear w1_a/b w2",
}


def test_file_delta_is_comfyuis_and_what_sdlora_applies(tmp_path):
    """For every layout: the weight change sdlora's loader applies (merged weight - base weight, also at
    scale 0.5) equals ComfyUI's formula on the file's tensors, and the trained adapter's own delta."""
    seen: set[str] = set()
    for i, (method, rank, options) in enumerate(CASES):
        pipe, adapter = _random_adapter(method, rank, **options)
        native = {f"{c}.{p}": layer.get_delta_weight(adapter.name).detach() for c, p, layer in adapter.layers()}
        path = save_lora(adapter, tmp_path / f"{i}.safetensors", dtype="fp32")
        tensors = load_file(str(path))
        fresh = build_tiny_pipeline(seed=0)
        layers = _layers(fresh)
        before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        loaded, report = load_lora(path, fresh.unet, fresh.text_encoder, "file")
        assert loaded.method.name == method and not report.unknown_keys
        for (c, p, _), (c2, p2, _) in zip(adapter.layers(), loaded.layers()):
            assert (c, p) == (c2, p2)
        loaded.merge()
        names = sorted({k.split(".", 1)[0] for k in tensors})
        for scale in (1.0, 0.5):
            if scale != 1.0:
                loaded.set_scale(scale)  # merged layers are re-merged at the new scale
            for name in names:
                layer = layers[name]
                theirs = _file_delta(tensors, name, method, layer.weight.shape)
                applied = layer.weight.detach() - before[name]
                assert torch.allclose(applied, scale * theirs, atol=1e-5, rtol=1e-4), (method, options, name)
                if scale == 1.0:
                    seen.add(_form({k.split(".", 1)[1] for k in tensors if k.startswith(name + ".")}, layer.weight.ndim == 4))
        for key, delta in native.items():  # the file holds the trained delta (LoKr: scale folded where needed)
            name = kohya.module_name(*key.split(".", 1))  # type: ignore[arg-type]
            assert torch.allclose(delta, _file_delta(tensors, name, method, delta.shape), atol=1e-5, rtol=1e-4), key
    assert EXPECTED_FORMS <= seen, EXPECTED_FORMS - seen


def test_a_lycoris_written_file_loads_with_lycoris_scale_rules(tmp_path):
    """A file as LyCORIS's kohya network writes it (no sdlora metadata; a LoKr of two full matrices
    with any alpha: scale 1) loads, inspects and round-trips to the same modules."""
    _, adapter = _random_adapter("lokr", 4)
    path = save_lora(adapter, tmp_path / "ours.safetensors", dtype="fp32")
    tensors = load_file(str(path))
    full = [k.split(".", 1)[0] for k in tensors if k.endswith(".lokr_w2")]
    assert full and all(f"{n}.lokr_w1" in tensors for n in full)
    for name in full:  # LyCORIS writes alpha = dim there, and the tools ignore it; any value must give scale 1
        tensors[f"{name}.alpha"] = torch.tensor(7.0)
    theirs = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(theirs), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": "4",
                                             "ss_network_alpha": "3", "ss_network_args": json.dumps({"algo": "lokr"})})
    info = inspect_file(theirs)
    assert info["network_type"] == "LoKr" and info["method"] == "lokr" and info["diffusers_loads"] is False
    assert info["modules"] == {"unet": 79, "text_encoder": 12} and "ComfyUI" in info["loaders"]
    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    ours, _ = load_lora(path, a.unet, a.text_encoder, "x")
    other, _ = load_lora(theirs, b.unet, b.text_encoder, "x")
    for (c, p, la), (_, _, lb) in zip(ours.layers(), other.layers()):
        assert torch.allclose(la.get_delta_weight("x"), lb.get_delta_weight("x"), atol=1e-6), p
    again = other.export()
    assert again.method == "lokr" and len(again) == 91
    copy = save_lora(again, tmp_path / "again.safetensors", dtype="fp32")
    reread = load_file(str(copy))
    assert set(reread) == set(tensors)
    for key, value in reread.items():
        if not key.endswith(".alpha") or key.split(".", 1)[0] not in full:
            assert torch.equal(value, tensors[key]), key


def test_bad_options_are_refused_with_their_name():
    loha, lokr = get_method("loha"), get_method("lokr")
    for method, kwargs, match in [
        (lokr, {"options": {"factor": 0}}, "'factor' must be -1"),
        (lokr, {"options": {"factor": "4"}}, "'factor' must be -1"),
        (lokr, {"options": {"decompose_both": "yes"}}, "'decompose_both' must be true or false"),
        (loha, {"options": {"use_tucker": 1}}, "'use_tucker' must be true or false"),
        (loha, {"options": {"use_tucker": True, "use_effective_conv2d": False}}, "same setting"),
        (loha, {"options": {"factor": 4}}, "has no option"),
        (lokr, {"options": {"loraplus_lr_ratio": 4.0}}, "has no option"),
        (loha, {"dropout": 0.1}, "network_dropout does not apply to LoHa"),
        (lokr, {"rslora": True}, "use_rslora does not apply to LoKr"),
        (lokr, {"options": {"use_tucker": True}}, "ComfyUI's LoKr loader fails on the Tucker cores"),
    ]:
        with pytest.raises(LoraError, match=match):
            method.validate(LoraSpec(method=method.name, **kwargs))


def test_sdxl_file_names_and_round_trip(tmp_path):
    from sdlora.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=2)
    spec = LoraSpec(method="loha", preset="full", rank=2, alpha=2.0, text_encoder=True, options={"use_tucker": True})
    adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec, text_encoder_2=pipe.text_encoder_2)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.add_(0.05)
    path = save_lora(adapter, tmp_path / "xl.safetensors", family="sdxl", dtype="fp32")
    keys = list(load_file(str(path)))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") and k.endswith(".hada_w1_a") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".hada_t1") for k in keys)
    assert not any("down_blocks" in k or "lora_down" in k for k in keys)
    info = inspect_file(path)
    assert info["network_type"] == "LoHa" and info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    fresh = build_tiny_sdxl_pipeline(seed=2)
    loaded, report = load_lora(path, fresh.unet, fresh.text_encoder, "x", text_encoder_2=fresh.text_encoder_2)
    assert report.modules == adapter.export().counts() and not report.unknown_keys
    for (_, p, la), (_, _, lb) in zip(adapter.layers(), loaded.layers()):
        assert torch.allclose(la.get_delta_weight(adapter.name), lb.get_delta_weight("x"), atol=1e-6), p


# ---- trained with the real trainer --------------------------------------------------------------------------
RUNS = {
    "loha": ("network_args={use_tucker = true}",),
    "lokr": ("network_args={factor = -1, decompose_both = false}", "network_dim=2", "conv_dim=2", "network_alpha=2"),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory, tiny_model_dir):
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    return method, tmp, train_method(tmp, tiny_model_dir, method, "learning_rate=1e-2", "text_encoder_lr=1e-2", *RUNS[method])


def test_trains_resumes_exactly_and_previews_from_its_file(run, tiny_model_dir, tmp_path):
    method, tmp, result = run
    assert_same_file(result.lora_path, resume_from(result.run_dir, 2, tmp_path / "resumed"))
    assert_step_export_is_the_final_file(result)

    info = inspect_file(result.lora_path)
    title = {"loha": "LoHa", "lokr": "LoKr"}[method]
    assert info["method"] == method and info["network_type"] == title and info["network_module"] == "lycoris.kohya"
    assert info["network_args"]["algo"] == method and info["modules"] == {"unet": 79, "text_encoder": 12}
    with safe_open(str(result.lora_path), framework="pt") as f:
        prefix = "hada_" if method == "loha" else "lokr_"
        assert all(k.split(".", 1)[1].startswith(prefix) or k.endswith(".alpha") for k in f.keys())

    # the file previews like the trained adapter, and scale 0 is the base model
    ours, previewer, _ = native_preview(result.run_dir)
    file_previewer = Previewer(fresh_pipeline(tiny_model_dir))
    file_previewer.load_lora(result.lora_path)
    assert np.abs(file_previewer.generate(PROMPT, **PREVIEW) - ours).max() <= 1e-4
    base = previewer.generate(PROMPT, **PREVIEW, scale=0.0)  # the run's base model with the adapter at scale 0
    assert np.abs(file_previewer.generate(PROMPT, **PREVIEW, scale=0.0) - base).max() == 0
    assert np.abs(ours - base).max() > 1e-3  # it learned something

    # diffusers cannot hold it: a one-line refusal naming what to use; --rank R gives a plain LoRA it loads
    with pytest.raises(LoraFileError, match=f"^{title} weights cannot be written in the diffusers/PEFT layout.*A1111/Forge and ComfyUI") as err:
        export_from(result.lora_path, fmt="diffusers", out=tmp_path / "d.safetensors", base=tiny_model_dir)
    assert "\n" not in str(err.value)
    plain = export_from(result.lora_path, rank=2, out=tmp_path / "r2.safetensors", dtype="fp32", base=tiny_model_dir)
    diffusers_load_checked(fresh_pipeline(tiny_model_dir), plain)  # diffusers reads kohya LoRA files
    plain_info = inspect_file(plain)
    assert plain_info["network_type"].startswith("LoCon") and plain_info["method"] == "lora"
    assert 0 <= float(plain_info["metadata"]["sdlora_svd_rel_error"]) < 1
    assert plain_info["metadata"]["sdlora_svd_from"] == method


def test_mixed_with_lora_files_in_one_model(tmp_path):
    """LoRA, LoHa and LoKr files previewed together (nested PEFT layers) add up their deltas; a LoRA file
    after a LoHa/LoKr one is refused with the order to use (PEFT cannot wrap their Conv2d layers)."""
    from sdlora.lora import control

    files, deltas = {}, {}
    for method in ("lora", "loha", "lokr"):
        _, adapter = _random_adapter(method, 2)
        files[method] = save_lora(adapter, tmp_path / f"{method}.safetensors", dtype="fp32")
        deltas[method] = {(c, p): layer.get_delta_weight(adapter.name).detach() for c, p, layer in adapter.layers()}
    pipe, ref = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    for method in ("lora", "loha", "lokr"):
        load_lora(files[method], pipe.unet, pipe.text_encoder, method)
        for (component, path), delta in deltas[method].items():
            model = ref.unet if component == "unet" else ref.text_encoder
            with torch.no_grad():
                base_layer(model.get_submodule(model_path(model, component, path))).weight.add_(delta)
    control.set_adapters([pipe.unet, pipe.text_encoder], {"lora": 1.0, "loha": 1.0, "lokr": 1.0})
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 10
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        theirs = ref.unet(x, t, ref.text_encoder(ids)[0]).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    with pytest.raises(LoraError, match="Load LoRA files first"):
        load_lora(files["lora"], pipe.unet, pipe.text_encoder, "late")
