"""Activation importance for the clipping search: from a text, or from random token ids (no text)."""

import pytest
import torch

from bitdial.quant.calibrate import RANDOM, collect_importance, random_ids


def test_random_ids_are_seeded_and_in_range():
    a, b, c = random_ids(1000, 256, seed=0), random_ids(1000, 256, seed=0), random_ids(1000, 256, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (256,) and int(a.min()) >= 0 and int(a.max()) < 1000


def test_random_token_importance_finds_the_text_importance(smol, wikitext_path):
    """The columns that carry large activations are a property of the model: importance measured on random
    token ids correlates with the one measured on real text, module by module (the default model)."""
    rnd = collect_importance(smol, RANDOM, n_tokens=512, ctx=256, progress=False)
    txt = collect_importance(smol, wikitext_path, n_tokens=512, ctx=256, progress=False)
    names = smol.config.linear_names()
    assert set(names) <= set(rnd) and set(rnd) == set(txt)
    for n in names:
        K = smol.tensors[f"{n}.weight"].shape[1]
        assert rnd[n].shape == (K,) and bool(torch.isfinite(rnd[n]).all()) and float(rnd[n].min()) >= 0
    corr = sorted(float(torch.corrcoef(torch.stack([rnd[n].clamp_min(1e-12).log(),
                                                     txt[n].clamp_min(1e-12).log()]))[0, 1]) for n in names)
    assert corr[len(corr) // 2] > 0.5, corr  # median module
    again = collect_importance(smol, RANDOM, n_tokens=512, ctx=256, progress=False)
    assert all(torch.equal(again[n], rnd[n]) for n in names)  # seeded: the same artifact twice
    with pytest.raises(ValueError, match="at least 16 tokens"):
        collect_importance(smol, RANDOM, n_tokens=8, progress=False)
