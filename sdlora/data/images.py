"""Reading training images: any common format and pixel mode to an 8-bit RGB ``PIL.Image``.

What :func:`load_image` does, in order:

1. Refuses empty files, files Pillow cannot identify, truncated or corrupt data and images too
   large to decode safely, raising :class:`~sdlora.data.errors.ImageLoadError` with the reason.
2. Takes the first frame of animated files (GIF, APNG, animated WebP).
3. Applies the EXIF orientation tag (phone photos are often stored sideways).
4. Converts the colours to sRGB when an ICC profile other than sRGB is embedded (CMYK print
   files, Display P3 and Adobe RGB photos), using Pillow's LittleCMS binding.
5. Converts the pixel mode to RGB: alpha (RGBA, LA, palette or grey with a transparent colour) is
   composited on white; 16-bit and 32-bit grey is scaled to 8 bits (``Image.convert`` would clip
   every value above 255 to white); CMYK without a profile, grey and bilevel images are converted
   the usual way.

The mode handling is our own code over Pillow's primitives (``ImageOps.exif_transpose``,
``ImageCms``, ``Image.alpha_composite``).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from .errors import ImageLoadError

#: File name extensions (lower case) that are read as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
    | ({".avif"} if features.check("avif") else set())
)

#: Image formats people commonly drop into a dataset that Pillow cannot read here. Files with
#: these extensions are reported as skipped (with what to do) instead of being ignored silently.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".heic", ".heif", ".jxl", ".psd", ".psb", ".svg", ".exr", ".hdr", ".raw", ".dng", ".cr2",
     ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".xcf", ".kra"}
    | ({".avif"} if not features.check("avif") else set())
)

_ORIENTATION_TAG = 0x0112
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255, 255)


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of the :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, *, min_decode_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` to an upright 8-bit RGB image (see the module docstring for each step).

    ``min_decode_size`` (width, height after orientation) lets JPEG files decode at a reduced scale
    (1/2, 1/4 or 1/8, libjpeg's DCT scaling) as long as the result is still at least that large;
    the returned image is then smaller than the file's own size. Other formats ignore it.

    Raises :class:`ImageLoadError` naming the file and the reason when it cannot be used.
    """
    return read_image(path, min_decode_size=min_decode_size)[0]


def read_image(
    path: str | Path, *, min_decode_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Like :func:`load_image`, also returning the file's full size (width, height) after orientation."""
    path = _existing_nonempty(path)
    try:
        with Image.open(path) as im:
            return _decode(im, min_decode_size)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image file Pillow can read (unknown or corrupt format)") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"too many pixels to decode safely ({e})") from e
    except (OSError, SyntaxError, EOFError) as e:
        text = str(e)
        if "truncated" in text.lower():
            raise ImageLoadError(path, f"truncated file ({text})") from e
        raise ImageLoadError(path, f"corrupt or unreadable image data ({type(e).__name__}: {text})") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file", with the reason
        raise ImageLoadError(path, f"cannot decode the image ({type(e).__name__}: {e})") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """The (width, height) of ``path`` after EXIF orientation, from the header only (no decoding)."""
    path = _existing_nonempty(path)
    try:
        with Image.open(path) as im:
            return _oriented_size(im.size, _orientation(im))
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image file Pillow can read (unknown or corrupt format)") from e
    except Exception as e:  # noqa: BLE001
        raise ImageLoadError(path, f"cannot read the image header ({type(e).__name__}: {e})") from e


def _existing_nonempty(path: str | Path) -> Path:
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise ImageLoadError(path, f"cannot read the file ({e.strerror or e})") from e
    if nbytes == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return path


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is treated as "no orientation"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else (size[0], size[1])


def _decode(im: Image.Image, min_decode_size: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    if getattr(im, "is_animated", False):
        im.seek(0)
    orientation = _orientation(im)
    full_size = _oriented_size(im.size, orientation)
    if min_decode_size is not None and im.format == "JPEG":
        want = _oriented_size((max(1, int(min_decode_size[0])), max(1, int(min_decode_size[1]))), orientation)
        if want[0] < im.size[0] and want[1] < im.size[1]:
            im.draft(None, want)
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    else:
        im = im.copy()  # detach from the file before it is closed
    return to_rgb(im), full_size


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (alpha on white, 16-bit scaled)."""
    if im.mode in _HIGH_BIT_DEPTH_MODES:
        im = _high_bit_depth_to_l(im)
    elif im.mode == "1":
        im = im.convert("L")
    im = _to_srgb(im)
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as e:
            raise ValueError(f"pixel mode {im.mode} cannot be converted to RGB") from e
    return im


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer or float grey to 8 bits.

    ``I;16*`` is always 0..65535. For ``I`` (32-bit integers) and ``F`` (floats) the range is not
    stored in the file, so it is inferred: values up to 1.0 (floats) are taken as 0..1, up to 255 as
    8-bit data, up to 65535 as 16-bit data, anything larger as 0..max. Negative values become black.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        top = 65535.0
    else:
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        peak = float(finite.max()) if finite.size else 0.0
        if im.mode == "F" and peak <= 1.0:
            top = 1.0
        elif peak <= 255:
            top = 255.0
        elif peak <= 65535:
            top = 65535.0
        else:
            top = peak
    scaled = np.nan_to_num(arr.astype(np.float64) * (255.0 / top), nan=0.0, posinf=255.0, neginf=0.0)
    out = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    out.info = {k: v for k, v in im.info.items() if k != "transparency"}
    return out


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=1)
def _probe_image() -> Image.Image:
    """Every combination of 0, 51, ..., 255 per channel: enough to tell a transform from identity."""
    levels = range(0, 256, 51)
    colours = [(r, g, b) for r in levels for g in levels for b in levels]
    probe = Image.new("RGB", (len(colours), 1))
    probe.putdata(colours)
    return probe


@functools.lru_cache(maxsize=32)
def _transform_for(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached LittleCMS transform from an embedded profile to sRGB.

    None when the profile cannot be used, or when it is sRGB in all but name (it maps a grid of
    test colours to themselves within 1 level), so sRGB images keep their exact values.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(profile, _srgb_profile(), in_mode, out_mode)
        if in_mode in ("RGB", "RGBA"):
            probe = _probe_image() if in_mode == "RGB" else _probe_image().convert("RGBA")
            mapped = ImageCms.applyTransform(probe, transform)
            diff = np.abs(np.asarray(mapped, dtype=np.int16)[..., :3] - np.asarray(probe, dtype=np.int16)[..., :3])
            if int(diff.max()) <= 1:
                return None
        return transform
    except Exception:  # noqa: BLE001 - a broken or mismatched profile: keep the raw values
        return None


def _to_srgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
    transform = _transform_for(bytes(icc), im.mode, out_mode)
    if transform is None:
        return im
    try:
        converted = ImageCms.applyTransform(im, transform)
    except Exception:  # noqa: BLE001
        return im
    if converted is None:  # pragma: no cover - only for in-place transforms
        return im
    converted.info = {k: v for k, v in im.info.items() if k != "icc_profile"}
    return converted
