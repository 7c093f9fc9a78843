"""Speed settings for training (sdlora.train.speed) and the machine measurements (sdlora.train.measure).

The fast layers must compute what the plain layers compute: outputs and input gradients are
compared with the unmodified layer on inputs large enough to take the fast path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlora.train import speed
from sdlora.train.measure import count_flops, measure_matmul_flops
from sdlora.train.speed import FrozenConv2d, FrozenLinear, SpeedOptions, frozen_layers, prepare_for_training, restore

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch build with oneDNN")

BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Net(nn.Module):
    """Frozen layers of the kinds the SD UNet has, each at least MIN_MACS for a batch of 2 at 32x32."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.down = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(128, 256, 1)
        self.linear = nn.Linear(256, 256)
        self.head = nn.Linear(256, 128, bias=False)
        self.lora = nn.Linear(256, 4, bias=False)  # trainable: must stay a plain layer
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.requires_grad_(False)
        self.lora.requires_grad_(True)

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x))
        h = self.proj(self.down(h))                      # [B, 256, H/2, W/2]
        t = h.flatten(2).transpose(1, 2)                 # tokens: [B, HW/4, 256]
        return self.head(torch.nn.functional.gelu(self.linear(t))) + self.lora(t).sum(-1, keepdim=True)


def _run(net, x, precision):
    x = x.clone().requires_grad_(True)
    net.lora.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = net(x)
    y.float().square().mean().backward()
    return y.detach().float(), x.grad.detach().float(), net.lora.weight.grad.detach().clone()


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("memory", ["speed", "low"])
def test_fast_layers_match_plain_layers(precision, memory):
    if precision == "bf16" and not BF16:
        pytest.skip("no native bf16 in oneDNN on this CPU")
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 64, 32, 32)
    y0, gx0, gl0 = _run(net, x, precision)
    report = prepare_for_training(net, None, "cpu", SpeedOptions(memory=memory))
    assert report.frozen_convs == 3 and report.frozen_linears == 2 and report.memory == memory
    assert type(net.lora) is nn.Linear  # trainable layers are left alone
    y1, gx1, gl1 = _run(net, x, precision)
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert _rel(y1, y0) < tol and _rel(gx1, gx0) < tol and _rel(gl1, gl0) < tol
    # The fast path was really taken (caches made) unless low memory leaves fp32 convs plain.
    cached = [m for m in frozen_layers([net]) if m._sdlora_cache.items]
    if precision == "fp32":
        assert not any(isinstance(m, FrozenLinear) for m in cached)  # fp32 Linear needs no cache
        assert (not cached) if memory == "low" else len(cached) == 3
    else:
        assert len(cached) == 5
        assert all(("bwd" in m._sdlora_cache.items) == (memory == "speed") for m in cached if isinstance(m, FrozenConv2d))
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("lora"))
    # A second step on the caches gives the same result again.
    y2, gx2, gl2 = _run(net, x, precision)
    assert torch.equal(y2, y1) and torch.equal(gx2, gx1) and torch.equal(gl2, gl1)


