"""Measurements of this machine, cached on disk: matmul peak, bf16 speed, FLOPs of a step.

They make progress numbers honest (the MFU of a step event) and feed the precision policy
(:mod:`sdlora.train.precision`). ``matmul_peak_flops`` is the best of ``torch.mm`` and oneDNN's matmul
(on AMD CPUs MKL's fp32 ``torch.mm`` runs at less than half of oneDNN), and ``count_flops`` also counts
PyTorch's CPU attention kernel and the oneDNN ops of :mod:`sdlora.train.speed`, which PyTorch's
counter does not know. Measurements use their own random generator, never the global one the
training draws from. Results are kept in ``$SDLORA_CACHE/machine.json`` (default ``~/.cache/sdlora``).
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
    g = torch.Generator().manual_seed(0)  # never the global generator: training draws from it
    w = torch.randn(64, 64, 3, 3, generator=g) * 0.05
    x = torch.randn(1, 64, 32, 32, generator=g)
    a = torch.randn(512, 512, generator=g)

    def work(dtype):
        ww, xx, aa = w.to(dtype), x.to(dtype), a.to(dtype)
        with torch.no_grad():
            return _time(lambda: (torch.nn.functional.conv2d(xx, ww, padding=1), aa @ aa))

    speedup = work(torch.float32) / work(torch.bfloat16)
    _write_cache(key, speedup)
    return speedup


MATMUL_BACKENDS = ("torch.mm", "onednn")


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", backend: str = "torch.mm",
                         n: int | None = None, repeat: int = 5) -> float:
    """FLOP/s of one square ``n x n`` matrix product, the best of ``repeat`` timed calls (not cached).

    ``backend``: ``"torch.mm"`` (what ``a @ b`` dispatches to: MKL for fp32 on a CPU, oneDNN for
    bf16) or ``"onednn"`` (oneDNN's matmul through ``torch.ops.mkldnn._linear_pointwise``, the
    kernel the training step uses for frozen Linear layers on a CPU; CPU only).
    """
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"backend must be one of {MATMUL_BACKENDS}, got {backend!r}")
    n = n or (2048 if device == "cpu" else 8192)
    g = torch.Generator(device=device).manual_seed(0)  # never the global generator: training draws from it
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    if backend == "onednn":
        if device != "cpu" or not torch.backends.mkldnn.is_available():
            raise ValueError("the onednn backend needs a CPU build of PyTorch with oneDNN")
        bt = b.t().contiguous()

        def run():
            torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    else:
        def run():
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()

    return 2 * n**3 / _time(run, repeat=repeat)


@lru_cache(maxsize=None)
def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best FLOP/s of a large matrix product measured on this machine (this run or an earlier one).

    On a CPU the best of ``torch.mm`` and oneDNN's matmul: on AMD CPUs MKL's fp32 ``torch.mm``
    reaches less than half of what oneDNN does, and the training step runs its frozen layers on
    oneDNN, so a ``torch.mm``-only peak would overstate the step's share of the machine. Each run
    measures again (about a second) and the best value seen is kept in the cache file, so a
    measurement taken while other processes were busy cannot lower the peak (which would make
    every later run look better than it is).
    """
    backends = MATMUL_BACKENDS if device == "cpu" and torch.backends.mkldnn.is_available() else ("torch.mm",)
    if dtype == torch.bfloat16 and device == "cpu" and cpu_bf16_speedup() < 1.0:
        backends = ("torch.mm",)  # no native bf16: both are slow emulations; one measurement is enough
    measured = max(measure_matmul_flops(dtype, device, backend, repeat=3) for backend in backends)
    key = f"matmul-peak-v2-{dtype}-{device}-{torch.__version__}-{torch.get_num_threads()}"
    best = _read_cache(key)
    if best is None or measured > best:
        _write_cache(key, measured)
        best = measured
    return best


def _conv_pointwise_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN convolution (forward or input gradient) with a packed weight: the usual count."""
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _conv_transpose_pointwise_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=True)


def _linear_pointwise_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN linear: ``x [.., K] @ W.T`` with ``W [N, K]``."""
    m = 1
    for d in x_shape[:-1]:
        m *= d
    return 2 * m * w_shape[0] * w_shape[1]


def _cpu_attention_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's CPU flash attention (forward): the two matrix products, as for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_attention_backward_flop(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _flop_formulas() -> dict:
    """FLOP formulas PyTorch's counter lacks: the CPU attention kernel (it only knows the CUDA
    ones, so attention was counted as zero) and the oneDNN ops that ``speed.py`` calls directly."""
    aten = torch.ops.aten
    formulas: dict = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
                      aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flop}
    if torch.backends.mkldnn.is_available():
        ops = torch.ops.mkldnn
        formulas.update({ops._convolution_pointwise: _conv_pointwise_flop,
                         ops._convolution_transpose_pointwise: _conv_transpose_pointwise_flop,
                         ops._linear_pointwise: _linear_pointwise_flop})
    return formulas


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), by ``torch.utils.flop_counter``'s formulas.

    Matrix products, convolutions and attention are counted (elementwise ops are not), including
    PyTorch's CPU attention kernel and the oneDNN ops that :mod:`sdlora.train.speed` runs for
    frozen layers. The ops are watched by a bare dispatch mode rather than ``FlopCounterMode``:
    that one also tracks the module of every op (hooks on every module and output), which made a
    gradient-checkpointed SDXL step at 512 px hold 4.7 GiB of activations instead of 2.1.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    formulas = dict(flop_registry)
    formulas.update({k: shape_wrapper(v) for k, v in _flop_formulas().items()})

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with _Count() as counter:
        fn()
    return int(counter.total)


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
