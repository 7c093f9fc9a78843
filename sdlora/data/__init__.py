"""Training data: images and captions from a folder, bucketing, augmentation, batching and caching.

Typical use by a trainer::

    scan = scan_dataset(folder)                       # raises NoUsableImagesError when empty
    dataset = ImageCaptionDataset(scan.items, buckets=BucketConfig(512), captions=CaptionConfig(
        template="{caption}, in {trigger} style", trigger="mystyle"), flip_aug=True, seed=seed)
    data = CachedDataset(dataset, encode_image=..., encode_text=..., cache_dir=run_dir / "cache")
    data.prepare()                                    # optional: encode everything up front
    sampler = BucketBatchSampler(data.bucket_of_index, batch_size, seed=seed)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_batch)
    ...
    checkpoint["data"] = sampler.state_dict(after=batch["position"])   # exact resume later
"""

from .buckets import BucketAssignment, BucketConfig, Bucketer, bucket_histogram, make_bucket_resolutions
from .cache import CachedDataset, CacheStats
from .captions import CaptionConfig, read_caption, split_tags
from .dataset import ImageCaptionDataset, SamplePlan, collate_batch
from .errors import DatasetError, ImageLoadError, NoUsableImagesError
from .images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, image_size, is_image_file, load_image, to_rgb
from .sampler import BucketBatchSampler, SampleKey
from .scan import DatasetItem, DatasetScan, SkippedFile, scan_dataset, tag_frequency
from .transforms import CropPlan, apply_plan, plan_crop, to_image, to_tensor

__all__ = [
    "BucketAssignment",
    "BucketBatchSampler",
    "BucketConfig",
    "Bucketer",
    "CacheStats",
    "CachedDataset",
    "CaptionConfig",
    "CropPlan",
    "DatasetError",
    "DatasetItem",
    "DatasetScan",
    "IMAGE_EXTENSIONS",
    "ImageCaptionDataset",
    "ImageLoadError",
    "NoUsableImagesError",
    "SampleKey",
    "SamplePlan",
    "SkippedFile",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "apply_plan",
    "bucket_histogram",
    "collate_batch",
    "image_size",
    "is_image_file",
    "load_image",
    "make_bucket_resolutions",
    "plan_crop",
    "read_caption",
    "scan_dataset",
    "split_tags",
    "tag_frequency",
    "to_image",
    "to_rgb",
    "to_tensor",
]
