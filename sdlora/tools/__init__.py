"""After training: merge LoRAs into a base model, combine several into one, resize one, or extract one
from two checkpoints. Library functions without any UI; ``sdlora merge-into | combine | resize |
extract`` and the app call them.

Each tool writes its result atomically (a temporary name, then a rename) and returns a
:class:`ToolReport`: one row per layer (``columns`` name the fields) and a ``summary`` in words.
Long loops call ``progress(done, total, label)`` when given. Bad input (a missing or non-LoRA
file, a bad ``FILE:WEIGHT``, a rank below 1, files of different model families) raises
:class:`ToolError` (a :class:`~sdlora.lora.errors.LoraError`) with a one-line message, or the file
readers' ``LoraFileError`` / ``ModelLoadError``. :func:`read_weights` reads a LoRA file into
weights with its family (no base model needed for SD 1.x / 2.x / XL files).

::

    from sdlora.tools import merge_into, combine_loras, resize_lora, extract_lora

    merge_into("model.safetensors", ["style.safetensors:0.8", "detail.safetensors:0.5"], "merged.safetensors")
    combine_loras(["a.safetensors:1", "b.safetensors:0.5"], "ab.safetensors")              # exact: ranks add up
    combine_loras(["a.safetensors:1", "b.safetensors:0.5"], "ab-r16.safetensors", rank=16)  # SVD, errors reported
    resize_lora("big.safetensors", "small.safetensors", rank=8)
    resize_lora("big.safetensors", "dyn.safetensors", dynamic="sv_fro=0.9", rank=32)        # rank 32 = the cap
    report = extract_lora("base.safetensors", "finetune.safetensors", "diff.safetensors", rank=32, conv_rank=16)
    print(report.table(limit=20)); print(report.summary)
"""

from __future__ import annotations

from ._common import LoadedLora, ModelCache, Progress, ToolError, ToolReport, parse_weighted, read_weights
from .combine import combine_loras, combine_weights
from .extract import extract_from_models, extract_lora
from .merge import merge_into, merge_weights
from .resize import DYNAMIC_METHODS, dynamic_rank, parse_dynamic, resize_lora, resize_weights

__all__ = [
    "DYNAMIC_METHODS",
    "LoadedLora",
    "ModelCache",
    "Progress",
    "ToolError",
    "ToolReport",
    "combine_loras",
    "combine_weights",
    "dynamic_rank",
    "extract_from_models",
    "extract_lora",
    "merge_into",
    "merge_weights",
    "parse_dynamic",
    "parse_weighted",
    "read_weights",
    "resize_lora",
    "resize_weights",
]
