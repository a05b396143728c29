"""Decoder details: fused projections, KV-cache decoding, batch independence."""

from __future__ import annotations

import torch

from bitdial.model.llama import FusedLinear, Transformer

from conftest import make_tiny


def test_fused_projections_match_separate(tiny):
    t = dict(tiny.tensors)
    for i in range(tiny.config.n_layers):  # give q/k/v biases so the fused bias path is exercised
        for n in ("q_proj", "k_proj", "v_proj"):
            w = t[f"layers.{i}.self_attn.{n}.weight"]
            t[f"layers.{i}.self_attn.{n}.bias"] = torch.randn(w.shape[0]) * 0.1
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    plain = Transformer(tiny.config, t).eval()
    fused = Transformer(tiny.config, t).eval().fuse()
    assert isinstance(fused.layers[0].self_attn.qkv, FusedLinear) and fused.layers[1].mlp.gate_up is not None
    # the separate modules are views of the fused weight: no second copy
    a = fused.layers[0].self_attn
    assert a.k_proj.weight.data_ptr() == a.qkv.weight.data_ptr() + a.q_proj.weight.numel() * 4
    with torch.inference_mode():
        assert torch.allclose(plain(ids), fused(ids), atol=1e-5)


def test_decode_steps_equal_full_recompute_and_batch_rows_independent(smol):
    m = Transformer(make_tiny(smol.tokenizer, vocab=512, seed=5).config,
                    make_tiny(smol.tokenizer, vocab=512, seed=5).tensors).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = m(ids)
        m.setup_cache(2, 64)
        steps = [m(ids[:, :5], 0)] + [m(ids[:, i:i + 1], i) for i in range(5, 12)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        one = m(ids[1:], 0)
        assert torch.allclose(one, full[1:], atol=1e-5)
