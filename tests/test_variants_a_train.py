"""DoRA, LoRA-FA and VeRA trained with the real trainer on the tiny model, exported as kohya files, and
applied by a fresh diffusers pipeline (LoRA-FA, VeRA) or by the A1111/ComfyUI DoRA formula (DoRA,
which diffusers 0.42.1 cannot load: see ``test_dora_file``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from sdlora.generate import Previewer, make_scheduler
from sdlora.lora import inspect_file
from sdlora.train.samples import sample_prompts
from sdlora.train.loop import train
from helpers import a1111_dora_weight, captured_messages, diffusers_load_checked, fresh_pipeline, make_images, tiny_cfg
from variant_helpers import assert_step_export_is_the_final_file

COMMON = ("max_train_steps=3", "save_every_n_steps=0", "learning_rate=1e-2", "text_encoder_lr=5e-3", "sample_steps=3")
#: the trainer's preview PNG against a CPU diffusers image: rounding only, unless training ran on a GPU
#: (cuDNN convolutions use TF32 by default there, so the two runs differ by more than rounding)
PNG_TOLERANCE = 12 if torch.cuda.is_available() else 1


def _train(tmp_path: Path, model_dir: Path, name: str, *extra: str):
    data = make_images(tmp_path / "data", n=2)
    cfg = tiny_cfg(tmp_path, data, name, *COMMON, *extra, model=model_dir)
    result = train(cfg)
    assert result.state == "done" and result.lora_path.is_file()
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    assert samples, "the trainer writes its final preview"
    return cfg, result, np.asarray(Image.open(samples[-1]).convert("RGB")).astype(np.int16)


def _generate(pipe, cfg) -> np.ndarray:
    """What the trainer's preview (``Previewer.generate``) does, on a plain diffusers pipeline."""
    pipe.scheduler = make_scheduler(cfg.sample_sampler, pipe.scheduler.config)
    return pipe(prompt=sample_prompts(cfg)[:1], negative_prompt=cfg.sample_negative_prompt or None,
                num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance, width=cfg.resolution,
                height=cfg.resolution, generator=[torch.Generator("cpu").manual_seed(cfg.sample_seed)],
                output_type="np").images[0]


def _preview(model_dir: Path, path: Path, cfg, scale: float = 1.0) -> np.ndarray:
    """sdlora's own preview of the file (our loader, a fresh copy of the base)."""
    previewer = Previewer(fresh_pipeline(model_dir))
    previewer.load_lora(path)
    return previewer.generate(sample_prompts(cfg)[0], seed=cfg.sample_seed, steps=cfg.sample_steps,
                              guidance=cfg.sample_guidance, scheduler=cfg.sample_sampler, width=cfg.resolution,
                              height=cfg.resolution, scale=scale, output="np")[0]


def _as_png(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.int16)  # diffusers' numpy_to_pil rounding


@pytest.mark.parametrize(
    "method, extra, module, args",
    [
        ("lora_fa", ("loraplus_lr_ratio=4",), "networks.lora_fa", {"conv_dim": "4", "conv_alpha": "4"}),
        ("vera", ("network_args={projection_seed = 5, d_initial = 0.2}", "network_dim=8", "conv_dim=8", "network_alpha=8",
                  "conv_alpha=8", "learning_rate=5e-2"), "networks.lora", {"algo": "vera", "projection_seed": "5", "d_initial": "0.2",
                                                      "conv_dim": "8", "conv_alpha": "8"}),
    ],
)
def test_trained_file_loads_in_fresh_diffusers_and_matches_the_preview(method, extra, module, args, tmp_path, tiny_model_dir):
    cfg, result, trained_png = _train(tmp_path, tiny_model_dir, method, f"network_type={method}", *extra)
    info = inspect_file(result.lora_path)
    assert info["method"] == method and info["network_module"] == module and info["network_args"] == args
    assert info["metadata"]["sdlora_method"] == method

    base = _generate(fresh_pipeline(tiny_model_dir), cfg)
    pipe = fresh_pipeline(tiny_model_dir)
    diffusers_load_checked(pipe, result.lora_path)
    theirs = _generate(pipe, cfg)
    assert np.abs(theirs - base).max() > 2e-2  # the trained adapter changes the picture
    assert np.abs(_as_png(theirs) - trained_png).max() <= PNG_TOLERANCE  # = the trainer's own final preview
    ours = _preview(tiny_model_dir, result.lora_path, cfg)
    assert np.abs(ours - theirs).max() <= 1e-4

    # `sdlora export --step` of the last checkpoint writes the final file again: LoRA-FA checkpoints are
    # plain LoRA weights, VeRA ones are restored into the base model and exported by the method.
    exported = assert_step_export_is_the_final_file(result)
    assert inspect_file(exported)["method"] == method and inspect_file(exported)["network_module"] == module


