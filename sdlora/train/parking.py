"""Frozen models that the steps do not need, out of memory while the steps run.

Once the latents and the text-encoder outputs are cached, a run whose VAE and text encoders do
not train never calls them again until the next preview samples. For SDXL they are 3.6 GB in
fp32 (the two text encoders 3.3 GB, the VAE 0.3 GB), a fifth of what a 1024 px step holds on a
CPU. kohya sd-scripts moves them to the CPU in that case (``--cache_text_encoder_outputs``);
this does the same on an accelerator, and on a CPU, where there is no other memory to move them
to, writes their tensors to a file in the run directory and drops them, reading them back for
the samples and at the end (a few seconds for SDXL).

Written here because neither diffusers nor accelerate has it: accelerate's offload hooks
(``cpu_offload``) move weights in and out around every forward call, which is for inference on
small GPUs, and neither has a "drop now, restore later" for a CPU-only run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

#: Do not write the parked tensors unless this much disk stays free beyond them.
DISK_MARGIN_BYTES = 1 << 30

#: On a CPU, models smaller than this stay in memory: writing and reading them back costs a few
#: seconds and saves little (SD 1.x's text encoder and VAE: 0.8 GB; SDXL's: 3.6 GB).
MIN_DISK_PARK_BYTES = 1 << 30


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers too (CLIP's ``position_ids``)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _nbytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in _tensors(m).values())


def _shares_storage(modules) -> bool:
    seen: set[int] = set()
    for m in modules:
        for t in _tensors(m).values():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return True
            seen.add(ptr)
    return False


def _put(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


class Parking:
    """Holds frozen models out of memory between :meth:`park` and :meth:`restore`.

    On an accelerator they go to the CPU. On a CPU their tensors are written once to
    ``folder/parked-<rank>.safetensors`` and the modules move to the meta device; :meth:`restore`
    reads them back (the file stays until :meth:`discard`, so parking again costs nothing). Models
    under :data:`MIN_DISK_PARK_BYTES` stay in a CPU's memory. Where it cannot be done safely (too
    little disk, tensors that share storage) the models stay where they are and :attr:`reason`
    says why.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device, folder: Path, rank: int = 0):
        self.modules = modules
        self.device = torch.device(device)
        self.path = Path(folder) / f"parked-{rank}.safetensors"
        self.parked = False
        self.reason: str | None = None
        self.nbytes = _nbytes(modules.values())

    def park(self) -> bool:
        """Take the models out of memory; False (and :attr:`reason`) when they stay."""
        if self.parked or not self.modules:
            return self.parked
        if self.device.type == "cpu" and self.nbytes < MIN_DISK_PARK_BYTES:
            return False  # not worth it (no reason: nothing to tell)
        if self.device.type != "cpu":
            for m in self.modules.values():
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.parked = True
            return True
        if not self.path.is_file() and not self._write():
            return False
        for m in self.modules.values():
            m.to("meta")
        self.parked = True
        return True

    def _write(self) -> bool:
        from safetensors.torch import save_file

        if _shares_storage(self.modules.values()):
            self.reason = "their tensors share storage"
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path.parent).free
        if free < self.nbytes + DISK_MARGIN_BYTES:
            self.reason = (f"{free / 1e9:.1f} GB free in {self.path.parent}, parking needs "
                           f"{(self.nbytes + DISK_MARGIN_BYTES) / 1e9:.1f} GB")
            return False
        flat = {f"{key}/{name}": t.detach().contiguous()
                for key, m in self.modules.items() for name, t in _tensors(m).items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            save_file(flat, str(tmp))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.reason = f"could not write {self.path}: {e}"
            return False
        return True

    def restore(self) -> None:
        """Put the models back where they were, with the same tensors."""
        if not self.parked:
            return
        if self.device.type != "cpu":
            for m in self.modules.values():
                m.to(self.device)
        else:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                for key, m in self.modules.items():
                    for name in list(_tensors(m)):
                        _put(m, name, f.get_tensor(f"{key}/{name}"))
        self.parked = False

    @contextlib.contextmanager
    def restored(self):
        """The models in memory inside the block, parked again after it."""
        was = self.parked
        self.restore()
        try:
            yield
        finally:
            if was:
                self.park()

    def discard(self) -> None:
        """Remove the file (and its folder when empty); parked models stay on the meta device."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()
