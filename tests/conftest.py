"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from bitdial.loading import default_model_path, load_model
from bitdial.model.llama import Transformer

torch.set_num_threads(min(2, os.cpu_count() or 1))

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw")


@pytest.fixture(scope="session")
def default_gguf():
    return default_model_path()


@pytest.fixture(scope="session")
def smol(default_gguf):
    """The default model's LoadedModel with every tensor read once (fp32)."""
    src = load_model(default_gguf)
    src.tensors = dict(src.tensors)
    return src


@pytest.fixture(scope="session")
def smol_model(smol):
    return Transformer(smol.config, smol.tensors).eval()


@pytest.fixture(scope="session")
def wikitext_path():
    p = os.path.abspath(WIKITEXT)
    if not os.path.isfile(p):
        pytest.skip(f"shared data not found at {p}")
    return p