def _apply_a1111_dora(pipe, tensors: dict[str, torch.Tensor], multiplier: float) -> int:
    """Patch a plain diffusers pipeline's weights the way A1111/ComfyUI apply a kohya DoRA file."""
    targets: dict[str, nn.Module] = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        for name, layer in model.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                targets[prefix + name.removeprefix("text_model.").replace(".", "_")] = layer
    names = {key.split(".", 1)[0] for key in tensors}
    with torch.no_grad():
        for name in names:
            layer = targets[name]  # every module of the file names a layer of the model
            layer.weight.copy_(a1111_dora_weight(
                layer.weight, tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float(),
                float(tensors[f"{name}.alpha"]), tensors[f"{name}.dora_scale"].float(), multiplier))
    return len(names)


def test_dora_file(tmp_path, tiny_model_dir):
    """DoRA + LoRA+ + rsLoRA trained, exported with dora_scale, applied as A1111/ComfyUI do.

    diffusers 0.42.1 cannot load it: ``StableDiffusionLoraLoaderMixin.lora_state_dict`` logs "It seems like you
    are using a DoRA checkpoint that is not compatible in Diffusers at the moment" and drops every
    ``dora_scale`` key before converting the file (``_convert_non_diffusers_lora_to_diffusers`` would map them to
    PEFT ``lora_magnitude_vector``s, whose per-output-row norm differs from A1111's per-input-column norm anyway),
    so a fresh diffusers pipeline applies plain LoRA. The test shows that, then checks the file against an
    independent implementation of the A1111/ComfyUI formula on a fresh diffusers pipeline's weights.
    """
    cfg, result, trained_png = _train(tmp_path, tiny_model_dir, "dora", "network_type=dora", "loraplus_lr_ratio=4",
                                      "use_rslora=true")
    info = inspect_file(result.lora_path)
    assert info["method"] == "dora" and info["network_type"] == "DoRA" and info["network_module"] == "lycoris.kohya"
    assert info["metadata"]["sdlora_spec"]["rslora"] is True
    tensors = load_file(str(result.lora_path))
    rank = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0]
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == pytest.approx(4.0 * rank**0.5)

    dropped = fresh_pipeline(tiny_model_dir)
    with captured_messages() as messages:
        dropped.load_lora_weights(str(result.lora_path))
    assert any("DoRA checkpoint that is not compatible in Diffusers" in m for m in messages), messages
    assert np.abs(_as_png(_generate(dropped, cfg)) - trained_png).max() > 1  # plain LoRA is not the DoRA result

    for scale in (1.0, 0.5):
        a1111 = fresh_pipeline(tiny_model_dir)
        assert _apply_a1111_dora(a1111, tensors, scale) == sum(1 for k in tensors if k.endswith(".dora_scale"))
        theirs = _generate(a1111, cfg)
        ours = _preview(tiny_model_dir, result.lora_path, cfg, scale=scale)
        assert np.abs(ours - theirs).max() <= 1e-4, scale
        if scale == 1.0:
            assert np.abs(_as_png(theirs) - trained_png).max() <= PNG_TOLERANCE  # = the trainer's own final preview
            assert np.abs(theirs - _generate(fresh_pipeline(tiny_model_dir), cfg)).max() > 2e-2


def _cuda_with_bitsandbytes() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _cuda_with_bitsandbytes(), reason="QLoRA training is checked on a CUDA GPU with bitsandbytes "
                    "installed; this machine has no GPU or no bitsandbytes (CPU training is refused or probed in "
                    "test_variants_a_units)")
def test_qlora_trains_on_gpu_and_its_file_loads_in_fresh_diffusers(tmp_path, tiny_model_dir):
    cfg, result, trained_png = _train(tmp_path, tiny_model_dir, "qlora", "network_type=qlora")
    info = inspect_file(result.lora_path)
    assert info["method"] == "qlora" and info["network_args"]["base_quantization"] == "nf4"
    pipe = fresh_pipeline(tiny_model_dir)
    diffusers_load_checked(pipe, result.lora_path)
    theirs = _generate(pipe, cfg)
    ours = _preview(tiny_model_dir, result.lora_path, cfg)
    assert np.abs(ours - theirs).max() <= 1e-4  # the file on the full-precision base: exact
    assert np.abs(theirs - _generate(fresh_pipeline(tiny_model_dir), cfg)).max() > 2e-2
    # The trainer previewed on the NF4 base: close to the full-precision result, not equal.
    gap = np.abs(_as_png(theirs) - trained_png)
    assert 0 < gap.mean() < 40, gap.mean()
