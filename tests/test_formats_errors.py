"""Bad LoRA files fail with errors that name the file and say what to do."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdlora.lora import LoraError, LoraFileError, LoraSpec, inject_adapters, inspect_file, load_lora, read_lora_file, save_lora
from sdlora.lora.formats import convert_lora_file



@pytest.fixture()
def good_file(tiny_pipe, tmp_path):
    adapter = inject_adapters(tiny_pipe.unet, tiny_pipe.text_encoder, LoraSpec(preset="attn", rank=2, text_encoder=True))
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.fill_(0.01)
    return save_lora(adapter, tmp_path / "good.safetensors", dtype="fp32")


def test_missing_file(tmp_path, tiny_pipe):
    missing = tmp_path / "nope.safetensors"
    for call in (lambda: inspect_file(missing), lambda: load_lora(missing, tiny_pipe.unet, tiny_pipe.text_encoder)):
        with pytest.raises(LoraFileError, match="not found") as err:
            call()
        assert str(missing) in str(err.value)


def test_not_a_safetensors_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not tensors\n" * 20)
    with pytest.raises(LoraFileError, match="not a readable .safetensors file") as err:
        read_lora_file(text)
    assert str(text) in str(err.value)
    pickle_file = tmp_path / "old.ckpt"
    pickle_file.write_bytes(b"\x80\x04fake pickle")
    with pytest.raises(LoraFileError, match="pickle"):
        read_lora_file(pickle_file)
    other = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(other))
    with pytest.raises(LoraFileError, match="not a LoRA"):
        read_lora_file(other)


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match="truncated") as err:
        inspect_file(cut)
    assert "cut.safetensors" in str(err.value)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(LoraFileError):
        read_lora_file(tiny)


def test_method_that_cannot_be_applied_and_stray_keys(tmp_path, tiny_pipe):
    # LoHa and LoKr files are applied (test_variants_lycoris.py); LyCORIS's OFT is not
    oft = tmp_path / "oft.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(2.0)},
        str(oft),
        metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "diag-oft"}'},
    )
    assert inspect_file(oft)["network_type"] == "OFT"
    with pytest.raises(LoraFileError, match="OFT"):
        load_lora(oft, tiny_pipe.unet, tiny_pipe.text_encoder)
    assert not any(hasattr(m, "lora_A") for m in tiny_pipe.unet.modules())

    half = tmp_path / "half.safetensors"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 32)}, str(half))
    with pytest.raises(LoraFileError, match="lacks its lora_down or lora_up"):
        load_lora(half, tiny_pipe.unet, None)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight": torch.ones(2, 3072),
               "lora_unet_single_transformer_blocks_0_attn_to_q.lora_up.weight": torch.ones(3072, 2)}, str(foreign))
    with pytest.raises(LoraFileError, match="none of its 2 keys matches a layer"):
        load_lora(foreign, tiny_pipe.unet, tiny_pipe.text_encoder)


def test_shape_mismatch_on_tiny_model(good_file, tmp_path):
    """A file for a model with another width fails naming the first mismatching key."""
    from diffusers import UNet2DConditionModel

    from sdlora.lora import LoraShapeMismatchError
    from sdlora.models.tiny import build_tiny_pipeline, tiny_unet_config

    wider = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=64))
    with pytest.raises(LoraShapeMismatchError) as err:
        load_lora(good_file, wider, build_tiny_pipeline(0).text_encoder)
    message = str(err.value)
    assert "'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight'" in message
    assert "good.safetensors" in message and "[2, 32]" in message and "[2, 64]" in message


def test_save_errors_and_atomic_write(tiny_pipe, tmp_path, good_file):
    adapter = inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attn", rank=2), "other")
    with pytest.raises(LoraFileError, match="fp32, fp16, bf16"):
        save_lora(adapter, tmp_path / "x.safetensors", dtype="int8")
    with pytest.raises(LoraFileError, match="kohya, diffusers"):
        save_lora(adapter, tmp_path / "x.safetensors", format="ckpt")  # type: ignore[arg-type]
    with pytest.raises(LoraFileError, match="end in .safetensors"):
        save_lora(adapter, tmp_path / "x.pt")
    # Overwriting keeps the old file until the new one is complete; no temp files remain.
    before = good_file.read_bytes()
    save_lora(adapter, good_file, dtype="fp16")
    assert good_file.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]


def test_convert_between_formats(good_file, tmp_path):
    from sdlora.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    out, unknown = convert_lora_file(good_file, tmp_path / "as_diffusers", to="diffusers", unet=pipe.unet,
                                     text_encoder=pipe.text_encoder, dtype="fp32")
    assert unknown == [] and out.name == "pytorch_lora_weights.safetensors"
    back, _ = convert_lora_file(out, tmp_path / "back.safetensors", to="kohya", unet=pipe.unet,
                                text_encoder=pipe.text_encoder, dtype="fp32")
    a, b = inspect_file(good_file), inspect_file(back)
    assert (a["modules"], a["layers"], a["rank"], a["alpha"]) == (b["modules"], b["layers"], b["rank"], b["alpha"])
    from safetensors.torch import load_file

    first, second = load_file(str(good_file)), load_file(str(back))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_preset_lists_allowed(tiny_pipe):
    with pytest.raises(LoraError) as err:
        inject_adapters(tiny_pipe.unet, None, LoraSpec(preset="attention"))
    assert "Unknown LoRA target preset 'attention'" in str(err.value)
    assert "attn, attn-mlp, full" in str(err.value)
