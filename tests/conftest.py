"""Shared fixtures: tiny real-architecture models built in the test session (no downloads), threads.

Helper functions shared by several modules live in ``helpers.py`` (training data, configs, fresh
diffusers pipelines), ``variant_helpers.py`` (method runs) and ``app_testing.py`` (the app in a child
process); tests import them by module name (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The tiny models run as fast on one thread, and tests start trainer / app subprocesses beside
# the test process: one thread each avoids OpenMP oversubscription, which slows torch by 10x or more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture()
def single_thread():
    """torch on one thread for the test, whatever OMP_NUM_THREADS says (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def tiny_pipe():
    """A fresh tiny StableDiffusionPipeline (random weights, seed 0); safe to modify."""
    from sdlora.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model saved once per session as a diffusers folder. Treat as read-only."""
    from sdlora.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
