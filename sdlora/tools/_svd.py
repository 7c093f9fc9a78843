"""Singular values and low-rank factors of layer deltas, without forming ``up @ down`` when the delta
is given by thin factors (QR of both factors, then the SVD of the small ``r x r`` core, as
:func:`sdlora.lora.weights.resize_rank` does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.weights import ModuleLora


@dataclass
class Svd:
    """``delta = u @ diag(s) @ vh`` for a layer's delta flattened to ``[out, in * kh * kw]``.

    ``full_rank`` is ``min(out, in * kh * kw)``: the number of singular values of the full matrix
    (those past ``len(s)`` are zero).
    """

    u: torch.Tensor  # [out, k] float64
    s: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, in * kh * kw]
    shape: tuple[int, ...]  # the layer weight's shape (Linear [out, in], Conv2d [out, in, kh, kw])

    @property
    def full_rank(self) -> int:
        out = self.shape[0]
        fan_in = 1
        for d in self.shape[1:]:
            fan_in *= d
        return min(out, fan_in)

    def norm(self) -> float:
        return float(self.s.pow(2).sum().sqrt())

    def tail_norm(self, rank: int) -> float:
        """Frobenius norm of what a rank-``rank`` truncation leaves out."""
        return float(self.s[rank:].pow(2).sum().sqrt())

    def relative_error(self, rank: int) -> float:
        total = self.norm()
        return self.tail_norm(rank) / total if total > 0 else 0.0

    def module(self, rank: int, alpha: float | None = None) -> ModuleLora:
        """A plain module holding the rank-``rank`` truncation (``alpha`` defaults to ``rank``: scale 1)."""
        rank = max(1, min(rank, int(self.s.numel())))
        root = self.s[:rank].sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        alpha = float(rank if alpha is None else alpha)
        up = up * (rank / alpha)  # the scale alpha / rank is undone in the factors
        out = self.shape[0]
        if len(self.shape) == 4:
            return ModuleLora(down.float().reshape(rank, *self.shape[1:]), up.float().reshape(out, rank, 1, 1), alpha)
        return ModuleLora(down.float().contiguous(), up.float().contiguous(), alpha)


def of_factors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> Svd:
    """SVD of ``up @ down`` (``up [out, r]``, ``down [r, in * kh * kw]``) through QR of both factors."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u_small, s, vh_small = torch.linalg.svd(r_up @ r_down.T)
    return Svd(q_up @ u_small, s, vh_small @ q_down.T, tuple(shape))


def of_module(module: ModuleLora) -> Svd:
    """SVD of a plain module's delta at scale 1 (its ``alpha / rank`` included)."""
    out = module.up.shape[0]
    up = module.up.double().reshape(out, module.rank) * module.scale
    shape = (out, *module.down.shape[1:])
    return of_factors(up, module.down.double().reshape(module.rank, -1), shape)


def of_matrix(delta: torch.Tensor, dtype: torch.dtype = torch.float64) -> Svd:
    """SVD of a full delta (any module's ``delta()``), thin, computed in ``dtype``."""
    flat = delta.to(dtype).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return Svd(u, s, vh, tuple(delta.shape))


def of_any(module) -> Svd:
    """Thin factors for plain LoRA modules, the full delta for any other kind (LoHa, LoKr, ...)."""
    if isinstance(module, ModuleLora) and module.dora_scale is None:
        return of_module(module)
    return of_matrix(module.delta())


def _factors(module: ModuleLora) -> tuple[torch.Tensor, torch.Tensor]:
    out = module.up.shape[0]
    return module.up.double().reshape(out, module.rank) * module.scale, module.down.double().reshape(module.rank, -1)


def inner(a, b) -> float:
    """Frobenius inner product of two modules' deltas (thin factors for plain LoRA modules)."""
    if isinstance(a, ModuleLora) and isinstance(b, ModuleLora) and a.dora_scale is None and b.dora_scale is None:
        ua, da = _factors(a)
        ub, db = _factors(b)
        return float(((ua.T @ ub) * (da @ db.T)).sum())
    return float((a.delta().double() * b.delta().double()).sum())


def difference(a, b) -> tuple[float, float]:
    """(``||delta_a - delta_b||``, ``||delta_a||``), Frobenius, without full matrices for plain modules."""
    aa, bb, ab = inner(a, a), inner(b, b), inner(a, b)
    return max(0.0, aa + bb - 2 * ab) ** 0.5, max(0.0, aa) ** 0.5
