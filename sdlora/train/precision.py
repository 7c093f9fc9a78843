"""Mixed-precision policy: what ``mixed_precision = auto | no | fp16 | bf16`` runs as on this device.

``resolve_precision('auto')`` measures instead of assuming: on a CPU it uses the timed bf16 vs fp32
speed of :func:`sdlora.train.measure.cpu_bf16_speedup` and only picks bf16 where it is clearly faster
(on AVX2-only CPUs a bf16 convolution is hundreds of times slower than fp32).
"""

from __future__ import annotations

import torch

from .measure import cpu_bf16_speedup


def resolve_precision(requested: str, device: str, *, bf16_speedup: float | None = None) -> tuple[str, str | None]:
    """Map ``auto``/``no``/``fp16``/``bf16`` to what will run, plus a warning for the user (or None).

    On a CPU the choice follows ``bf16_speedup`` (fp32 time / bf16 time), measured with
    :func:`cpu_bf16_speedup` unless given.
    """
    if device.startswith("cuda"):
        if requested == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
        return requested, None
    # CPU
    if requested == "fp16":
        return "no", "mixed_precision=fp16 is not supported on the CPU; training in fp32"
    if requested in ("auto", "bf16"):
        speedup = cpu_bf16_speedup() if bf16_speedup is None else bf16_speedup
        if requested == "auto":
            return ("bf16" if speedup >= 1.5 else "no"), None
        if speedup < 1.0:
            return "bf16", (f"mixed_precision=bf16 on this CPU is {1 / speedup:.0f}x slower than fp32 (no native bf16); "
                            "use mixed_precision=auto or no")
    return requested, None
