"""Captions: reading ``.txt`` files, the template with a trigger word, tag shuffle and dropout.

Rendering one caption (:meth:`CaptionConfig.render`), in this order, with a seeded RNG:

1. **Caption dropout**: with probability ``caption_dropout_rate`` the whole caption becomes ``""``
   (the model sees the unconditional prompt, as in kohya's ``caption_dropout_rate``).
2. **Template** without ``{caption}`` (e.g. ``"a painting in {trigger} style"``): every image gets the
   template with the trigger word filled in; caption files are not used.
3. **No caption file**: the image gets the default caption, the trigger word alone.
4. Otherwise the caption's tags (split on ``separator``, ``","`` by default) are shuffled except the
   first ``keep_tokens`` (kohya's ``shuffle_caption`` / ``keep_tokens``), then each tag that is not
   kept is dropped with probability ``tag_dropout_rate``; the result fills ``{caption}`` in the
   template. Without shuffle or tag dropout the caption text is used as written (only runs of
   whitespace and empty comma segments are tidied).

The template's own words (and the trigger word in it) stay where the template puts them; only the
caption's tags move. This differs from kohya, whose ``caption_prefix``/``caption_suffix`` are shuffled
with the tags unless ``keep_tokens`` protects them.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

_ALLOWED_FIELDS = frozenset({"caption", "trigger"})
_SPACES = re.compile(r"[ \t\r\n]+")
_EMPTY_SEGMENTS = re.compile(r"\s*,(\s*,)+\s*")


def read_caption(path: str | Path) -> tuple[str | None, str | None]:
    """Read a caption file: ``(text, warning)``.

    Lines are stripped and the non-empty ones joined with ``", "``. An empty file gives ``None``
    (the image is treated as uncaptioned). Text that is not UTF-8 (a BOM is allowed) is read as
    Windows-1252 / Latin-1 and a warning says so. A file that cannot be read gives ``None`` and a
    warning.
    """
    path = Path(path)
    warning = None
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"{path}: caption file cannot be read ({e.strerror or e}); the image is used without it"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        warning = f"{path}: caption file is not UTF-8; it was read as Windows-1252, check its accents"
    lines = [line.strip() for line in text.splitlines()]
    joined = ", ".join(line for line in lines if line)
    if not joined:
        return None, f"{path}: caption file is empty; the image gets the default caption"
    return joined, warning


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Comma-separated tags of ``caption``, stripped, empty ones removed."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def _tidy(text: str) -> str:
    """Collapse whitespace and empty comma segments left by an empty ``{caption}`` or dropped tags."""
    text = _SPACES.sub(" ", text)
    text = _EMPTY_SEGMENTS.sub(", ", text)
    return text.strip(" ,")


@dataclass(frozen=True)
class CaptionConfig:
    """How captions are built from caption files, a template and a trigger word (see module doc).

    ``template`` may use ``{caption}`` (the caption file's text) and ``{trigger}`` (``trigger``);
    literal braces are written ``{{`` and ``}}``.
    """

    template: str = "{caption}"
    trigger: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    separator: str = ","

    def __post_init__(self) -> None:
        object.__setattr__(self, "trigger", self.trigger.strip())
        fields = self._template_fields()
        unknown = sorted(fields - _ALLOWED_FIELDS)
        if unknown:
            names = ", ".join("{" + f + "}" for f in unknown)
            raise DatasetError(
                f"caption template {self.template!r} uses {names}; only {{caption}} and {{trigger}} are "
                "available (write {{ and }} for literal braces)"
            )
        if "trigger" in fields and not self.trigger:
            raise DatasetError(
                f"caption template {self.template!r} uses {{trigger}} but no trigger word is set: set `trigger`"
                " or remove {trigger} from the template"
            )
        if "caption" not in fields and not self.template.strip():
            raise DatasetError("caption template is empty: use '{caption}' to train on the caption files")
        if not self.separator:
            raise DatasetError("caption separator must not be empty")
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise DatasetError(f"keep_tokens must be an integer >= 0, got {self.keep_tokens!r}")
        for name in ("caption_dropout_rate", "tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise DatasetError(f"{name} must be between 0 and 1, got {value!r}")

    def _template_fields(self) -> set[str]:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise DatasetError(f"caption template {self.template!r} is malformed ({e}); write {{{{ and }}}} for literal braces") from e
        fields: set[str] = set()
        for _literal, field, spec, conversion in parsed:
            if field is None:
                continue
            if field == "" or spec or conversion:
                raise DatasetError(
                    f"caption template {self.template!r}: use plain {{caption}} / {{trigger}} placeholders"
                )
            fields.add(field)
        return fields

    @property
    def uses_caption(self) -> bool:
        """Whether the template contains ``{caption}`` (otherwise caption files are not used)."""
        return "caption" in self._template_fields()

    @property
    def default_caption(self) -> str:
        """The caption of an image without a caption file: the trigger word alone."""
        return self.trigger

    @property
    def varies(self) -> bool:
        """Whether a caption can come out differently from one step to the next beyond dropout to ``""``."""
        return self.shuffle_tags or self.tag_dropout_rate > 0

    def base_caption(self, caption: str | None) -> str:
        """The caption with no randomness applied (no dropout, tags in file order)."""
        if not self.uses_caption:
            return _tidy(self.template.format(trigger=self.trigger))
        if caption is None:
            return self.default_caption
        return _tidy(self.template.format(caption=caption.strip(), trigger=self.trigger))

    def possible_captions(self, caption: str | None) -> list[str]:
        """Every caption :meth:`render` can give when :attr:`varies` is false (for caching encodings)."""
        if self.varies:
            raise DatasetError("captions vary every step when shuffle_tags or tag_dropout_rate is set")
        out = [self.base_caption(caption)]
        if self.caption_dropout_rate > 0 and out[0] != "":
            out.append("")
        return out

    def render(self, caption: str | None, rng: random.Random) -> str:
        """The caption for one training sample, drawing from ``rng`` (see the module docstring)."""
        if self.caption_dropout_rate > 0 and rng.random() < self.caption_dropout_rate:
            return ""
        if not self.uses_caption or caption is None or not self.varies:
            return self.base_caption(caption)
        tags = split_tags(caption, self.separator)
        fixed, flexible = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.shuffle_tags:
            rng.shuffle(flexible)
        if self.tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= self.tag_dropout_rate]
        body = ", ".join(fixed + flexible)
        return _tidy(self.template.format(caption=body, trigger=self.trigger))
