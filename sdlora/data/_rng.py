"""Seeded random streams derived from a base seed and a few keys.

Every random choice in the data pipeline (caption dropout and shuffle, crop offset, flip, batch
order) draws from a stream derived from ``(seed, purpose, epoch, index)``. A sample therefore
depends only on its own key, never on how many samples were drawn before it, which is what makes
runs reproducible across DataLoader workers and lets training resume mid-epoch exactly.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 64-bit integer seed from the ``repr`` of ``parts`` (stable across processes and runs)."""
    text = "\x1f".join(repr(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def derive_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded with :func:`derive_seed` of ``parts``."""
    return random.Random(derive_seed(*parts))
