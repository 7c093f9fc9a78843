"""AdaLoRA: the budget schedule reaches the target total rank, PEFT's regulariser gradient,
per-layer ranks in the exported file, exact resume, diffusers round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.lora import LoraSpec, inject_adapters, inspect_file
from sdlora.lora.errors import LoraError
from sdlora.lora.variants.adalora import Schedule, budget_at, orthogonality_grads, schedule
from sdlora.models.tiny import build_tiny_pipeline
from variant_helpers import assert_same_file, assert_step_export_is_the_final_file, diffusers_image, native_preview, resume_from, train_method

# 6 steps: warm-up step 0, budget shrinks over steps 1-3, final allocation at step 4 (tfinal = 2 steps)
ARGS = "network_args={target_rank = 2, tinit = 0.0, tfinal = 0.34, delta_t = 1}"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("adalora")
    return tmp, train_method(tmp, tiny_model_dir, "adalora", ARGS, "learning_rate=3e-2", "text_encoder_lr=3e-2", steps=6, save_every=3)


def test_budget_schedule_reaches_the_target():
    spec = LoraSpec(method="adalora", preset="attn", rank=8, options={"target_rank": 2, "tinit": 0.1, "tfinal": 0.2, "delta_t": 1})
    sched = schedule(spec, 100)
    assert sched == Schedule(total=100, tinit=10, tfinal=20, delta_t=1) and sched.final_step == 80
    pipe = build_tiny_pipeline(seed=0)
    adapter = inject_adapters(pipe.unet, None, spec)
    layers = sum(1 for _ in adapter.layers())
    allocator = adapter.method._start(adapter, 100).allocator  # PEFT's RankAllocator, as training uses it
    assert (allocator.init_bgt, allocator.target_bgt) == (8 * layers, 2 * layers)
    budgets = [budget_at(step, 8 * layers, 2 * layers, sched) for step in range(100)]
    assert budgets[:80] == [allocator.budget_schedule(step)[0] for step in range(80)]
    assert budgets[:11] == [8 * layers] * 11                  # warm-up keeps the initial budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # then it only shrinks ...
    assert budgets[80:] == [2 * layers] * 20                  # ... to the target, final for the last tfinal steps
    assert len(set(budgets[11:80])) > 30                      # cubic, not a step
    assert adapter.method.budget(adapter) == {"init": 8 * layers, "target": 2 * layers, "current": None}
    with pytest.raises(LoraError, match="leave none"):
        schedule(spec, 1)


def test_regulariser_gradient_is_peft_loss_gradient():
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(4, 12, generator=g) * 0.3, "A"), (torch.randn(10, 4, generator=g) * 0.3, "B"),
            (torch.randn(3, 5, generator=g), "A")]
    ours = orthogonality_grads(mats, 0.5)
    params = [m.clone().requires_grad_(True) for m, _ in mats]
    # PEFT's AdaLoraModel.forward: mean over matrices of ||P^T P - I||_F / ||Q Q^T - I||_F, times orth_reg_weight
    loss = torch.zeros(())
    for p, (_, kind) in zip(params, mats):
        cov = p @ p.T if kind == "A" else p.T @ p
        loss = loss + torch.norm(cov - torch.eye(cov.shape[0]), p="fro")
    (loss / len(mats) * 0.5).backward()
    for mine, p in zip(ours, params):
        assert torch.allclose(mine, p.grad, atol=1e-6)


def test_settings_are_checked():
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(LoraError, match="conv_dim"):
        inject_adapters(pipe.unet, None, LoraSpec(method="adalora", preset="full", rank=4, conv_rank=2))
    with pytest.raises(LoraError, match="target_rank"):
        inject_adapters(pipe.unet, None, LoraSpec(method="adalora", rank=4, options={"target_rank": 5}))
    with pytest.raises(LoraError, match="rslora"):
        inject_adapters(pipe.unet, None, LoraSpec(method="adalora", rank=4, rslora=True))


def test_trains_to_the_budget_resumes_exactly_and_loads_in_diffusers(run, tiny_model_dir, tmp_path):
    tmp, result = run
    assert_same_file(result.lora_path, resume_from(result.run_dir, 3, tmp_path / "resumed"))
    assert_step_export_is_the_final_file(result)

    ours, previewer, adapter = native_preview(result.run_dir)
    n_layers = sum(1 for _ in adapter.layers())
    convs = [lay for _, _, lay in adapter.layers() if isinstance(lay.get_base_layer(), torch.nn.Conv2d)]
    assert convs and all(type(lay).__name__ == "SVDConv2d" for lay in convs)  # Conv2d layers take part too
    # the final allocation: exactly target_rank x layers triplets are left, spread unevenly
    kept = [int((lay.lora_E[adapter.name] != 0).sum()) for _, _, lay in adapter.layers()]
    assert sum(kept) == 2 * n_layers and len(set(kept)) > 1
    assert adapter.method.budget(adapter) == {"init": 4 * n_layers, "target": 2 * n_layers, "current": 2 * n_layers}

    info = inspect_file(result.lora_path)
    assert info["method"] == "adalora"
    assert info["network_args"]["target_rank"] == "2" and info["network_args"]["conv_layers"] == "adalora"
    summary = info["metadata"]["sdlora_adalora"]
    assert summary["total_rank"] == summary["target_total_rank"] == 2 * n_layers and summary["final"]
    # the file holds each layer's own final rank (layers pruned to 0 are left out), one alpha
    tensors = load_file(str(result.lora_path))
    file_ranks = sorted(t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight"))
    assert file_ranks == sorted(r for r in kept if r) and sum(file_ranks) == 2 * n_layers
    assert info["alphas"] == [4.0]

    theirs = diffusers_image(tiny_model_dir, result.lora_path)
    assert abs(theirs - ours).max() <= 1e-4
    assert abs(theirs - previewer.generate("a watercolor fox in the snow", seed=11, steps=3, guidance=5.0,
                                           scheduler="DDIM", output="np", scale=0.0)).max() > 1e-2
