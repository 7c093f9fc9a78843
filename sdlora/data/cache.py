"""Caching VAE latents and text-encoder outputs while those models are frozen.

:class:`CachedDataset` wraps an :class:`~sdlora.data.dataset.ImageCaptionDataset` and replaces
``pixel_values`` with ``latents`` (from ``encode_image``) and adds ``text_embeddings`` (from
``encode_text``). The trainer owns the models; this module only calls the two callables:

* ``encode_image(pixels)``: ``pixels`` is float32 ``B x 3 x H x W`` in [-1, 1] on the CPU; it returns
  a tensor whose first dimension is ``B`` (e.g. ``vae.encode(x).latent_dist.mean * scaling``). What it
  returns is stored and reused, so it should be deterministic (a mean, or a seeded sample).
* ``encode_text(captions)``: a list of ``B`` strings; returns a tensor with first dimension ``B`` or a
  dict of such tensors (e.g. SDXL's two hidden states and pooled output).

Latents are keyed by the image's absolute path, modification time and byte size, the bucket,
resize size, crop offset and flip, plus ``encoder_key`` (name the model and dtype there, so another
VAE does not reuse stale latents). A changed file gets a new key and is encoded again. Text
outputs are keyed by the caption string and ``encoder_key``. With ``cache_dir`` they are also
stored there as one ``.safetensors`` file per entry (written to a temporary name, then renamed),
so later runs reuse them; without it they live in memory only.

Limits (as in kohya's sd-scripts): random crop cannot be used with cached latents (every step
would need a new crop), so the centre crop is the only one; a horizontal flip is cached as a second
variant of each image. Text outputs cannot be cached when tags are shuffled or dropped (the caption
changes every step); caption dropout is fine (the empty caption is one more entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .dataset import ImageCaptionDataset
from .errors import DatasetError
from .transforms import CropPlan

TextOutput = Union[torch.Tensor, Mapping[str, torch.Tensor]]
EncodeImage = Callable[[torch.Tensor], torch.Tensor]
EncodeText = Callable[[list[str]], TextOutput]

_CACHE_VERSION = 1
_TENSOR_KEY = "value"


@dataclass
class CacheStats:
    """Counters of what the cache did (encoded = the callable was run for that many entries)."""

    images_encoded: int = 0
    image_hits: int = 0
    texts_encoded: int = 0
    text_hits: int = 0


def _digest(key: Mapping[str, Any]) -> tuple[str, str]:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), text


def _from_dict(tensors: dict[str, torch.Tensor]) -> TextOutput:
    if set(tensors) == {_TENSOR_KEY}:
        return tensors[_TENSOR_KEY]
    return tensors


def _split_batch(output: Any, batch: int, what: str) -> list[dict[str, torch.Tensor]]:
    """Per-sample dicts of CPU tensors from a batched encoder output, checking its shape."""
    if isinstance(output, torch.Tensor):
        parts = {_TENSOR_KEY: output}
    elif isinstance(output, Mapping) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        if _TENSOR_KEY in output and len(output) > 1:
            raise DatasetError(f"{what} returned a dict with the reserved key {_TENSOR_KEY!r}")
        parts = dict(output)
    else:
        raise DatasetError(f"{what} must return a tensor or a dict of tensors, got {type(output).__name__}")
    for name, tensor in parts.items():
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            raise DatasetError(
                f"{what} returned {name} of shape {tuple(tensor.shape)} for a batch of {batch}; "
                "the first dimension must be the batch"
            )
    return [
        {name: tensor[i].detach().to("cpu").clone().contiguous() for name, tensor in parts.items()}
        for i in range(batch)
    ]


class _Store:
    """Entries in memory, optionally backed by one safetensors file each in a folder."""

    def __init__(self, folder: Path | None, keep_in_memory: bool) -> None:
        self.folder = folder
        self.keep_in_memory = keep_in_memory or folder is None
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _file(self, digest: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{digest}.safetensors"

    def get(self, digest: str, key_text: str) -> dict[str, torch.Tensor] | None:
        found = self.memory.get(digest)
        if found is not None or self.folder is None:
            return found
        path = self._file(digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key_text:
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # noqa: BLE001 - an unreadable cache file is re-encoded and overwritten
            return None
        if self.keep_in_memory:
            self.memory[digest] = tensors
        return tensors

    def put(self, digest: str, key_text: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.keep_in_memory:
            self.memory[digest] = tensors
        if self.folder is None:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}-", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": key_text})
            os.replace(tmp, self._file(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class CachedDataset(Dataset):
    """A dataset of cached latents and/or text-encoder outputs over an :class:`ImageCaptionDataset`.

    Args:
        dataset: the image dataset (its crop, flip and caption plan is reused, keys are the same).
        encode_image: pixels -> latents (see module doc); ``None`` keeps ``pixel_values``.
        encode_text: captions -> embeddings; ``None`` leaves captions as strings only.
        cache_dir: folder for the safetensors files (``latents/`` and ``text/`` inside); ``None``
            keeps everything in memory.
        encoder_key: identifies the encoders (model name or hash, dtype); part of every cache key.
        batch_size: how many images / captions :meth:`prepare` encodes per call.
        keep_in_memory: with ``cache_dir``, also keep loaded entries in memory.

    Entries missing when a sample is requested are encoded then; :meth:`prepare` encodes all of
    them up front in batches, so the encoders can be moved off the accelerator afterwards. Call it
    before handing the dataset to a ``DataLoader`` with workers, so that workers only read the cache
    and never run the encoders themselves.
    """

    def __init__(
        self,
        dataset: ImageCaptionDataset,
        *,
        encode_image: EncodeImage | None = None,
        encode_text: EncodeText | None = None,
        cache_dir: str | Path | None = None,
        encoder_key: str = "",
        batch_size: int = 8,
        keep_in_memory: bool = True,
    ) -> None:
        if encode_image is None and encode_text is None:
            raise ValueError("CachedDataset needs encode_image, encode_text or both")
        if encode_image is not None and dataset.random_crop:
            raise DatasetError(
                "random_crop cannot be used with cached latents: a cached latent is one fixed crop. "
                "Turn off random_crop (the centre crop is used) or turn off latent caching."
            )
        if encode_text is not None and dataset.captions.varies:
            raise DatasetError(
                "text-encoder outputs cannot be cached while shuffle_tags or tag_dropout_rate is on: the caption "
                "changes every step. Turn those off or turn off text-encoder caching."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.encode_image = encode_image
        self.encode_text = encode_text
        self.encoder_key = str(encoder_key)
        self.batch_size = batch_size
        root = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_dir = root
        self._latents = _Store(root / "latents" if root else None, keep_in_memory)
        self._texts = _Store(root / "text" if root else None, keep_in_memory)
        self.stats = CacheStats()

    # Delegation so samplers and trainers can treat this like the wrapped dataset.
    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def bucket_of_index(self) -> list[tuple[int, int]]:
        """Bucket of every index (for :class:`~sdlora.data.sampler.BucketBatchSampler`)."""
        return self.dataset.bucket_of_index

    # Keys.
    def _latent_key(self, item_index: int, crop: CropPlan) -> tuple[str, str]:
        path = Path(self.dataset.items[item_index].path).resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise DatasetError(f"{path}: image file cannot be read anymore ({e.strerror or e})") from e
        return _digest(
            {
                "v": _CACHE_VERSION,
                "kind": "latent",
                "encoder": self.encoder_key,
                "path": str(path),
                "mtime_ns": st.st_mtime_ns,
                "bytes": st.st_size,
                "bucket": list(crop.bucket),
                "resized": list(crop.resized),
                "crop": [crop.left, crop.top],
                "flip": crop.flip,
            }
        )

    def _text_key(self, caption: str) -> tuple[str, str]:
        return _digest({"v": _CACHE_VERSION, "kind": "text", "encoder": self.encoder_key, "caption": caption})

    # Encoding.
    def _encode_latents(self, jobs: list[tuple[int, CropPlan, str, str]]) -> list[torch.Tensor]:
        assert self.encode_image is not None
        pixels = torch.stack([self.dataset.load_pixels(self.dataset.items[i], crop) for i, crop, _, _ in jobs])
        with torch.no_grad():
            output = self.encode_image(pixels)
        if not isinstance(output, torch.Tensor):
            raise DatasetError(f"encode_image must return a tensor, got {type(output).__name__}")
        results = _split_batch(output, len(jobs), "encode_image")
        self.stats.images_encoded += len(jobs)
        latents = []
        for (_, _, digest, key_text), tensors in zip(jobs, results):
            self._latents.put(digest, key_text, tensors)
            latents.append(tensors[_TENSOR_KEY])
        return latents

    def _encode_texts(self, jobs: list[tuple[str, str, str]]) -> list[TextOutput]:
        assert self.encode_text is not None
        with torch.no_grad():
            output = self.encode_text([caption for caption, _, _ in jobs])
        results = _split_batch(output, len(jobs), "encode_text")
        self.stats.texts_encoded += len(jobs)
        for (_, digest, key_text), tensors in zip(jobs, results):
            self._texts.put(digest, key_text, tensors)
        return [_from_dict(t) for t in results]

    def latent(self, item_index: int, crop: CropPlan) -> torch.Tensor:
        """The cached latent of an image variant, encoding it if it is not cached yet."""
        digest, key_text = self._latent_key(item_index, crop)
        found = self._latents.get(digest, key_text)
        if found is not None and _TENSOR_KEY in found:
            self.stats.image_hits += 1
            return found[_TENSOR_KEY]
        return self._encode_latents([(item_index, crop, digest, key_text)])[0]

    def text(self, caption: str) -> TextOutput:
        """The cached text-encoder output of a caption, encoding it if it is not cached yet."""
        digest, key_text = self._text_key(caption)
        found = self._texts.get(digest, key_text)
        if found is not None:
            self.stats.text_hits += 1
            return _from_dict(found)
        return self._encode_texts([(caption, digest, key_text)])[0]

    def required_variants(self) -> list[tuple[int, CropPlan]]:
        """Every (image, crop plan) a training run can ask for: the centre crop, and its mirror with flip_aug."""
        variants = []
        for item_index in range(len(self.dataset.items)):
            crop = self.dataset.crop_plan(item_index)  # centre crop (random_crop is refused above)
            variants.append((item_index, crop))
            if self.dataset.flip_aug:
                mirrored = CropPlan(crop.original, crop.resized, crop.bucket, crop.left, crop.top, not crop.flip)
                variants.append((item_index, mirrored))
        return variants

    def required_captions(self) -> list[str]:
        """Every caption a training run can ask for (in first-seen order)."""
        seen: dict[str, None] = {}
        for item in self.dataset.items:
            for caption in self.dataset.captions.possible_captions(item.caption):
                seen.setdefault(caption, None)
        return list(seen)

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> CacheStats:
        """Encode every missing latent and text output now, in batches of one bucket each.

        ``progress(done, total)`` is called after each batch. Returns :attr:`stats`.
        """
        latent_jobs: dict[tuple[int, int], list[tuple[int, CropPlan, str, str]]] = {}
        if self.encode_image is not None:
            for item_index, crop in self.required_variants():
                digest, key_text = self._latent_key(item_index, crop)
                if self._latents.get(digest, key_text) is None:
                    latent_jobs.setdefault(crop.bucket, []).append((item_index, crop, digest, key_text))
        text_jobs: list[tuple[str, str, str]] = []
        if self.encode_text is not None:
            for caption in self.required_captions():
                digest, key_text = self._text_key(caption)
                if self._texts.get(digest, key_text) is None:
                    text_jobs.append((caption, digest, key_text))
        total = sum(len(j) for j in latent_jobs.values()) + len(text_jobs)
        done = 0
        for jobs in latent_jobs.values():
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                self._encode_latents(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        for start in range(0, len(text_jobs), self.batch_size):
            chunk = text_jobs[start : start + self.batch_size]
            self._encode_texts(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        return self.stats

    def __getitem__(self, key: Any) -> dict[str, Any]:
        plan = self.dataset.plan(key)
        sample = self.dataset.sample_info(plan)
        if self.encode_image is not None:
            sample["latents"] = self.latent(plan.item_index, plan.crop)
        else:
            sample["pixel_values"] = self.dataset.load_pixels(plan.item, plan.crop)
        if self.encode_text is not None:
            sample["text_embeddings"] = self.text(plan.caption)
        return sample
