"""sdlora resize: fixed rank = best approximation (Conv2d included), kohya's dynamic rank choices on
known spectra, resizing to the file's own rank changes nothing, refusals and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.lora import LoraSpec, LoraWeights, ModuleLora, save_lora
from sdlora.models.shipped import meta_models
from sdlora.tools import ToolError, dynamic_rank, resize_lora, resize_weights
from sdlora.tools._common import read_weights

from tools_helpers import deltas, random_weights, relative

ONLY = r"^(unet\.down_blocks\.0\.(attentions\.0\.transformer_blocks\.0\.attn2|resnets\.0\.conv1)|text_encoder\.encoder\.layers\.0\.self_attn\.q_proj)"


def _module(singular: list[float], out: int, fan_in: int, seed: int = 0, kernel: tuple[int, int] | None = None,
            alpha: float | None = None) -> ModuleLora:
    """A LoRA module whose delta (at scale 1) has exactly these singular values."""
    g = torch.Generator().manual_seed(seed)
    r = len(singular)
    cols = fan_in * (kernel[0] * kernel[1] if kernel else 1)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    alpha = float(r if alpha is None else alpha)
    up = (u * torch.tensor(singular, dtype=torch.float64)) * (r / alpha)  # undo the alpha / rank scale
    down = v.T
    if kernel:
        return ModuleLora(down.float().reshape(r, fan_in, *kernel), up.float().reshape(out, r, 1, 1), alpha)
    return ModuleLora(down.float(), up.float(), alpha)


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def test_dynamic_rank_follows_kohya_definitions():
    s = torch.tensor(SPECTRUM, dtype=torch.float64)
    # sv_ratio=5: values above 8/5 = 1.6 are 8, 4, 2 -> 3, and kohya keeps one more
    assert dynamic_rank(s, 32, "sv_ratio", 5) == 4
    # sv_cumulative=0.9: cumulative shares .508 .762 .889 .952 -> reached at position 3 -> 4 values, +1
    assert dynamic_rank(s, 32, "sv_cumulative", 0.9) == 5
    # sv_fro=0.9: squared shares .750 .938 -> 0.81 reached at position 1 -> 2 values, +1
    assert dynamic_rank(s, 32, "sv_fro", 0.9) == 3
    assert dynamic_rank(s * 0, 32, "sv_fro", 0.9) == 1  # a zero layer gets rank 1
    # kohya clamps the count to n - 1 of the full matrix's n singular values
    assert dynamic_rank(torch.ones(3, dtype=torch.float64), 3, "sv_ratio", 10) == 3
    assert dynamic_rank(torch.ones(3, dtype=torch.float64), 40, "sv_ratio", 10) == 4  # zeros past the LoRA's rank


def test_dynamic_resize_on_known_spectra():
    weights = LoraWeights()
    weights.unet["a.to_q"] = _module(SPECTRUM, 32, 40, seed=1, alpha=3.0)
    weights.unet["a.conv"] = _module(SPECTRUM, 24, 8, seed=2, kernel=(3, 3), alpha=6.0)
    weights.text_encoder["b.q_proj"] = _module([1.0, 1e-3], 16, 16, seed=3)  # sv_cumulative keeps both (+1 capped)
    before = deltas(weights)
    result = resize_weights(weights, dynamic="sv_cumulative=0.9")
    rows = {r[0]: r for r in result.rows}
    assert rows["unet.a.to_q"][2:4] == [6, 5] and rows["unet.a.conv"][2:4] == [6, 5]
    assert rows["text_encoder.b.q_proj"][2:4] == [2, 2]
    s = torch.tensor(SPECTRUM)
    expected_error = float(s[5:].norm() / s.norm())
    after = deltas(result.weights)
    for label in ("unet.a.to_q", "unet.a.conv"):
        assert rows[label][6] == pytest.approx(expected_error, rel=1e-5)
        assert rows[label][5] == pytest.approx(math.sqrt(1 - expected_error**2), rel=1e-6)
        assert relative(after[label], before[label]) == pytest.approx(expected_error, rel=1e-4)
    assert relative(after["text_encoder.b.q_proj"], before["text_encoder.b.q_proj"]) < 1e-6
    assert len({m.alpha for _, _, m in result.weights.items()}) == 1  # one alpha for diffusers' sake
    # the max rank caps every layer; 3x3 convs get their own cap
    capped = resize_weights(weights, 3, dynamic="sv_cumulative=0.9", conv_rank=2)
    assert [r[3] for r in capped.rows] == [3, 2, 2]
    err = math.sqrt(sum(((r[6] or 0) * float(before[r[0]].norm())) ** 2 for r in capped.rows)
                    / sum(float(d.norm()) ** 2 for d in before.values()))
    assert capped.overall_error == pytest.approx(err, rel=1e-5)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resize")
    weights = random_weights(meta_models("sd1"), LoraSpec(preset="full", rank=8, alpha=4.0, conv_rank=4, conv_alpha=2.0,
                                                          text_encoder=True), seed=7, only=ONLY)
    return weights, save_lora(weights, folder / "r8.safetensors", family="sd1", dtype="fp16")


def test_fixed_rank_is_the_best_approximation(sd1_file, tmp_path):
    _, path = sd1_file
    source = deltas(read_weights(path).weights)
    report = resize_lora(path, tmp_path / "r3.safetensors", rank=3, conv_rank=2, dtype="fp32")
    got = deltas(read_weights(report.out).weights)
    assert set(got) == set(source)
    rows = {r[0]: r for r in report.rows}
    for label, delta in source.items():
        rank = 2 if rows[label][1] == "Conv2d 3x3" else 3
        flat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert relative(got[label].reshape(flat.shape), best) < 1e-5, label
        assert rows[label][3] == rank
        assert rows[label][6] == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-4), label
        assert rows[label][4] == pytest.approx(0.5 * rank)  # the layer's scale alpha / rank (0.5 in every layer) is kept
    assert "Conv2d 3x3" in {r[1] for r in report.rows}
    meta = read_weights(report.out).metadata
    assert meta["ss_training_comment"].startswith("dimension is resized from 4/8 to 3 (conv: 2)")
    assert meta["ss_base_model_version"] == "sd_v1"


def test_resizing_to_its_own_rank_changes_nothing(sd1_file, tmp_path):
    _, path = sd1_file
    report = resize_lora(path, tmp_path / "same.safetensors", rank=8)
    assert report.values["changed"] == 0 and report.values["overall_error"] == 0.0
    before, after = load_file(path), load_file(report.out)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key  # bit for bit (fp16 file stays fp16)
    # a dynamic choice whose cap is the file's rank keeps everything (alphas made one value: fp32 rounding)
    dyn = resize_lora(path, tmp_path / "dyn.safetensors", dynamic="sv_fro=1.0", dtype="fp32")
    assert dyn.values["changed"] == 0
    src, out = deltas(read_weights(path).weights), deltas(read_weights(dyn.out).weights)
    for label in src:
        assert relative(out[label], src[label]) < 1e-6


def test_refusals(sd1_file, tmp_path):
    weights, _ = sd1_file
    dora = weights.map_modules(lambda m: ModuleLora(m.down, m.up, m.alpha, torch.ones(1, m.down.shape[1], *([1, 1] if m.is_conv else []))))
    path = save_lora(dora, tmp_path / "dora.safetensors", family="sd1")
    with pytest.raises(ToolError, match="DoRA"):
        resize_lora(path, tmp_path / "x.safetensors", rank=2)
    with pytest.raises(ToolError, match="unknown method"):
        resize_weights(weights, dynamic="sv_max=2")
    with pytest.raises(ToolError, match="share to keep"):
        resize_weights(weights, dynamic="sv_fro=1.5")
    with pytest.raises(ToolError, match="Give --rank R, --dynamic"):
        resize_weights(weights)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_resize(sd1_file, tmp_path, capsys):
    _, path = sd1_file
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(path), "--dynamic", "sv_ratio=4", "--rank", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "rank out" in printed and "sv_ratio=4, max rank 6" in printed
    assert load_file(out)  # a readable file
    assert read_weights(out).metadata["ss_network_dim"] == "Dynamic"
    assert main(["resize", str(path), "--rank", "0", "--out", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sdlora resize: error: --rank 0: the rank must be a whole number of 1 or more."
    assert main(["resize", str(tmp_path / "nope.safetensors"), "--rank", "2", "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["resize", str(path), "--dynamic", "sv_fro", "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "write METHOD=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_other_module_kinds_become_plain_lora():
    """A LoHa layer resized to rank R: the best rank-R approximation of its delta, as plain LoRA."""
    from sdlora.lora.weights import ModuleLoha

    g = torch.Generator().manual_seed(4)
    weights = LoraWeights(method="loha")
    weights.unet["x.conv"] = ModuleLoha(*(torch.randn(s, generator=g) for s in ((8, 2), (2, 36), (8, 2), (2, 36))),
                                        alpha=2.0, shape=(8, 4, 3, 3))
    delta = weights.unet["x.conv"].delta().double().reshape(8, 36)
    u, s, vh = torch.linalg.svd(delta)
    for result in (resize_weights(weights, 3), resize_weights(weights, 3, dynamic="sv_fro=0.999")):
        new = result.weights.unet["x.conv"]
        assert isinstance(new, ModuleLora) and new.is_conv and new.rank == 3
        assert relative(new.delta().reshape(8, 36), (u[:, :3] * s[:3]) @ vh[:3]) < 1e-5
        assert result.rows[0][2] == "LoHa 2" and result.rows[0][6] == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
