"""sdlora extract: a LoRA from tuned minus base recovers known low-rank differences (Linear, 3x3 conv,
both SDXL text encoders), leaves unchanged layers out and counts them, refuses mixed families."""

from __future__ import annotations

import pytest
import torch

from sdlora.cli import main
from sdlora.lora.targets import base_layer, model_path
from sdlora.models.loading import load_base, save_single_file
from sdlora.models.tiny import save_tiny_model
from sdlora.tools import ToolError, extract_lora
from sdlora.tools._common import ModelCache, read_weights

from tools_helpers import deltas, relative


def _low_rank(shape: tuple[int, ...], rank: int, seed: int, size: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, int(torch.tensor(shape[1:]).prod()), generator=g)
    return (flat * size / flat.std()).reshape(shape)


def _add(base, changes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Add a random difference of the given rank to each ``component.path`` layer; returns them."""
    added = {}
    with torch.no_grad():
        for i, (label, (rank, _)) in enumerate(changes.items()):
            component, path = label.split(".", 1)
            model = getattr(base, component)
            layer = base_layer(model.get_submodule(model_path(model, component, path)))
            delta = _low_rank(tuple(layer.weight.shape), rank, seed=i)
            layer.weight += delta
            added[label] = delta.double()
    return added


CHANGES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (2, 0),
    "unet.down_blocks.1.resnets.0.conv1": (3, 0),
    "text_encoder.encoder.layers.0.self_attn.q_proj": (1, 0),
}


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("extract")
    tuned = load_base(tiny_model_dir)
    added = _add(tuned, CHANGES)
    with torch.no_grad():  # a change far below the threshold: left out, counted, not identical
        layer = tuned.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
        layer.weight[0, 0] += 1e-6
    path = save_single_file(tuned.pipe, folder / "tuned.safetensors")
    return {"base": tiny_model_dir, "tuned": path, "added": added, "folder": folder}


def test_extract_recovers_a_known_low_rank_difference(sd1_pair):
    out = sd1_pair["folder"] / "diff.safetensors"
    report = extract_lora(sd1_pair["base"], sd1_pair["tuned"], out, rank=4, dtype="fp32")
    got = deltas(read_weights(out, ModelCache(sd1_pair["base"])).weights)
    assert set(got) == set(sd1_pair["added"])
    for label, delta in sd1_pair["added"].items():
        assert relative(got[label], delta) < 1e-5, label
    v = report.values
    assert v["extracted"] == 3 and v["overall_error"] < 1e-5
    total = len(report.rows)
    assert v["below_threshold"] == total - 3 and v["identical"] == total - 4
    assert "3 layers" in report.summary and f"{total - 3} layers left out" in report.summary
    kinds = {r[1] for r in report.rows}
    assert {"Linear", "Conv2d 3x3", "Conv2d 1x1"} <= kinds  # the full preset: proj_in/out are 1x1 convs here
    assert any(r[0].startswith("text_encoder.") for r in report.rows)


def test_lower_rank_error_and_conv_rank(sd1_pair, tmp_path):
    report = extract_lora(sd1_pair["base"], sd1_pair["tuned"], tmp_path / "r1.safetensors", rank=1, conv_rank=2,
                          dtype="fp32")
    rows = {r[0]: r for r in report.rows}
    for label, r in (("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1),
                     ("unet.down_blocks.1.resnets.0.conv1", 2)):
        delta = sd1_pair["added"][label]
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        assert rows[label][2] == r
        assert rows[label][4] == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-4)
    assert rows["text_encoder.encoder.layers.0.self_attn.q_proj"][4] < 1e-5  # rank 1 fits rank 1
    # --conv-rank 0: kohya without conv_dim; resnet layers are not looked at
    no_conv = extract_lora(sd1_pair["base"], sd1_pair["tuned"], tmp_path / "noconv.safetensors", rank=2, conv_rank=0)
    assert not any("resnets" in r[0] for r in no_conv.rows) and no_conv.values["extracted"] == 2


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("extract-xl") / "base", family="sdxl")


def test_sdxl_both_text_encoders_and_family_mismatch(sdxl_dir, sd1_pair, tmp_path):
    tuned = load_base(sdxl_dir)
    added = _add(tuned, {"text_encoder_2.encoder.layers.0.mlp.fc1": (2, 0),
                         "text_encoder.encoder.layers.1.self_attn.out_proj": (1, 0),
                         "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (2, 0)})
    tuned.pipe.save_pretrained(tmp_path / "tuned", safe_serialization=True)  # a diffusers folder
    out = tmp_path / "xl.safetensors"
    base = load_base(sdxl_dir)
    report = extract_lora(base, tmp_path / "tuned", out, rank=2, dtype="fp32")
    assert report.values["extracted"] == 3 and report.values["family"] == "sdxl"
    from safetensors.torch import load_file

    names = {k.split(".")[0] for k in load_file(out)}
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v" in names  # SDXL's own (SGM) names
    got = deltas(read_weights(out, ModelCache(base)).weights)
    for label, delta in added.items():
        assert relative(got[label], delta) < 1e-5, label

    with pytest.raises(ToolError, match=r"--base .* is SD 1\.x but --tuned .* is SDXL"):
        extract_lora(sd1_pair["base"], tuned, tmp_path / "x.safetensors", rank=2)  # a loaded model works too
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_extract(sd1_pair, sdxl_dir, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    args = ["extract", "--base", str(sd1_pair["base"]), "--tuned", str(sd1_pair["tuned"]), "--out", str(out)]
    assert main(args + ["--rank", "4", "--conv-rank", "2", "--threshold", "1e-5"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "max |diff|" in printed and "left out with differences of at most 1e-05" in printed
    assert main(args[:-1] + [str(tmp_path / "y.safetensors"), "--rank", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sdlora extract: error: --rank 0: the rank must be a whole number of 1 or more."
    assert main(["extract", "--base", str(sd1_pair["base"]), "--tuned", str(tmp_path / "missing.safetensors"),
                 "--rank", "2", "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["extract", "--base", str(sd1_pair["base"]), "--tuned", str(sdxl_dir), "--rank", "2",
                 "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "SDXL" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()
