"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from bitdial.loading import default_model_path, load_model
from bitdial.model.llama import Transformer

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.join(os.path.dirname(__file__), "..")
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


def make_tiny(tokenizer, *, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96, vocab=None, seed=0,
              tie=True):
    """A tiny random Llama (real tokenizer, random weights) for fast unit tests."""
    from bitdial.loading import LoadedModel, ModelConfig

    g = torch.Generator().manual_seed(seed)
    V = vocab or tokenizer.vocab_size
    cfg = ModelConfig(arch="llama", vocab_size=V, dim=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, hidden_dim=hidden, max_seq_len=512, tie_embeddings=tie)
    hd = dim // n_heads
    t = {"embed_tokens.weight": torch.randn(V, dim, generator=g) * 0.5, "norm.weight": torch.ones(dim)}
    if not tie:
        t["lm_head.weight"] = torch.randn(V, dim, generator=g) * 0.1
    for i in range(n_layers):
        p = f"layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        for n, shape in (("self_attn.q_proj", (n_heads * hd, dim)), ("self_attn.k_proj", (n_kv_heads * hd, dim)),
                         ("self_attn.v_proj", (n_kv_heads * hd, dim)), ("self_attn.o_proj", (dim, n_heads * hd)),
                         ("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim)),
                         ("mlp.down_proj", (dim, hidden))):
            t[f"{p}.{n}.weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
    return LoadedModel(config=cfg, tensors=t, tokenizer=tokenizer, source="tiny-random", kind="test")


@pytest.fixture(scope="session")
def tiny(smol):
    return make_tiny(smol.tokenizer, vocab=512)


def tiny_artifact(path, tokenizer, seed=0):
    """A tiny random model (full vocabulary, so real text tokenizes in range) quantized to ``path``."""
    from bitdial.artifact import QuantSettings, write_artifact

    src = make_tiny(tokenizer, seed=seed)
    write_artifact(src, path, QuantSettings(group_size=32, clip="none"), progress=False, source_hash=False)
    return path


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """Calibration text that ships with the repo (README + docs), so the tests need no shared data."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(open(os.path.join(ROOT, f)).read() for f in ("README.md", "docs/bitplanes.md",
                                                                          "docs/artifact.md")))
    return p
