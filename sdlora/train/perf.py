"""Machine measurements for honest progress numbers: matmul peak, step FLOPs, fast precision.

``resolve_precision('auto')`` measures instead of assuming: on a CPU it times a bf16 convolution
and matmul against fp32 and only picks bf16 where it is clearly faster (on AVX2-only CPUs a bf16
convolution is hundreds of times slower than fp32).
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

CACHE = Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora"))


def _time(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small conv + matmul workload on this CPU (>1 = bf16 faster)."""
    key = f"bf16-speedup-{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"
    cached = _read_cache(key)
    if cached is not None:
        return cached
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 32, 32)
    a = torch.randn(512, 512)

    def work(dtype):
        c, xx, aa = conv.to(dtype), x.to(dtype), a.to(dtype)
        with torch.no_grad():
            return _time(lambda: (c(xx), aa @ aa))

    speedup = work(torch.float32) / work(torch.bfloat16)
    _write_cache(key, speedup)
    return speedup


def resolve_precision(requested: str, device: str, *, bf16_speedup: float | None = None) -> tuple[str, str | None]:
    """Map ``auto``/``no``/``fp16``/``bf16`` to what will run, plus a warning for the user (or None).

    On a CPU the decision uses ``bf16_speedup`` (fp32 time / bf16 time), measured here when not given.
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


@lru_cache(maxsize=None)
def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best measured FLOP/s of ``torch.mm`` on large square matrices on this machine."""
    key = f"mm-peak-{dtype}-{device}-{torch.__version__}-{torch.get_num_threads()}"
    cached = _read_cache(key)
    if cached is not None:
        return cached
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def run():
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    peak = 2 * n**3 / _time(run, repeat=5)
    _write_cache(key, peak)
    return peak


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _read_cache(key: str) -> float | None:
    try:
        return float(json.loads((CACHE / "machine.json").read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, value: float) -> None:
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        path = CACHE / "machine.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass
