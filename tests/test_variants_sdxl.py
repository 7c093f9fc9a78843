"""Every adapter method on the tiny SDXL pipeline: adapters on the UNet and both text encoders,
per-encoder learning rates, a training step through the method's hooks, an SDXL file that loads
back to the same outputs; or a clear refusal."""

from __future__ import annotations

import pytest
import torch

from sdlora.lora import LoraError, LoraSpec, inject_adapters, load_lora, method_names, save_lora
from sdlora.models.tiny import build_tiny_sdxl_pipeline

PARTS = ("unet", "text_encoder", "text_encoder_2")


def _inputs(pipe, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, 4, 16, 16, generator=g),
        hidden=torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g),
        pooled=torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
        ids=torch.randint(0, 49407, (1, 77), generator=g),
    )


def _outputs(pipe, x):
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    unet = pipe.unet(x["sample"], 500, x["hidden"], added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": time_ids}).sample
    return unet, pipe.text_encoder(x["ids"])[0], pipe.text_encoder_2(x["ids"]).text_embeds


def _spec(method: str) -> LoraSpec:
    options = {"loraplus_lr_ratio": 4.0} if method == "lora" else {}  # LoRA+: "<part>.down" / "<part>.up" groups
    return LoraSpec(method=method, preset="full", rank=4, alpha=4.0, text_encoder=True, options=options)


#: methods whose exported file equals the trained adapter exactly after one step
EXACT = {"lora", "dora", "lora_fa", "vera", "adalora", "dylora", "lora_drop", "delta_lora", "loha", "lokr"}


@pytest.mark.parametrize("method", method_names())
def test_every_method_on_sdxl_with_two_text_encoders(tmp_path, method):
    torch.set_num_threads(1)
    pipe = build_tiny_sdxl_pipeline(seed=2)
    spec = _spec(method)
    try:
        adapter = inject_adapters(pipe.unet, pipe.text_encoder, spec, text_encoder_2=pipe.text_encoder_2)
    except LoraError as exc:
        # QLoRA needs bitsandbytes' 4-bit path (a CUDA GPU); it must say so, not fail obscurely
        assert method == "qlora" and "bitsandbytes" in str(exc), exc
        return
    assert adapter.components() == list(PARTS)
    assert all(any(True for _ in adapter.layers(part)) for part in PARTS)

    groups = adapter.param_groups(unet_lr=1e-3, text_encoder_lr=1e-4, text_encoder_2_lr=1e-5)
    base_lr = {g["name"].split(".")[0]: g["lr"] for g in groups if not g["name"].endswith(".up")}
    assert base_lr == {"unet": 1e-3, "text_encoder": 1e-4, "text_encoder_2": 1e-5}
    same = adapter.param_groups(unet_lr=1e-3, text_encoder_lr=1e-4)  # the second encoder follows the first
    assert {g["lr"] for g in same if g["name"].startswith("text_encoder_2") and not g["name"].endswith(".up")} == {1e-4}

    optimizer = torch.optim.SGD(groups, lr=1e-3)
    x = _inputs(pipe)
    adapter.method.before_step(adapter, step=0, total_steps=20)
    unet_out, te1, te2 = _outputs(pipe, x)
    (unet_out.square().mean() + te1.square().mean() + te2.square().mean()).backward()
    trained_parts = {part for part in PARTS for _, p in adapter.named_parameters(part) if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained_parts == set(PARTS)
    optimizer.step()
    adapter.method.after_optimizer_step(adapter, step=0, total_steps=20, optimizer=optimizer)
    optimizer.zero_grad()

    weights = adapter.export()
    assert set(weights.counts()) == set(PARTS)
    path = save_lora(weights, tmp_path / f"{method}.safetensors", family="sdxl", dtype="fp32")
    fresh = build_tiny_sdxl_pipeline(seed=2)
    _, report = load_lora(path, fresh.unet, fresh.text_encoder, "x", text_encoder_2=fresh.text_encoder_2)
    assert report.modules == weights.counts() and not report.unknown_keys
    if method in EXACT:
        with torch.no_grad():
            for ours, theirs in zip(_outputs(pipe, x), _outputs(fresh, x)):
                assert torch.allclose(ours, theirs, atol=1e-4), method
