"""Captions: template and trigger, keep_tokens shuffle, tag and caption dropout, caption files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sdlora.data import (
    CaptionConfig,
    DatasetError,
    DatasetItem,
    ImageCaptionDataset,
    read_caption,
    split_tags,
    tag_frequency,
)

TAGS = "alpha, beta, gamma, delta, epsilon, zeta, eta, theta"


def test_template_with_caption_and_trigger():
    cfg = CaptionConfig(template="{caption}, in {trigger} style", trigger=" mystyle ")
    assert cfg.trigger == "mystyle"
    assert cfg.render("a cat on a mat", random.Random(0)) == "a cat on a mat, in mystyle style"
    # No caption file: the default caption is the trigger alone.
    assert cfg.render(None, random.Random(0)) == "mystyle"
    assert cfg.default_caption == "mystyle"


def test_template_without_caption_ignores_caption_files():
    cfg = CaptionConfig(template="a painting in {trigger} style", trigger="zxq")
    assert not cfg.uses_caption
    assert cfg.render("a cat", random.Random(0)) == "a painting in zxq style"
    assert cfg.render(None, random.Random(0)) == "a painting in zxq style"
    # Literal braces survive.
    assert CaptionConfig(template="{{x}} {caption}").render("y", random.Random(0)) == "{x} y"


def test_template_errors_name_the_problem():
    with pytest.raises(DatasetError, match=r"\{style\}"):
        CaptionConfig(template="{caption} {style}")
    with pytest.raises(DatasetError, match="no trigger word"):
        CaptionConfig(template="{caption}, {trigger}")
    with pytest.raises(DatasetError, match="caption_dropout_rate"):
        CaptionConfig(caption_dropout_rate=1.5)
    with pytest.raises(DatasetError, match="keep_tokens"):
        CaptionConfig(keep_tokens=-1)
    with pytest.raises(DatasetError, match="malformed"):
        CaptionConfig(template="{caption")


def test_shuffle_keeps_the_first_tokens_and_is_seeded():
    cfg = CaptionConfig(template="{caption}, by {trigger}", trigger="sks", shuffle_tags=True, keep_tokens=2)
    tags = split_tags(TAGS)
    outputs = []
    for seed in range(40):
        out = cfg.render(TAGS, random.Random(seed))
        assert out.endswith(", by sks")
        got = split_tags(out.removesuffix(", by sks"))
        assert got[:2] == ["alpha", "beta"]
        assert sorted(got) == sorted(tags)
        outputs.append(out)
        assert cfg.render(TAGS, random.Random(seed)) == out  # same seed, same caption
    assert len(set(outputs)) > 30  # 6! orders: seeds must give different shuffles
    # Without shuffle the caption stays as written.
    assert CaptionConfig().render(TAGS, random.Random(0)) == TAGS


def test_tag_dropout_never_drops_kept_tokens():
    cfg = CaptionConfig(keep_tokens=1, tag_dropout_rate=0.5)
    lengths = []
    for seed in range(50):
        got = split_tags(cfg.render(TAGS, random.Random(seed)))
        assert got[0] == "alpha"
        assert [t for t in got[1:]] == [t for t in split_tags(TAGS)[1:] if t in got[1:]]  # order kept
        lengths.append(len(got))
    assert min(lengths) < 8 and max(lengths) > 1
    assert 3.0 < sum(lengths) / len(lengths) < 6.0  # 1 + 7 * 0.5 = 4.5 expected


def _items(n: int, caption: str | None = "a, b, c") -> list[DatasetItem]:
    return [DatasetItem(Path(f"/nonexistent/{i}.png"), 1, caption, (64, 64), "set") for i in range(n)]


def test_caption_dropout_rate_and_determinism_through_the_dataset():
    cfg = CaptionConfig(template="{caption}, {trigger}", trigger="sks", caption_dropout_rate=0.25)
    ds = ImageCaptionDataset(_items(2000), captions=cfg, seed=7)
    captions = [ds.plan((i, 0, 0)).caption for i in range(len(ds))]  # plans read no pixels
    dropped = sum(c == "" for c in captions) / len(captions)
    assert 0.21 < dropped < 0.29
    assert set(captions) == {"", "a, b, c, sks"}
    again = ImageCaptionDataset(_items(2000), captions=cfg, seed=7)
    assert [again.plan((i, 0, 0)).caption for i in range(len(again))] == captions
    other_epoch = [ds.plan((i, 1, 0)).caption for i in range(len(ds))]
    other_seed = ImageCaptionDataset(_items(2000), captions=cfg, seed=8)
    assert other_epoch != captions
    assert [other_seed.plan((i, 0, 0)).caption for i in range(len(ds))] != captions


def test_possible_captions_for_caching():
    cfg = CaptionConfig(template="{caption}, {trigger}", trigger="sks", caption_dropout_rate=0.1)
    assert cfg.possible_captions("x") == ["x, sks", ""]
    assert cfg.possible_captions(None) == ["sks", ""]
    with pytest.raises(DatasetError):
        CaptionConfig(shuffle_tags=True).possible_captions("x")


def test_read_caption_variants(tmp_path):
    (tmp_path / "multi.txt").write_text("first line \n\n second line\n", encoding="utf-8")
    assert read_caption(tmp_path / "multi.txt") == ("first line, second line", None)
    (tmp_path / "bom.txt").write_bytes("\ufeffcafé, tag".encode("utf-8"))
    assert read_caption(tmp_path / "bom.txt") == ("café, tag", None)
    (tmp_path / "empty.txt").write_text("  \n")
    text, warning = read_caption(tmp_path / "empty.txt")
    assert text is None and "empty" in warning
    (tmp_path / "latin.txt").write_bytes("café".encode("cp1252"))
    text, warning = read_caption(tmp_path / "latin.txt")
    assert text == "café" and "not UTF-8" in warning and "latin.txt" in warning


def test_tag_frequency_shape():
    items = [
        DatasetItem(Path("a.png"), 10, "sks, red, hat", (64, 64), "10_mystyle"),
        DatasetItem(Path("b.png"), 10, "sks, blue", (64, 64), "10_mystyle"),
        DatasetItem(Path("c.png"), 1, None, (64, 64), "extra"),
        DatasetItem(Path("d.png"), 1, "red", (64, 64), "extra"),
    ]
    assert tag_frequency(items) == {
        "10_mystyle": {"sks": 2, "red": 1, "hat": 1, "blue": 1},
        "extra": {"red": 1},
    }
    rendered = tag_frequency(items, CaptionConfig(template="{caption}, {trigger}", trigger="zz"))
    assert rendered["extra"] == {"zz": 2, "red": 1}
