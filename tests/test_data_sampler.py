"""Bucket batch sampler: single-bucket batches, seeded order, exact resume mid-epoch."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sdlora.data import (
    BucketBatchSampler,
    BucketConfig,
    CaptionConfig,
    DatasetItem,
    ImageCaptionDataset,
    SampleKey,
)

# 23 samples in 3 buckets of unequal size.
BUCKETS = [(512, 512)] * 11 + [(640, 384)] * 7 + [(384, 640)] * 5


def batches_of(sampler: BucketBatchSampler, n: int) -> list[list[SampleKey]]:
    """The next ``n`` batches, crossing epoch boundaries like a training loop would."""
    out: list[list[SampleKey]] = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_batches_are_single_bucket_and_cover_each_epoch_once():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0)
    assert len(sampler) == 3 + 2 + 2
    for epoch in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert 1 <= len(batch) <= 4
            assert len({BUCKETS[k.index] for k in batch}) == 1
            assert all(k.epoch == epoch for k in batch)
        assert sorted(k.index for b in batches for k in b) == list(range(len(BUCKETS)))
        assert [b[0].batch for b in batches] == list(range(len(batches)))


def test_order_is_seeded_and_changes_per_epoch():
    a = batches_of(BucketBatchSampler(BUCKETS, 4, seed=5), 14)
    b = batches_of(BucketBatchSampler(BUCKETS, 4, seed=5), 14)
    c = batches_of(BucketBatchSampler(BUCKETS, 4, seed=6), 14)
    indices = lambda bs: [[k.index for k in batch] for batch in bs]  # noqa: E731
    assert a == b
    assert indices(a) != indices(c)
    assert indices(a[:7]) != indices(a[7:])  # epoch 1 is shuffled differently from epoch 0


def test_no_shuffle_and_drop_last():
    sampler = BucketBatchSampler(BUCKETS, 4, shuffle=False, drop_last=True)
    batches = [[k.index for k in b] for b in sampler]
    assert all(len(b) == 4 for b in batches) and len(batches) == 2 + 1 + 1
    assert batches[0] == sorted(batches[0])
    with pytest.raises(ValueError, match="batch_size 20"):
        BucketBatchSampler(BUCKETS, 20, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(BUCKETS, 0)


def test_resume_mid_epoch_gives_the_same_sequence():
    reference = batches_of(BucketBatchSampler(BUCKETS, 3, seed=11), 25)  # ~2.5 epochs
    for stop in (1, 5, 9, 10, 17):
        first = BucketBatchSampler(BUCKETS, 3, seed=11)
        head = batches_of(first, stop)
        state = first.state_dict()
        resumed = BucketBatchSampler(BUCKETS, 3, seed=11)
        resumed.load_state_dict(state)
        tail = batches_of(resumed, 25 - stop)
        assert head + tail == reference, stop


def test_position_after_a_consumed_batch():
    sampler = BucketBatchSampler(BUCKETS, 3, seed=2)
    it = iter(sampler)
    consumed = next(it)
    prefetched = [next(it), next(it)]  # a DataLoader with workers runs ahead like this
    assert sampler.state_dict()["batch_index"] == 3
    state = sampler.state_dict(after=(consumed[0].epoch, consumed[0].batch))
    assert state["batch_index"] == 1
    resumed = BucketBatchSampler(BUCKETS, 3, seed=2)
    resumed.load_state_dict(state)
    assert next(iter(resumed)) == prefetched[0]
    # After the last batch of an epoch the position is the start of the next one.
    last = len(sampler) - 1
    assert sampler.state_dict(after=(0, last))["epoch"] == 1
    assert sampler.state_dict(after=(0, last))["batch_index"] == 0


def test_strict_resume_refuses_a_changed_dataset():
    state = BucketBatchSampler(BUCKETS, 3, seed=2).state_dict()
    with pytest.raises(ValueError, match="different dataset"):
        BucketBatchSampler(BUCKETS + [(512, 512)], 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(BUCKETS, 3, seed=3).load_state_dict(state)
    lenient = BucketBatchSampler(BUCKETS[:-1], 3, seed=2)
    lenient.load_state_dict({**state, "epoch": 4, "batch_index": 2}, strict=False)
    assert (lenient.epoch, lenient.batch_index) == (4, 2)


def test_resumed_samples_are_identical_through_the_dataset():
    items = [DatasetItem(Path(f"/x/{i}.png"), 1 + i % 3, "a, b, c, d", (64 + 16 * (i % 4), 64), "g")
             for i in range(9)]
    def make():
        ds = ImageCaptionDataset(items, buckets=BucketConfig(64, min_bucket_reso=32, max_bucket_reso=128,
                                                             bucket_reso_steps=8),
                                 captions=CaptionConfig(shuffle_tags=True, caption_dropout_rate=0.2),
                                 random_crop=True, flip_aug=True, seed=4)
        return ds, BucketBatchSampler(ds.bucket_of_index, 2, seed=4)

    ds, sampler = make()
    plans = [ds.plan(k) for b in batches_of(sampler, 12) for k in b]
    ds2, first = make()
    head = [ds2.plan(k) for b in batches_of(first, 5) for k in b]
    ds3, resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = [ds3.plan(k) for b in batches_of(resumed, 7) for k in b]
    assert head + tail == plans
    assert len({p.caption for p in plans}) > 3 and len({p.crop for p in plans}) > 3
    assert list(itertools.islice(iter(resumed), 1))  # the sampler keeps going
