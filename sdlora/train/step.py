"""One training step: noise -> UNet -> loss. The whole objective in one screen.

Epsilon or v-prediction (from the noise scheduler's config), min-SNR-gamma weighting
(Hang et al. 2023), noise offset, and the DreamBooth prior-preservation term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


@dataclass
class StepLoss:
    loss: torch.Tensor              # what is back-propagated
    loss_instance: float            # the instance (style) images' part
    loss_prior: float | None        # the class images' part, when prior preservation is on


def sample_noise(latents: torch.Tensor, sample_ids: list[int], seed: int, num_train_timesteps: int,
                 noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timestep of each sample from its own generator, seeded by (run seed, sample id).

    A sample gets the same noise whichever process draws it and whether or not the run was
    resumed, so 2 processes x batch 1 train exactly like 1 process x batch 2.
    """
    noises, steps = [], []
    for sid in sample_ids:
        g = torch.Generator().manual_seed((seed * 1_000_003 + sid) % (2**63))
        n = torch.randn(latents.shape[1:], generator=g)
        if noise_offset:
            n = n + noise_offset * torch.randn(latents.shape[1], 1, 1, generator=g)
        noises.append(n)
        steps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=g)))
    return (torch.stack(noises).to(latents.device, latents.dtype),
            torch.tensor(steps, device=latents.device, dtype=torch.long))


def min_snr_weight(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight of each timestep (Hang et al. 2023) for the scheduler's prediction type.

    ``min(SNR, gamma) / SNR`` for epsilon; ``min(SNR, gamma) / (SNR + 1)`` for v-prediction (the v loss
    is ``SNR + 1`` times the x0 loss that the weight is defined on). SNR is diffusers' ``compute_snr``.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=gamma)
    return weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr


def diffusion_loss(unet, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, noise_scheduler, *,
                   noise: torch.Tensor, timesteps: torch.Tensor, min_snr_gamma: float = 0.0,
                   is_prior: torch.Tensor | None = None, prior_loss_weight: float = 1.0,
                   added_cond_kwargs: dict | None = None) -> StepLoss:
    """Loss of one batch (``noise``/``timesteps`` from :func:`sample_noise`).

    ``is_prior`` marks class images (bool per sample) for prior preservation. ``added_cond_kwargs``
    is SDXL's extra conditioning (pooled text embedding and time ids; see ``conditioning.py``).
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False, **extra)[0]

    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(noise_scheduler, timesteps, min_snr_gamma)

    if is_prior is not None and bool(is_prior.any()):
        inst, prior = per_sample[~is_prior], per_sample[is_prior]
        inst_loss = inst.mean() if inst.numel() else per_sample.new_zeros(())
        loss = inst_loss + prior_loss_weight * prior.mean()
        return StepLoss(loss, float(inst_loss.detach()), float(prior.mean().detach()))
    loss = per_sample.mean()
    return StepLoss(loss, float(loss.detach()), None)
