"""The training dataset: images with repeats, bucketed, cropped, flipped and captioned reproducibly.

Indices run over every image repeated ``repeats`` times (``len(dataset)`` is the number of samples
per epoch). A sample is addressed by a :class:`~sdlora.data.sampler.SampleKey` ``(index, epoch,
batch)`` as yielded by :class:`~sdlora.data.sampler.BucketBatchSampler`, or by a plain ``int`` (then
the dataset's :attr:`ImageCaptionDataset.epoch` is used). Every random choice for a sample comes from
streams seeded by ``(seed, epoch, index)``, so the same key always gives the same sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ._rng import derive_rng
from .buckets import BucketAssignment, BucketConfig, Bucketer
from .captions import CaptionConfig
from .errors import DatasetError
from .images import load_image
from .scan import DatasetItem, DatasetScan, scan_dataset
from .transforms import CropPlan, apply_plan, plan_crop, to_tensor


@dataclass(frozen=True)
class SamplePlan:
    """Everything decided for one sample before reading pixels."""

    index: int
    epoch: int
    batch: int
    item_index: int
    item: DatasetItem
    crop: CropPlan
    caption: str


def _parse_key(key: Any, default_epoch: int) -> tuple[int, int, int]:
    if isinstance(key, (tuple, list)):
        if len(key) == 3:
            return int(key[0]), int(key[1]), int(key[2])
        if len(key) == 2:
            return int(key[0]), int(key[1]), -1
        raise TypeError(f"dataset key must be an index or (index, epoch[, batch]), got {key!r}")
    if isinstance(key, (int, torch.Tensor)) and not isinstance(key, bool):
        return int(key), default_epoch, -1
    raise TypeError(f"dataset key must be an index or (index, epoch[, batch]), got {key!r}")


class ImageCaptionDataset(Dataset):
    """Image + caption samples for training (see the module docstring).

    Args:
        items: the usable images, usually ``scan_dataset(folder).items``.
        buckets: aspect-ratio bucketing options.
        captions: caption template, trigger word, shuffle and dropout.
        random_crop: crop at a random offset instead of the centre.
        flip_aug: mirror horizontally with probability 1/2.
        seed: base seed of every random choice.
        reduced_jpeg_decode: decode large JPEGs at 1/2, 1/4 or 1/8 scale when that is still at least
            the resized size (faster; the crop covers the same region).

    Each sample is a dict: ``pixel_values`` (float32, 3 x H x W in [-1, 1]), ``caption``, ``path``,
    ``bucket`` (W, H), ``original_size`` (H, W), ``crop_top_left`` (top, left), ``target_size`` (H, W),
    ``flipped``, ``index``, ``item_index``, ``epoch`` and ``batch``.
    """

    def __init__(
        self,
        items: Sequence[DatasetItem],
        *,
        buckets: BucketConfig | None = None,
        captions: CaptionConfig | None = None,
        random_crop: bool = False,
        flip_aug: bool = False,
        seed: int = 0,
        reduced_jpeg_decode: bool = True,
    ) -> None:
        if not items:
            raise DatasetError("the dataset has no images")
        self.items: list[DatasetItem] = list(items)
        self.buckets = buckets if buckets is not None else BucketConfig()
        self.captions = captions if captions is not None else CaptionConfig()
        self.random_crop = bool(random_crop)
        self.flip_aug = bool(flip_aug)
        self.seed = int(seed)
        self.reduced_jpeg_decode = reduced_jpeg_decode
        #: The epoch of plain integer keys (keys from the sampler carry their own).
        self.epoch = 0
        #: The folder scan this dataset was built from, when built by :meth:`from_folder`.
        self.scan: DatasetScan | None = None
        bucketer = Bucketer(self.buckets)
        self.assignments: list[BucketAssignment] = [bucketer.assign(*item.size) for item in self.items]
        self._item_of_index: list[int] = [i for i, item in enumerate(self.items) for _ in range(item.repeats)]
        #: Bucket (width, height) of every index; what :class:`BucketBatchSampler` groups by.
        self.bucket_of_index: list[tuple[int, int]] = [self.assignments[i].bucket for i in self._item_of_index]

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        min_side: int = 64,
        caption_extension: str = ".txt",
        **kwargs: Any,
    ) -> ImageCaptionDataset:
        """Scan ``folder`` (see :func:`scan_dataset`) and build the dataset; the scan is kept in ``.scan``."""
        scan = scan_dataset(folder, min_side, caption_extension=caption_extension)
        dataset = cls(scan.items, **kwargs)
        dataset.scan = scan
        return dataset

    def __len__(self) -> int:
        return len(self._item_of_index)

    def item_index(self, index: int) -> int:
        """Which image (position in :attr:`items`) sample ``index`` shows."""
        if not 0 <= index < len(self._item_of_index):
            raise IndexError(f"sample index {index} out of range (dataset has {len(self)} samples)")
        return self._item_of_index[index]

    def crop_plan(self, item_index: int, *, epoch: int = 0, index: int = 0) -> CropPlan:
        """The crop plan of an image for a given ``(epoch, index)`` key."""
        return plan_crop(
            self.items[item_index].size,
            self.assignments[item_index],
            random_crop=self.random_crop,
            flip_aug=self.flip_aug,
            crop_rng=derive_rng(self.seed, "crop", epoch, index) if self.random_crop else None,
            flip_rng=derive_rng(self.seed, "flip", epoch, index) if self.flip_aug else None,
        )

    def plan(self, key: Any) -> SamplePlan:
        """Decide bucket, crop, flip and caption for ``key`` without reading the image."""
        index, epoch, batch = _parse_key(key, self.epoch)
        item_index = self.item_index(index)
        item = self.items[item_index]
        caption = self.captions.render(item.caption, derive_rng(self.seed, "caption", epoch, index))
        crop = self.crop_plan(item_index, epoch=epoch, index=index)
        return SamplePlan(index, epoch, batch, item_index, item, crop, caption)

    def load_pixels(self, item: DatasetItem, crop: CropPlan) -> torch.Tensor:
        """Read, resize, crop and flip one image: float32 3 x H x W in [-1, 1]."""
        image = load_image(item.path, min_decode_size=crop.resized if self.reduced_jpeg_decode else None)
        return to_tensor(apply_plan(image, crop))

    def sample_info(self, plan: SamplePlan) -> dict[str, Any]:
        """The sample fields other than pixels / latents / embeddings."""
        bw, bh = plan.crop.bucket
        ow, oh = plan.crop.original
        return {
            "caption": plan.caption,
            "path": str(plan.item.path),
            "bucket": plan.crop.bucket,
            "original_size": (oh, ow),
            "crop_top_left": plan.crop.crop_top_left,
            "target_size": (bh, bw),
            "flipped": plan.crop.flip,
            "index": plan.index,
            "item_index": plan.item_index,
            "epoch": plan.epoch,
            "batch": plan.batch,
        }

    def __getitem__(self, key: Any) -> dict[str, Any]:
        plan = self.plan(key)
        sample = self.sample_info(plan)
        sample["pixel_values"] = self.load_pixels(plan.item, plan.crop)
        return sample


def _stack(values: list[Any], name: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise DatasetError(
                f"cannot batch {name} of different shapes {sorted(shapes)}: a batch must come from one bucket "
                "(use BucketBatchSampler)"
            )
        return torch.stack(values)
    if isinstance(first, Mapping):
        return {k: _stack([v[k] for v in values], f"{name}.{k}") for k in first}
    return values


def collate_batch(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate samples of one bucket: tensors (and dicts of tensors) stacked, other fields as lists.

    List fields are renamed to plurals (``captions``, ``paths``, ``original_sizes``,
    ``crop_top_lefts``, ``target_sizes``, ``flipped``, ``indices``). ``position`` is
    ``(epoch, batch)`` of the batch when it came from :class:`BucketBatchSampler`, the value to
    pass to :meth:`BucketBatchSampler.state_dict` as ``after=`` once the step is done.
    """
    if not samples:
        raise DatasetError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for name in ("pixel_values", "latents", "text_embeddings"):
        if name in samples[0]:
            out[name] = _stack([s[name] for s in samples], name)
    plurals = {
        "caption": "captions",
        "path": "paths",
        "original_size": "original_sizes",
        "crop_top_left": "crop_top_lefts",
        "target_size": "target_sizes",
        "flipped": "flipped",
        "index": "indices",
    }
    for name, plural in plurals.items():
        if name in samples[0]:
            out[plural] = [s[name] for s in samples]
    out["bucket"] = samples[0]["bucket"]
    epochs = {s.get("epoch") for s in samples}
    batches = {s.get("batch") for s in samples}
    if len(epochs) == 1 and len(batches) == 1 and samples[0].get("batch", -1) >= 0:
        out["position"] = (samples[0]["epoch"], samples[0]["batch"])
    else:
        out["position"] = None
    return out
