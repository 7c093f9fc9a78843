"""Batches from a single bucket, in a seeded order, with a position that can be saved and restored.

Each epoch, the indices of every bucket are shuffled, cut into batches, and the batches of all
buckets are shuffled together (kohya's scheme; our own implementation). The order depends only on
``(seed, epoch)``, so restoring ``(epoch, batch_index)`` reproduces the rest of the epoch exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from torch.utils.data import Sampler

from ._rng import derive_rng, derive_seed


class SampleKey(NamedTuple):
    """A dataset key: sample ``index``, the ``epoch`` it is drawn in, and its ``batch`` position."""

    index: int
    epoch: int
    batch: int


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Yields lists of :class:`SampleKey`, each list from one bucket.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)``. Iterating gives
    the rest of the current epoch, then moves to the next epoch, so a fresh ``for`` loop per epoch
    continues where the last one stopped.

    Args:
        buckets: the bucket of each dataset index (``dataset.bucket_of_index``).
        batch_size: samples per batch; a bucket's last batch may be smaller unless ``drop_last``.
        seed: seed of the order.
        shuffle: shuffle within buckets and across batches (otherwise buckets in sorted order,
            indices ascending).
        drop_last: drop each bucket's incomplete last batch.

    Position: :meth:`state_dict` gives the position after the last batch yielded. When a
    ``DataLoader`` with workers prefetches batches, that is ahead of what training consumed; pass
    ``after=batch["position"]`` of the last trained batch instead.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not buckets:
            raise ValueError("the dataset is empty: nothing to sample")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self._groups = [groups[b] for b in sorted(groups, key=repr)]
        self._num_samples = len(buckets)
        self._fingerprint = derive_seed(tuple(repr(b) for b in buckets))
        self._num_batches = sum(
            len(g) // batch_size if drop_last else -(-len(g) // batch_size) for g in self._groups
        )
        if self._num_batches == 0:
            largest = max(len(g) for g in self._groups)
            raise ValueError(
                f"batch_size {batch_size} with drop_last leaves no batch: the largest bucket has {largest} "
                "sample(s); lower batch_size or turn off drop_last"
            )
        self.epoch = 0
        self.batch_index = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._num_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches (lists of dataset indices) of ``epoch``, in order."""
        rng = derive_rng(self.seed, "batches", epoch) if self.shuffle else None
        batches: list[list[int]] = []
        for group in self._groups:
            order = list(group)
            if rng is not None:
                rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if rng is not None:
            rng.shuffle(batches)
        return batches

    def _normalise(self) -> None:
        if self.batch_index >= self._num_batches:
            self.epoch += 1
            self.batch_index = 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        self._normalise()
        epoch = self.epoch
        batches = self.epoch_batches(epoch)
        for position in range(self.batch_index, len(batches)):
            self.batch_index = position + 1
            yield [SampleKey(i, epoch, position) for i in batches[position]]
            if self.epoch != epoch:  # the position was restored while iterating
                return
        self._normalise()

    def state_dict(self, after: tuple[int, int] | None = None) -> dict[str, int]:
        """The position to resume from: the next batch after the last yielded, or after ``after``
        (``(epoch, batch)``, the ``position`` field of a collated batch)."""
        if after is not None:
            epoch, batch = int(after[0]), int(after[1]) + 1
        else:
            epoch, batch = self.epoch, self.batch_index
        if batch >= self._num_batches:
            epoch, batch = epoch + 1, 0
        return {
            "epoch": epoch,
            "batch_index": batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": self._num_samples,
            "num_batches": self._num_batches,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore a position from :meth:`state_dict`.

        With ``strict`` (the default) a state saved for another seed, batch size or dataset (other
        images, repeats or buckets) raises ``ValueError``, since the rest of the epoch would not be
        the same; with ``strict=False`` the epoch and position are taken as they are.
        """
        if strict:
            mismatched = [
                f"{name} {state.get(name)!r} != {value!r}"
                for name, value in (
                    ("seed", self.seed),
                    ("batch_size", self.batch_size),
                    ("num_samples", self._num_samples),
                    ("fingerprint", self._fingerprint),
                )
                if state.get(name) != value
            ]
            if mismatched:
                raise ValueError(
                    "cannot resume the data order exactly: the saved position is for a different dataset or "
                    f"setting ({'; '.join(mismatched)}); load it with strict=False to continue anyway"
                )
        self.epoch = int(state["epoch"])
        self.batch_index = max(0, min(int(state["batch_index"]), self._num_batches))
        self._normalise()