def test_restore_and_state_dict_are_untouched():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prepare_for_training(net, None, "cpu")
    assert isinstance(net.conv, FrozenConv2d) and isinstance(net.conv, nn.Conv2d)
    assert list(net.state_dict()) == list(before)
    _run(net, torch.randn(2, 64, 32, 32), "fp32")
    restore(net)
    assert type(net.conv) is nn.Conv2d and type(net.linear) is nn.Linear and not frozen_layers([net])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_changed_weights_are_repacked_and_no_grad_forwards_drop_caches():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 64, 32, 32)
    prepare_for_training(net, None, "cpu")
    _run(net, x, "bf16" if BF16 else "fp32")
    dtype = torch.bfloat16 if BF16 else torch.float32
    assert net.conv._sdlora_cache.items
    with torch.no_grad():
        net(x)                                   # e.g. a preview with adapters merged into the weights
        net.conv.weight.mul_(2.0)                # weights changed in place
    assert not net.conv._sdlora_cache.items      # the no-grad forward dropped the packs
    y_fast = net.conv(x.requires_grad_(True))
    with speed.suspended():
        y_plain = net.conv(x)
    assert y_fast.dtype == y_plain.dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        y_fast = net.conv(x)
        with speed.suspended():
            y_plain = net.conv(x)
    assert _rel(y_fast.float(), y_plain.float()) < (2e-2 if BF16 else 1e-5)
    # Changing the weight while the cache is held is noticed through its version counter.
    key = net.conv._sdlora_cache.key
    with torch.no_grad():
        net.conv.weight.add_(0.01)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        net.conv(x)
    assert net.conv._sdlora_cache.key != key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_models_train_bit_identically(tiny_pipe, precision):
    """The tiny test models stay below MIN_MACS, and skipping PEFT's fp32 input copy changes no
    value: with attention left alone, the adapter gradients are bit-identical."""
    if precision == "bf16" and not BF16:
        pytest.skip("no native bf16 in oneDNN on this CPU")
    from sdlora.lora import LoraSpec, inject_adapters

    unet = tiny_pipe.unet.requires_grad_(False)
    adapter = inject_adapters(unet, None, LoraSpec(preset="full", rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    latents = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)

    def grads():
        for p in adapter.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(latents, torch.tensor([10]), hidden).sample
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in adapter.parameters()])

    g0 = grads()
    report = prepare_for_training(unet, None, "cpu", SpeedOptions(attention="unchanged"))
    assert report.frozen_convs > 0 and report.lora_layers_without_input_cast > 0
    g1 = grads()
    assert torch.equal(g0, g1)
    assert not any(m._sdlora_cache.items for m in frozen_layers([unet]))
    restore(unet)
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in unet.modules())


def test_adapters_with_dropout_keep_the_input_cast(tiny_pipe):
    from sdlora.lora import LoraSpec, inject_adapters

    unet = tiny_pipe.unet.requires_grad_(False)
    inject_adapters(unet, None, LoraSpec(preset="attn", rank=4, dropout=0.1))
    report = prepare_for_training(unet, None, "cpu")
    assert report.lora_layers_without_input_cast == 0
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in unet.modules())


def test_attention_by_size_matches_sdpa():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    x, ctx = torch.randn(1, 256, 64), torch.randn(1, 77, 32)
    proc = speed.SizeDispatchAttnProcessor()
    for context in (None, ctx):
        attn = Attention(query_dim=64, cross_attention_dim=None if context is None else 32, heads=4,
                         dim_head=16).requires_grad_(False)
        for dtype in (torch.float32, torch.bfloat16) if BF16 else (torch.float32,):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                attn.set_processor(AttnProcessor2_0())
                ref = attn(x, encoder_hidden_states=context)
                attn.set_processor(proc)
                out = attn(x, encoder_hidden_states=context)
            assert _rel(out.float(), ref.float()) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_suspended_and_restore_give_back_the_plain_model(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdlora.lora import LoraSpec, inject_adapters

    unet = tiny_pipe.unet.requires_grad_(False)
    inject_adapters(unet, None, LoraSpec(preset="attn", rank=4))

    def casts():
        return {m.cast_input_dtype_enabled for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled")}

    def processors():
        return {type(p) for p in unet.attn_processors.values()}

    report = prepare_for_training(unet, None, "cpu")
    assert report.attention.startswith("by size") and report.lora_layers_without_input_cast > 0
    assert processors() == {speed.SizeDispatchAttnProcessor} and casts() == {False}
    with speed.suspended(unet):
        assert processors() == {AttnProcessor2_0} and casts() == {True}
    assert processors() == {speed.SizeDispatchAttnProcessor} and casts() == {False}
    restore(unet)
    assert processors() == {AttnProcessor2_0} and casts() == {True} and not frozen_layers([unet])


def test_cuda_device_is_left_alone():
    net = Net()
    report = prepare_for_training(net, None, "cuda")
    assert report.device == "cuda" and not frozen_layers([net]) and "no changes" in report.summary()


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="attention"):
        SpeedOptions(attention="flash")
    with pytest.raises(ValueError, match="memory"):
        SpeedOptions(memory="tiny")


def test_flop_count_is_the_same_on_fast_and_plain_layers():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 64, 32, 32)
    plain = count_flops(lambda: _run(net, x, "fp32"))
    prepare_for_training(net, None, "cpu")
    fast = count_flops(lambda: _run(net, x, "fp32"))
    # conv 64->64 at 32x32, strided conv, 1x1 conv, two Linear layers and the LoRA: forward and input gradients.
    assert plain > 2 * (2 * 64 * 64 * 9 * 32 * 32)
    assert fast == plain


