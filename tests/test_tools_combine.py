"""sdlora combine: the weighted sum of LoRAs, exact by rank concatenation or best rank R by SVD, from
files alone (no base model for SD-sized files), with the errors reported against the math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.generate import Previewer
from sdlora.lora import LoraSpec, save_lora
from sdlora.models.shipped import meta_models
from sdlora.tools import ToolError, combine_loras, combine_weights
from sdlora.tools._common import read_weights

from tools_helpers import deltas, random_weights, relative

ONLY = r"^unet\.down_blocks\.(0|1\.attentions\.0\.transformer_blocks\.0\.attn2)\."


@pytest.fixture(scope="module")
def sd1_meta():
    return meta_models("sd1")


@pytest.fixture(scope="module")
def pair(sd1_meta):
    """Two SD 1.x-sized LoRAs with different ranks, alphas and module sets (A: LoCon + text encoder,
    B: attention only, some of it where A has nothing)."""
    a = random_weights(sd1_meta, LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                                          text_encoder=True), seed=1,
                       only=r"^(unet\.down_blocks\.0\.(attentions\.0|resnets\.0|downsamplers)\.|text_encoder\.encoder\.layers\.0\.(self_attn\.q_proj|mlp\.fc1))")
    b = random_weights(sd1_meta, LoraSpec(preset="attn", rank=8, alpha=4.0), seed=2, only=ONLY)
    return a, b


def test_exact_combination_is_the_weighted_sum(pair):
    a, b = pair
    combined = combine_weights([(a, 0.7), (b, -1.2)])
    da, db, dc = deltas(a), deltas(b), deltas(combined.weights)
    assert set(dc) == set(da) | set(db) and set(da) - set(db) and set(db) - set(da)  # the union of modules
    for label, delta in dc.items():
        expected = 0.7 * da.get(label, 0) + -1.2 * db.get(label, 0)
        assert relative(delta, expected) < 1e-6, label
    ranks = {f"{c}.{p}": m.rank for c, p, m in combined.weights.items()}
    for label in dc:
        assert ranks[label] == sum(m.rank for ws in (a, b) for c, p, m in ws.items() if f"{c}.{p}" == label)
    assert len({m.alpha for _, _, m in combined.weights.items()}) == 1  # one alpha: every loader reads the scale alike
    assert combined.overall_error is None and all(r[5] is None for r in combined.rows)


def test_rank_r_is_the_best_approximation_with_its_error(pair):
    a, b = pair
    rank = 3
    combined = combine_weights([(a, 0.7), (b, -1.2)], rank)
    da, db, dc = deltas(a), deltas(b), deltas(combined.weights)
    rows = {r[0]: r for r in combined.rows}
    total = tail = 0.0
    checked = 0
    for label, delta in dc.items():
        exact = 0.7 * da.get(label, 0) + -1.2 * db.get(label, 0)
        flat = exact.reshape(exact.shape[0], -1)
        norm = float(flat.norm())
        total += norm**2
        tail += (rows[label][5] * norm) ** 2
        if flat.numel() > 1_000_000:  # the text encoder's MLP: a full SVD here takes seconds
            continue
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert relative(delta.reshape(flat.shape), best) < 1e-6, label
        error = float((flat - best).norm() / flat.norm())
        assert rows[label][5] == pytest.approx(error, rel=1e-6, abs=1e-6), label
        assert rows[label][4] == min(rank, int((s > 1e-6 * s[0]).sum()))
        checked += 1
    assert checked >= len(dc) - 2
    assert combined.overall_error == pytest.approx(math.sqrt(tail / total), rel=1e-6)
    assert 0.1 < combined.overall_error < 0.9
    # a layer of total rank <= R (A's 3x3 convs alone: rank 2) is exact
    conv = [r for r in combined.rows if r[1] == "Conv2d 3x3"]
    assert conv and all(r[5] == 0.0 and r[4] == 2 for r in conv)


def test_files_without_base_model(pair, tmp_path):
    a, b = pair
    fa = save_lora(a, tmp_path / "a.safetensors", family="sd1", dtype="fp32", metadata={"ss_resolution": "(512, 512)"})
    fb = save_lora(b, tmp_path / "b", format="diffusers", dtype="fp32")
    out = tmp_path / "ab.safetensors"
    report = combine_loras([f"{fa}:0.7", (fb, -1.2)], out)
    assert report.out == out and "ranks concatenated (exact)" in report.summary
    back = read_weights(out).weights  # named on SD 1.x's own module tree, no base model
    expected = deltas(combine_weights([(a, 0.7), (b, -1.2)]).weights)
    got = deltas(back)
    assert set(got) == set(expected)
    for label in got:
        assert relative(got[label], expected[label]) < 1e-6
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "a.safetensors x0.7" in meta["ss_training_comment"] and "x-1.2" in meta["ss_training_comment"]
    assert {v.dtype for k, v in load_file(out).items() if not k.endswith("alpha")} == {torch.float32}

    r2 = combine_loras([f"{fa}:0.7", f"{fb}:-1.2"], tmp_path / "ab2.safetensors", rank=2)
    assert "relative error (Frobenius) overall" in r2.summary
    assert r2.values["overall_error"] == pytest.approx(combine_weights([(a, 0.7), (b, -1.2)], 2).overall_error, rel=1e-5)


def test_refusals(pair, tmp_path):
    a, _ = pair
    sd2 = random_weights(meta_models("sd2"), LoraSpec(preset="attn", rank=2), seed=3, only=r"down_blocks\.1\.attentions\.0")
    f1 = save_lora(a, tmp_path / "sd1.safetensors", family="sd1")
    f2 = save_lora(sd2, tmp_path / "sd2.safetensors", family="sd2")
    with pytest.raises(ToolError, match=r"sd1\.safetensors is made for SD 1\.x.*sd2\.safetensors for SD 2\.x"):
        combine_loras([f1, f2], tmp_path / "x.safetensors")
    dora = a.map_modules(lambda m: type(m)(m.down, m.up, m.alpha, torch.ones(1, m.down.shape[1], *([1, 1] if m.is_conv else []))))
    fd = save_lora(dora, tmp_path / "dora.safetensors", family="sd1")
    with pytest.raises(ToolError, match="DoRA"):
        combine_loras([f1, fd], tmp_path / "x.safetensors", rank=4)
    with pytest.raises(ToolError, match="rank must be a whole number of 1 or more"):
        combine_loras([f1], tmp_path / "x.safetensors", rank=0)
    assert not (tmp_path / "x.safetensors").exists()


def test_combined_file_in_diffusers_and_preview_equals_the_pair(tmp_path, tiny_model_dir):
    """Ranks that differ per layer (4 + 3, conv 2) and one alpha: diffusers and the preview read the
    combined file as the two files at their weights."""
    from diffusers import StableDiffusionPipeline

    from helpers import diffusers_load_checked

    from sdlora.models.loading import load_base

    base = load_base(tiny_model_dir)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    a = random_weights(models, LoraSpec(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True), seed=4)
    b = random_weights(models, LoraSpec(preset="attn", rank=3, alpha=1.0), seed=5)
    fa = save_lora(a, tmp_path / "a.safetensors", dtype="fp32")
    fb = save_lora(b, tmp_path / "b.safetensors", dtype="fp32")
    out = tmp_path / "ab.safetensors"
    combine_loras([f"{fa}:0.8", f"{fb}:0.6"], out, base=base)

    kw = dict(seed=2, steps=2, width=32, height=32, guidance=5.0, scheduler="ddim", output="np")
    prev = Previewer(base)
    prev.set_loras([(fa, 0.8), (fb, 0.6)])
    pair_image = prev.generate("a red circle", **kw)
    prev.set_loras([(out, 1.0)])
    combined_image = prev.generate("a red circle", **kw)
    prev.set_loras([])
    base_image = prev.generate("a red circle", **kw)
    assert np.abs(pair_image - base_image).max() > 0.05
    assert np.abs(combined_image - pair_image).max() < 1e-4

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    diffusers_load_checked(pipe, out)
    theirs = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(2)).images
    assert np.abs(theirs - combined_image).max() < 1e-3


def test_cli_combine(pair, tmp_path, capsys):
    a, b = pair
    fa = save_lora(a, tmp_path / "a.safetensors", family="sd1")
    fb = save_lora(b, tmp_path / "b.safetensors", family="sd1")
    out = tmp_path / "c.safetensors"
    assert main(["combine", f"{fa}:0.5", str(fb), "--out", str(out), "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "rel. error" in printed and "relative error (Frobenius) overall" in printed
    assert main(["combine", f"{fa}:0.5", str(fb), "--out", str(tmp_path / "d.safetensors"), "--rank", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora combine: error: --rank 0") and len(err.splitlines()) == 1
    assert main(["combine", f"{fa}:x1", "--out", str(tmp_path / "d.safetensors")]) == 1
    assert "'x1' is not a weight" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()


def test_other_module_kinds_combine_by_svd_only():
    """A LoHa layer (delta = Hadamard product of two rank-r products) adds through its delta()."""
    from sdlora.lora.weights import LoraWeights, ModuleLoha, ModuleLora

    g = torch.Generator().manual_seed(9)
    loha = LoraWeights()
    loha.unet["x.to_q"] = ModuleLoha(*(torch.randn(s, generator=g) for s in ((12, 2), (2, 10), (12, 2), (2, 10))),
                                     alpha=1.0, shape=(12, 10))
    plain = LoraWeights()
    plain.unet["x.to_q"] = ModuleLora(torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g), 1.5)
    with pytest.raises(ToolError, match=r"LoHa module.*Give --rank R"):
        combine_weights([(loha, 1.0), (plain, 0.5)])
    combined = combine_weights([(loha, 1.0), (plain, 0.5)], 5)
    exact = loha.unet["x.to_q"].delta().double() + 0.5 * plain.unet["x.to_q"].delta().double()
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert relative(combined.weights.unet["x.to_q"].delta(), best) < 1e-6
    assert combined.rows[0][3] == "LoHa 2+3" and combined.rows[0][5] == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-6)
