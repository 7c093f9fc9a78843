"""LoRA-drop: importance from adapter outputs, the cumulative-threshold rule, layers of a shape
sharing one adapter, optimizer state freed, exact resume (mid-measurement and after the drop)."""

from __future__ import annotations

import pytest
import torch

from sdlora.lora import LoraSpec, inject_adapters, inspect_file
from sdlora.lora.errors import LoraError
from sdlora.lora.variants.lora_drop import importance_plan, unique_trainable
from sdlora.models.tiny import build_tiny_pipeline
from variant_helpers import assert_same_file, assert_step_export_is_the_final_file, diffusers_image, native_preview, resume_from, train_method


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("drop")
    return tmp, train_method(tmp, tiny_model_dir, "lora_drop", "network_args={warmup = 0.5, threshold = 0.6, measure_steps = 2}",
                             "learning_rate=1e-2", "text_encoder_lr=1e-2", steps=6, save_every=2)


def test_threshold_rule_keeps_the_most_important_layers():
    importance = {"a": 5.0, "b": 3.0, "c": 1.0, "d": 1.0}
    assert importance_plan(importance, 0.5) == ["a"]          # 0.5 reached by a alone
    assert importance_plan(importance, 0.6) == ["a", "b"]     # a: 0.5 < 0.6, a+b: 0.8
    assert importance_plan(importance, 0.85) == ["a", "b", "c"]
    assert importance_plan(importance, 1.0) == ["a", "b", "c", "d"]
    assert importance_plan({"a": 0.0, "b": 0.0}, 0.9) == ["a", "b"]  # nothing measured: keep all


def test_measured_importance_sharing_and_freed_optimizer_state():
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, None, LoraSpec(method="lora_drop", preset="attn", rank=2,
                                                        options={"warmup": 0.5, "threshold": 0.5, "measure_steps": 1}))
    method = adapter.method
    opt = torch.optim.AdamW(adapter.param_groups(unet_lr=1e-2))
    n_before = len(unique_trainable(adapter))
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    outputs: dict[str, float] = {}
    for comp, path, layer in adapter.layers():
        def record(module, args, output, label=f"{comp}.{path}", layer=layer):
            outputs[label] = outputs.get(label, 0.0) + float(output.detach().pow(2).sum()) * float(layer.scaling["default"]) ** 2
        layer.lora_B["default"].register_forward_hook(record)
    for step in range(3):
        method.before_step(adapter, step=step, total_steps=4)
        outputs.clear()  # the measurement window is the last warm-up step (step 1) only
        pipe.unet(latents, t, encoder_hidden_states=hidden).sample.pow(2).mean().backward()
        if step == 1:
            measured = dict(outputs)
        opt.step()
        method.after_optimizer_step(adapter, step=step, total_steps=4, optimizer=opt)
        opt.zero_grad()
        if step == 0:
            assert method.plan(adapter) is None
    outputs = measured
    plan = method.plan(adapter)
    assert plan is not None and plan["drop_step"] == 2
    # the plan follows the measured output norms (normalised) and the threshold rule
    total = sum(outputs.values())
    assert plan["importance"] == pytest.approx({k: v / total for k, v in outputs.items()}, rel=1e-6)
    assert set(plan["kept"]) == set(importance_plan(outputs, 0.5))
    layers = {f"{c}.{p}": layer for c, p, layer in adapter.layers()}
    dropped = [m for g in plan["groups"] for m in g]
    assert set(dropped) | set(plan["kept"]) == set(layers) and not set(dropped) & set(plan["kept"])
    for group in plan["groups"]:
        owner = layers[group[0]]
        for member in group:  # one adapter object per group, the most important member's
            assert layers[member].lora_A["default"] is owner.lora_A["default"]
            assert layers[member].lora_B["default"] is owner.lora_B["default"]
        assert plan["importance"][group[0]] == max(plan["importance"][m] for m in group)
    assert len({id(layers[k].lora_A["default"]) for k in plan["kept"]}) == len(plan["kept"])
    # fewer distinct weights, and optimizer state only for the ones still in the model
    live = unique_trainable(adapter)
    assert len(live) < n_before
    assert {id(p) for p in opt.state} == {id(p) for p in live}
    # the exported file gives every sharing layer the group's weights
    weights = adapter.export()
    for group in plan["groups"]:
        first = weights.unet[group[0].split(".", 1)[1]]
        for member in group[1:]:
            assert torch.equal(weights.unet[member.split(".", 1)[1]].up, first.up)


def test_options_are_checked():
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(LoraError, match="warmup"):
        inject_adapters(pipe.unet, None, LoraSpec(method="lora_drop", options={"warmup": 1.0}))
    with pytest.raises(LoraError, match="threshold"):
        inject_adapters(pipe.unet, None, LoraSpec(method="lora_drop", options={"threshold": 0}))


def test_trains_resumes_exactly_and_loads_in_diffusers(run, tiny_model_dir, tmp_path):
    tmp, result = run
    # warm-up 3 steps, measured on steps 1 and 2: resume in the middle of the measurement, and after the drop
    assert_same_file(result.lora_path, resume_from(result.run_dir, 2, tmp_path / "from2"))
    assert_same_file(result.lora_path, resume_from(result.run_dir, 4, tmp_path / "from4"))
    assert_step_export_is_the_final_file(result)

    info = inspect_file(result.lora_path)
    summary = info["metadata"]["sdlora_lora_drop"]  # JSON, decoded by inspect
    assert info["method"] == "lora_drop" and summary["dropped"] and summary["drop_step"] == 3
    assert summary["shared_groups"] > 0 and summary["kept_layers"] > 0
    assert info["network_args"]["drop_threshold"] == "0.6"

    ours, previewer, adapter = native_preview(result.run_dir)
    plan = adapter.method.plan(adapter)
    assert plan is not None and len(plan["kept"]) == summary["kept_layers"]
    theirs = diffusers_image(tiny_model_dir, result.lora_path)
    assert abs(theirs - ours).max() <= 1e-4
    assert abs(theirs - previewer.generate("a watercolor fox in the snow", seed=11, steps=3, guidance=5.0,
                                           scheduler="DDIM", output="np", scale=0.0)).max() > 1e-2
