"""Registry of adapter methods: name -> ``AdapterMethod`` subclass, imported on first use.

Adding a method means writing ``variants/<method>.py`` with an :class:`AdapterMethod` subclass
and adding one line to ``_REGISTRY``; nothing else (training loop, UI, formats) changes.
"""

from __future__ import annotations

import importlib
from typing import Collection, Mapping

from ..errors import LoraError
from .base import AdapterMethod, adapter_parameters

# name -> "module:Class" (relative to this package)
_REGISTRY: dict[str, str] = {
    "lora": ".lora:PlainLora",
    "dora": ".dora:Dora",
    "lora_fa": ".lora_fa:LoraFA",
    "vera": ".vera:Vera",
    "qlora": ".qlora:QLora",
    "adalora": ".adalora:AdaLora",
    "dylora": ".dylora:DyLora",
    "lora_drop": ".lora_drop:LoraDrop",
    "delta_lora": ".delta_lora:DeltaLora",
    "loha": ".loha:Loha",
    "lokr": ".lokr:Lokr",
}

_instances: dict[str, AdapterMethod] = {}


def method_names() -> list[str]:
    """Names of all registered methods (what the UI and the CLI offer)."""
    return list(_REGISTRY)


def get_method(name: str) -> AdapterMethod:
    """The method registered as ``name``; :class:`LoraError` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise LoraError(f"Unknown LoRA method {name!r}; available methods: {', '.join(_REGISTRY)}.")
    if name not in _instances:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        cls = getattr(importlib.import_module(module_name, __name__), class_name)
        instance = cls()
        if instance.name != name:
            raise LoraError(f"Registry entry {name!r} points to method {instance.name!r}.")
        _instances[name] = instance
    return _instances[name]


def method_for_file(metadata: Mapping[str, str], suffixes: Collection[str] = ()) -> AdapterMethod:
    """The method a LoRA file belongs to: its ``sdlora_method`` entry when that names a registered
    method, else the first method whose :meth:`~AdapterMethod.describe` recognises the file (e.g.
    kohya's DyLoRA), else plain LoRA."""
    name = metadata.get("sdlora_method")
    if name in _REGISTRY:
        return get_method(name)
    for candidate in _REGISTRY:
        method = get_method(candidate)
        if method.describe(metadata, suffixes) is not None:
            return method
    return get_method("lora")


def describe_file(metadata: Mapping[str, str], suffixes: Collection[str] = ()) -> str | None:
    """The network type of a file one of the registered methods recognises (see ``describe``), or None."""
    for candidate in _REGISTRY:
        label = get_method(candidate).describe(metadata, suffixes)
        if label is not None:
            return label
    return None


__all__ = ["AdapterMethod", "adapter_parameters", "describe_file", "get_method", "method_for_file", "method_names"]
