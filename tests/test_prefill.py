"""The prefill path: native row-range dequantization (csrc/dequant.c) and tiled GEMMs in AnyPrecisionLinear."""

from __future__ import annotations

import pytest
import torch

import bitdial.kernels as BK
from bitdial.runtime.anyprec import AnyPrecisionLinear, PrefillSettings, build_model, prefill_dtype
from test_kernels import PAD, random_qt

pytestmark = pytest.mark.skipif(not BK.available(), reason="native kernels not built")

SHAPES = [(1, 32, 32), (7, 96, 32), (33, 200, 64), (64, 1000, 128), (130, 77, 32)]  # (N, K, G): odd K and N


def _variants_for_dequant():
    # dequant has a portable build and an AVX-512 build, chosen by the default ISA family
    return [v for v in BK.variants() if v in ("ref", "avx512-gfni", "avx512-mask", "avx2", "neon", "neon-dot")]


@pytest.mark.parametrize("N,K,G", SHAPES)
def test_dequant_rows_match_reference(N, K, G):
    gen = torch.Generator().manual_seed(N * K + G)
    before = BK.variant()
    try:
        for v in _variants_for_dequant():
            BK.set_isa(v)
            for B in (3, 8):
                qt = random_qt(N, K, G, B, gen)
                for k in range(1, B + 1):
                    ref = qt.dequantize(k)
                    n0, n1 = (N // 3, N) if N > 2 else (0, N)
                    for dt in (torch.float32, torch.bfloat16):
                        buf = torch.full(((n1 - n0) * K + 2 * PAD,), 12345.0, dtype=dt)
                        out = buf[PAD:PAD + (n1 - n0) * K].view(n1 - n0, K)
                        BK.dequant(qt, k, n0, n1, out)
                        assert (buf[:PAD] == 12345.0).all() and (buf[-PAD:] == 12345.0).all(), "wrote outside"
                        want = ref[n0:n1].to(dt)
                        tol = 1e-6 if dt == torch.float32 else 8e-3
                        err = (out.float() - want.float()).abs().max() / ref.abs().max()
                        assert err <= tol, (v, B, k, dt, float(err))
    finally:
        BK.set_isa(before)


def test_dequant_validation():
    qt = random_qt(8, 64, 32, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="row range"):
        BK.dequant(qt, 2, 4, 12, torch.empty(8, 64))
    with pytest.raises(ValueError, match="k must be"):
        BK.dequant(qt, 5, 0, 8, torch.empty(8, 64))
    with pytest.raises(ValueError, match="contiguous fp32 or bf16"):
        BK.dequant(qt, 2, 0, 8, torch.empty(8, 64, dtype=torch.float16))


@pytest.mark.parametrize("tile_bytes", [1 << 10, 2 << 20])  # many tiles / one tile
def test_tiled_prefill_matches_reference(tile_bytes):
    gen = torch.Generator().manual_seed(5)
    qt = random_qt(150, 96, 32, 6, gen)
    bias = torch.randn(150, generator=gen)
    lin = AnyPrecisionLinear("t", qt, bias)
    x = torch.randn(2, 40, 96, generator=gen)  # 80 rows: more than the decode kernels take
    for k in (2, 4, 6):
        ref = x @ qt.dequantize(k).T + bias
        lin.prefill = PrefillSettings(torch.float32, tile_bytes=tile_bytes)
        y = lin(x, k)
        assert y.shape == ref.shape
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        lin.prefill = PrefillSettings(torch.bfloat16, tile_bytes=tile_bytes)
        yb = lin(x, k)
        assert (yb - ref).abs().max() <= 3e-2 * ref.abs().max()
        assert not lin._cache  # the whole float weight was never built


def test_model_prefill_dtypes(smol, tmp_path):
    from conftest import tiny_artifact

    p = tiny_artifact(tmp_path / "t.bitdial", smol.tokenizer)
    model = build_model(p, 4, prefill_dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 40))
    with torch.inference_mode():
        model.setup_cache(1, 64)
        y32 = model(ids, 0)
        model.prefill.native = False  # the cached whole-weight reference path
        yref = model(ids, 0)
        model.prefill.native = True
        with prefill_dtype(model, torch.bfloat16):
            assert model.layers[0].self_attn.prefill_sdpa_dtype == torch.bfloat16
            ybf = model(ids, 0)
        assert model.layers[0].self_attn.prefill_sdpa_dtype is None
    assert (y32 - yref).abs().max() <= 1e-4 * yref.abs().max()
    assert (ybf - yref).abs().max() <= 5e-2 * yref.abs().max()
    assert (ybf.argmax(-1) == yref.argmax(-1)).float().mean() > 0.9
    with pytest.raises(Exception, match="float32 or bfloat16"):
        model.prefill.dtype = torch.float16


def test_generation_prompt_uses_generation_dtype(smol, tmp_path):
    from conftest import tiny_artifact

    from bitdial.runtime.generate import SamplingParams, generate

    p = tiny_artifact(tmp_path / "g.bitdial", smol.tokenizer)
    model = build_model(p, 4, generation_prefill_dtype=torch.bfloat16)
    seen = []
    orig = model.prefill.convert

    def spy(x):
        seen.append(model.prefill.dtype)
        return orig(x)

    model.prefill.convert = spy
    generate(model, smol.tokenizer, list(range(1, 30)), SamplingParams(max_tokens=3, stop_ids=[]))
    assert seen and set(seen) == {torch.bfloat16}  # the prompt ran in bf16 tiles
    assert model.prefill.dtype == torch.float32  # and direct calls are back to exact fp32
