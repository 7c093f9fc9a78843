"""The training objective (sdlora/train/step.py) against formulas written out here.

A stand-in UNet returns a fixed prediction, so each loss can be computed by hand from the noise
schedule: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[t], the v-prediction target
v = sqrt(a) eps - sqrt(1 - a) x0, SNR = a / (1 - a), the min-SNR-gamma weight min(SNR, gamma) / SNR
for epsilon and min(SNR, gamma) / (SNR + 1) for v-prediction, and the prior-preservation loss
mean(instance) + w * mean(prior).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.train.step import diffusion_loss, min_snr_weight, sample_noise

# Small, medium and large timesteps: SNR is far above gamma = 5 at t = 1 and far below it at t = 999.
TIMESTEPS = torch.tensor([1, 50, 400, 999])


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


class FixedUNet(torch.nn.Module):
    """Returns ``pred`` whatever the input; records what it was called with."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.pred = pred
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy, timesteps, encoder_hidden_states, return_dict=False):
        self.calls.append((noisy, timesteps))
        return (self.pred,)


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    pred = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    return latents, noise, pred


def _alphas(sched: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    return sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 precision (the step computes its loss in float32)."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-7)


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


def _loss(prediction_type: str, gamma: float = 0.0, **kw):
    sched = scheduler(prediction_type)
    latents, noise, pred = _batch()
    unet = FixedUNet(pred)
    out = diffusion_loss(unet, latents, torch.zeros(4, 3, 8), sched, noise=noise, timesteps=TIMESTEPS,
                         min_snr_gamma=gamma, **kw)
    return out, unet, sched, latents, noise, pred


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_unet_sees_the_forward_noising(prediction_type):
    _, unet, sched, latents, noise, _ = _loss(prediction_type)
    (noisy, t), = unet.calls
    a = _alphas(sched, TIMESTEPS)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise)
    assert torch.equal(t, TIMESTEPS)


def test_epsilon_target_is_the_noise():
    out, _, _, _, noise, pred = _loss("epsilon")
    close(out.loss, _per_sample_mse(pred, noise).mean())
    assert out.loss_prior is None


def test_v_prediction_target():
    out, _, sched, latents, noise, pred = _loss("v_prediction")
    a = _alphas(sched, TIMESTEPS)
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    close(out.loss, _per_sample_mse(pred, v).mean())


def test_min_snr_weight_for_epsilon():
    gamma = 5.0
    out, _, sched, _, noise, pred = _loss("epsilon", gamma)
    a = sched.alphas_cumprod.double()[TIMESTEPS]
    snr = a / (1 - a)
    weight = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    assert weight[0] < 1 and weight[-1] == 1  # the clamp acts at t = 1 and not at t = 999
    close(out.loss, (weight * _per_sample_mse(pred, noise)).mean())
    close(min_snr_weight(sched, TIMESTEPS, gamma), weight)


def test_min_snr_weight_for_v_prediction():
    gamma = 5.0
    out, _, sched, latents, noise, pred = _loss("v_prediction", gamma)
    a = sched.alphas_cumprod.double()[TIMESTEPS]
    snr = a / (1 - a)
    weight = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)
    a4 = a.view(-1, 1, 1, 1)
    v = a4.sqrt() * noise - (1 - a4).sqrt() * latents
    close(out.loss, (weight * _per_sample_mse(pred, v)).mean())
    close(min_snr_weight(sched, TIMESTEPS, gamma), weight)


def test_prior_preservation_split_and_weight():
    is_prior = torch.tensor([False, True, False, True])
    out, _, _, _, noise, pred = _loss("epsilon", is_prior=is_prior, prior_loss_weight=0.25)
    per = _per_sample_mse(pred, noise)
    instance, prior = per[[0, 2]].mean(), per[[1, 3]].mean()
    close(out.loss, instance + 0.25 * prior)
    assert out.loss_instance == pytest.approx(float(instance))
    assert out.loss_prior == pytest.approx(float(prior))


def test_prior_preservation_with_only_class_images():
    is_prior = torch.ones(4, dtype=torch.bool)
    out, _, _, _, noise, pred = _loss("epsilon", is_prior=is_prior, prior_loss_weight=2.0)
    per = _per_sample_mse(pred, noise)
    close(out.loss, 2.0 * per.mean())
    assert out.loss_instance == 0.0


def test_noise_offset_adds_one_constant_per_channel_and_sample():
    latents = torch.zeros(3, 4, 8, 8)
    plain, t_plain = sample_noise(latents, [0, 1, 2], seed=5, num_train_timesteps=1000, noise_offset=0.0)
    small, _ = sample_noise(latents, [0, 1, 2], seed=5, num_train_timesteps=1000, noise_offset=0.1)
    large, _ = sample_noise(latents, [0, 1, 2], seed=5, num_train_timesteps=1000, noise_offset=0.3)
    d_small, d_large = small - plain, large - plain
    # The offset is constant over each (sample, channel) plane, differs between planes, and scales with
    # the noise_offset setting; the pixel noise under it is unchanged.
    assert torch.allclose(d_small, d_small[:, :, :1, :1].expand_as(d_small), atol=1e-6)
    assert d_small[:, :, 0, 0].unique().numel() == 12
    torch.testing.assert_close(d_large, 3 * d_small)
    assert d_small.abs().max() > 0


def test_sample_noise_depends_on_the_sample_not_the_batch():
    latents = torch.zeros(3, 4, 8, 8)
    noise, steps = sample_noise(latents, [7, 8, 9], seed=1, num_train_timesteps=1000)
    alone, step_alone = sample_noise(latents[:1], [8], seed=1, num_train_timesteps=1000)
    assert torch.equal(noise[1], alone[0]) and steps[1] == step_alone[0]
    assert not torch.equal(noise[0], noise[1])
    assert ((0 <= steps) & (steps < 1000)).all()


def test_unknown_prediction_type_is_an_error():
    sched = scheduler("epsilon")
    sched.register_to_config(prediction_type="sample")
    latents, noise, pred = _batch()
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(FixedUNet(pred), latents, torch.zeros(4, 3, 8), sched, noise=noise, timesteps=TIMESTEPS)
