"""The CLIP tokenizer, shipped with the package so that nothing is downloaded.

The files in ``sdlora/models/tokenizer/`` are built from the real CLIP BPE vocabulary by
``scripts/make_clip_tokenizer.py``; they are identical in content to the tokenizer of
openai/clip-vit-large-patch14 that Stable Diffusion 1.x uses. SD 2.x and SDXL's second tokenizer
use the same vocabulary and pad with "!" (:func:`openclip_tokenizer`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
MAX_LENGTH = 77
OPENCLIP_PAD_TOKEN = "!"  # OpenCLIP (SD 2.x, SDXL's second encoder) pads with "!" (id 0)


@lru_cache(maxsize=1)
def _load():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_LENGTH)


def clip_tokenizer():
    """Return the shipped CLIP tokenizer (``model_max_length=77``). Cached; do not mutate it."""
    return _load()


@lru_cache(maxsize=1)
def openclip_tokenizer():
    """The shipped CLIP tokenizer padding with "!" as OpenCLIP does: SD 2.x's tokenizer and SDXL's
    ``tokenizer_2`` (same vocabulary, ``model_max_length=77``). Cached; do not mutate it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=MAX_LENGTH, pad_token=OPENCLIP_PAD_TOKEN)