def test_flop_count_includes_cpu_attention():
    q = torch.randn(1, 4, 128, 32)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 4 * 128 * 128 * 32)


def test_matmul_measurement_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    rate = measure_matmul_flops(torch.float32, "cpu", "onednn", n=256, repeat=1)
    assert rate > 0
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="backend"):
        measure_matmul_flops(torch.float32, "cpu", "blas")


def test_this_pytorch_has_the_onednn_ops_the_fast_path_uses():
    assert speed.missing_onednn_ops() == []


def test_a_missing_onednn_op_leaves_the_plain_path_with_one_warning(monkeypatch):
    monkeypatch.setattr(speed, "ONEDNN_OPS", (*speed.ONEDNN_OPS, "_gone_in_a_later_release"))
    heard: list[str] = []
    net = Net()
    report = prepare_for_training(net, None, "cpu", warn=heard.append)
    assert report.frozen_convs == report.frozen_linears == 0 and not frozen_layers([net])
    assert len(heard) == 1 and "_gone_in_a_later_release" in heard[0] and "plain" in heard[0]
    _run(net, torch.randn(2, 64, 32, 32), "fp32")  # trains on the plain layers
    restore(net)


@pytest.mark.parametrize("failing", ["_convolution_pointwise", "_linear_pointwise", "_convolution_transpose_pointwise"])
def test_an_op_failing_at_run_time_falls_back_to_the_plain_result(monkeypatch, failing):
    """A private op whose signature changed fails on its first call: that call and every later one run the
    plain layers (layers before it in that step ran fast: the same to fp32 rounding), the next step gives
    exactly the plain step's result, and the warning comes once."""
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 64, 32, 32)
    plain = _run(net, x, "fp32")
    real_op = speed._op

    def op(name):
        if name == failing:
            def broken(*args, **kwargs):
                raise RuntimeError(f"{name}() got an unexpected argument (a changed signature)")
            return broken
        return real_op(name)

    monkeypatch.setattr(speed, "_op", op)
    heard: list[str] = []
    report = prepare_for_training(net, None, "cpu", SpeedOptions(memory="speed"), warn=heard.append)
    assert report.frozen_convs == 3
    out = _run(net, x, "fp32")
    assert len(heard) == 1 and failing in heard[0], heard
    for a, b in zip(out, plain):
        assert _rel(a, b) < 1e-5
    again = _run(net, x, "fp32")  # from now on the plain path: exactly the plain result
    for a, b in zip(again, plain):
        assert torch.equal(a, b)
    assert len(heard) == 1
    restore(net)


def test_training_with_a_missing_op_or_speed_mode_off_trains_the_same(monkeypatch, tmp_path, tiny_model_dir):
    """The whole trainer on the tiny model: with an op missing it says so once and trains; with
    speed_mode = "off" it trains the plain layers. (The tiny layers are below MIN_MACS: both equal the
    plain path bit for bit.)"""
    from helpers import make_images, tiny_cfg
    from safetensors.torch import load_file

    from sdlora.train import RunDir, train

    data = make_images(tmp_path / "data", n=4)
    off = train(tiny_cfg(tmp_path, data, "off", "max_train_steps=3", "speed_mode=off", model=tiny_model_dir))
    monkeypatch.setattr(speed, "ONEDNN_OPS", (*speed.ONEDNN_OPS, "_gone_in_a_later_release"))
    fallback = train(tiny_cfg(tmp_path, data, "fallback", "max_train_steps=3", model=tiny_model_dir))
    warnings = [e["text"] for e in RunDir(fallback.run_dir).events({"warning"})]
    assert len([w for w in warnings if "_gone_in_a_later_release" in w]) == 1, warnings
    assert any("speed_mode off" in e["text"] for e in RunDir(off.run_dir).events({"message"}))
    a, b = load_file(off.lora_path), load_file(fallback.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
