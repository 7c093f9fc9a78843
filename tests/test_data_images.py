"""Reading images of every kind: a corpus of good and bad files built here, scanned and loaded."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from sdlora.data import (
    DatasetError,
    ImageLoadError,
    NoUsableImagesError,
    image_size,
    load_image,
    scan_dataset,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, expected, tol=6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _jpeg_bytes(size=(120, 90)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def build_corpus(folder: Path) -> dict[str, str | None]:
    """Write the test corpus; returns file name -> expected skip-reason fragment (None = loads)."""
    expect: dict[str, str | None] = {}

    data = _jpeg_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expect["truncated.jpg"] = "truncated"

    (folder / "zero.png").write_bytes(b"")
    expect["zero.png"] = "empty"

    (folder / "text.png").write_text("this is not an image\n" * 20)
    expect["text.png"] = "not an image"

    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    expect["photo.heic"] = "convert"

    Image.new("RGB", (10000, 10), RED).save(folder / "strip.png")
    expect["strip.png"] = "too small"

    # 16-bit grey: a horizontal ramp 0..65535.
    ramp = np.tile(np.linspace(0, 65535, 128).round().astype(np.uint16), (72, 1))
    Image.fromarray(ramp).save(folder / "gray16.png")
    Image.fromarray(ramp).save(folder / "gray16.tif")
    expect["gray16.png"] = expect["gray16.tif"] = None

    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red in CMYK
    expect["cmyk.jpg"] = None

    # RGBA: left third opaque red, middle half-transparent blue, right third fully transparent black.
    rgba = Image.new("RGBA", (90, 80), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 30, 80))
    rgba.paste((0, 0, 255, 128), (30, 0, 60, 80))
    rgba.save(folder / "rgba.png")
    expect["rgba.png"] = None

    la = Image.new("LA", (80, 80), (0, 0))
    la.paste((0, 255), (0, 0, 40, 80))
    la.save(folder / "la.png")
    expect["la.png"] = None

    # Stored 96x64 with a red mark top-left and a blue mark top-right; EXIF says "rotate 90 CW".
    stored = Image.new("RGB", (96, 64), GREEN)
    stored.paste(RED, (0, 0, 16, 16))
    stored.paste(BLUE, (80, 0, 96, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    expect["rotated.jpg"] = None

    frame0 = Image.new("P", (80, 80), 0)
    frame0.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    frame1 = frame0.copy()
    frame1.paste(1, (0, 0, 80, 80))
    frame0.save(folder / "animated.gif", save_all=True, append_images=[frame1], duration=100, loop=0)
    expect["animated.gif"] = None

    Image.new("L", (80, 70), 77).save(folder / "gray.png")
    expect["gray.png"] = None

    # Palette: index 0 transparent (its colour black), index 1 red; left half transparent.
    pal = Image.new("P", (80, 80), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 40, 80))
    pal.save(folder / "palette.png", transparency=0)
    expect["palette.png"] = None

    Image.new("RGB", (80, 80), (10, 200, 30)).save(folder / "lossless.webp", lossless=True)
    Image.new("RGB", (80, 80), (10, 200, 30)).save(folder / "plain.bmp")
    Image.new("RGB", (80, 80), (10, 200, 30)).save(folder / "plain.tiff")
    Image.new("1", (80, 80), 1).save(folder / "bilevel.png")
    expect["lossless.webp"] = expect["plain.bmp"] = expect["plain.tiff"] = expect["bilevel.png"] = None

    (folder / "gray.txt").write_text("a caption")  # captions and other files are not images
    (folder / "notes.json").write_text("{}")
    (folder / "._rotated.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: ignored
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    expect = build_corpus(folder)
    return folder, expect, scan_dataset(folder)


def test_scan_sorts_corpus_into_usable_and_skipped(corpus):
    folder, expect, scan = corpus
    loaded = {item.path.name for item in scan.items}
    skipped = {s.path.name: s.reason for s in scan.skipped}
    assert loaded == {name for name, reason in expect.items() if reason is None}
    assert set(skipped) == {name for name, reason in expect.items() if reason is not None}
    for name, reason in skipped.items():
        assert expect[name] in reason.lower(), (name, reason)
    # Non-image files are neither items nor skipped.
    assert "gray.txt" not in skipped and "notes.json" not in skipped and "._rotated.jpg" not in skipped
    assert scan.num_images == len(loaded) and scan.num_with_repeats == len(loaded)


def test_each_bad_file_raises_image_load_error_with_reason(corpus):
    folder, expect, _ = corpus
    for name in ("truncated.jpg", "zero.png", "text.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(folder / name)
        assert info.value.path.name == name and expect[name] in info.value.reason.lower()


def test_every_usable_file_loads_as_8bit_rgb(corpus):
    _, _, scan = corpus
    for item in scan.items:
        img = load_image(item.path)
        assert img.mode == "RGB"
        assert img.size == item.size


def test_exif_orientation_6_is_rotated_clockwise(corpus):
    folder, _, scan = corpus
    img = load_image(folder / "rotated.jpg")
    assert img.size == (64, 96)  # stored 96x64, shown portrait
    assert image_size(folder / "rotated.jpg") == (64, 96)
    assert next(i.size for i in scan.items if i.path.name == "rotated.jpg") == (64, 96)
    # A 90 degree clockwise turn moves top-left to top-right and top-right to bottom-right.
    assert close(img.getpixel((58, 5)), RED, 12)
    assert close(img.getpixel((58, 90)), BLUE, 12)
    assert close(img.getpixel((5, 5)), GREEN, 12)
    assert close(img.getpixel((5, 90)), GREEN, 12)


def test_16bit_grey_is_scaled_not_clipped(corpus):
    folder, _, _ = corpus
    for name in ("gray16.png", "gray16.tif"):
        img = load_image(folder / name)
        row = np.asarray(img)[0, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255
        assert abs(row[64] - 129) <= 1  # 64/127 of full scale, not white
        assert np.all(np.diff(row) >= 0)  # a monotonic ramp, not a step to 255
        assert (row == 255).sum() <= 2
        assert np.all(np.asarray(img)[..., 0] == np.asarray(img)[..., 2])


def test_cmyk_becomes_red(corpus):
    folder, _, _ = corpus
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert close(load_image(folder / "cmyk.jpg").getpixel((40, 40)), RED, 10)


def test_alpha_is_composited_on_white(corpus):
    folder, _, _ = corpus
    img = load_image(folder / "rgba.png")
    assert img.getpixel((10, 40)) == RED
    assert close(img.getpixel((45, 40)), (127, 127, 255), 2)  # half blue over white
    assert img.getpixel((80, 40)) == WHITE  # transparent black shows as white, not black
    la = load_image(folder / "la.png")
    assert la.getpixel((10, 10)) == (0, 0, 0) and la.getpixel((70, 10)) == WHITE


def test_palette_transparency_is_white(corpus):
    folder, _, _ = corpus
    img = load_image(folder / "palette.png")
    assert img.getpixel((10, 10)) == WHITE and img.getpixel((70, 10)) == RED


def test_animated_gif_takes_the_first_frame(corpus):
    folder, _, _ = corpus
    assert Image.open(folder / "animated.gif").n_frames == 2
    assert load_image(folder / "animated.gif").getpixel((40, 40)) == RED


def test_grey_bilevel_webp_bmp_tiff_colours(corpus):
    folder, _, _ = corpus
    assert load_image(folder / "gray.png").getpixel((3, 3)) == (77, 77, 77)
    assert load_image(folder / "bilevel.png").getpixel((3, 3)) == WHITE
    for name in ("lossless.webp", "plain.bmp", "plain.tiff"):
        assert load_image(folder / name).getpixel((40, 40)) == (10, 200, 30), name


def _matrix_icc_profile(gamma: float, name: str) -> bytes:
    """A minimal ICC v2 RGB display profile: sRGB's D50 primaries with a pure power-law curve."""

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    text = name.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def test_embedded_colour_profile_is_converted_to_srgb(tmp_path):
    linear = _matrix_icc_profile(1.0, "Linear sRGB primaries")
    Image.new("RGB", (80, 80), (128, 128, 128)).save(tmp_path / "linear.png", icc_profile=linear)
    # Linear 0.5 is 188 in sRGB's encoding (1.055 * 0.5 ** (1 / 2.4) - 0.055 = 0.735).
    assert close(load_image(tmp_path / "linear.png").getpixel((5, 5)), (188, 188, 188), 2)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (80, 80), (128, 60, 200)).save(tmp_path / "srgb.png", icc_profile=srgb)
    assert load_image(tmp_path / "srgb.png").getpixel((5, 5)) == (128, 60, 200)  # untouched


def test_reduced_jpeg_decode_keeps_the_picture(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 800).astype(np.uint8), (600, 1))
    Image.fromarray(np.stack([ramp, ramp[:, ::-1], ramp], -1)).save(tmp_path / "big.jpg", quality=95)
    full = load_image(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", min_decode_size=(200, 150))
    assert full.size == (800, 600)
    assert small.size[0] >= 200 and small.size[1] >= 150 and small.size[0] < 800
    diff = np.abs(np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=int) - np.asarray(small, dtype=int))
    assert diff.mean() < 3


def test_missing_folder_and_empty_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "file.png")
    empty = tmp_path / "only_bad"
    empty.mkdir()
    (empty / "a.png").write_text("not an image")
    (empty / "a.txt").write_text("caption")
    with pytest.raises(NoUsableImagesError) as info:
        scan_dataset(empty)
    assert str(empty) in str(info.value) and "a.png" in str(info.value)
    assert [s.path.name for s in info.value.scan.skipped] == ["a.png"]
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(NoUsableImagesError, match=str(nothing)):
        scan_dataset(nothing)
