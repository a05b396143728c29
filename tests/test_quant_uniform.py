"""Nested uniform quantization: the documented example, the k-bit view formula, search and importance."""

import json
import math

import numpy as np
import pytest
import torch

from bitdial.errors import ArtifactError
from bitdial.quant.qtensor import QuantizedTensor
from bitdial.quant.uniform import CLIP_CANDIDATES, quantize_rtn, quantize_uniform

# docs/bitplanes.md worked example: 2 x 10, B = 4, G = 8 (group 1 = columns 8..9, partial)
DOC_CODES = [[0, 15, 9, 6, 3, 12, 5, 10, 15, 0],
             [7, 1, 15, 0, 11, 4, 13, 2, 0, 15]]
DOC_W = torch.tensor([[-1.0, 0.875, 0.125, -0.25, -0.625, 0.5, -0.375, 0.25, 0.21875, -0.25],
                      [-0.0625, -0.4375, 0.4375, -0.5, 0.1875, -0.25, 0.3125, -0.375, 0.0, 3.75]])
DOC_BYTES_HEX = "A6 01 54 02 6A 01 65 02 9A 01 95 02 56 01 57 02"
DOC_W2 = [[-0.8125, 0.6875, 0.1875, -0.3125, -0.8125, 0.6875, -0.3125, 0.1875, 0.171875, -0.203125],
          [-0.15625, -0.40625, 0.34375, -0.40625, 0.09375, -0.15625, 0.34375, -0.40625, 0.375, 3.375]]


def heavy(n, k, seed, df=3.0):
    g = torch.Generator().manual_seed(seed)
    # student-t via normal / sqrt(chi2/df), from the seeded generator
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(n, k, int(df), generator=g).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df) * 0.02


def err(qt, W, k, w=None):
    d = (qt.dequantize(k) - W) ** 2
    return float((d if w is None else d * w).sum())


def test_doc_example():
    qt = quantize_uniform(DOC_W, max_bits=4, group_size=8, clip="none")
    assert qt.codes(4).tolist() == DOC_CODES
    assert bytes(qt.planes.contiguous().numpy().tobytes()) == bytes.fromhex(DOC_BYTES_HEX)
    assert qt.scales.tolist() == [[0.125, 0.03125], [0.0625, 0.25]]
    assert qt.offsets.tolist() == [[-1.0, -0.25], [-0.5, 0.0]]
    assert qt.scales.dtype == torch.float16 and qt.offsets.dtype == torch.float16
    assert qt.dequantize(4).tolist() == DOC_W.tolist()  # on-grid weights are exact at k = B
    assert qt.dequantize(2).tolist() == DOC_W2
    assert qt.bits_per_weight(2) == (2 * 2 * 2 + 2 * 2 * 4) * 8 / 20  # 2 planes x 2 rows x 2 bytes + scales


def numpy_view(W, scales, offsets, B, k, G):
    """Independent transcription of the documented formulas."""
    W = W.numpy().astype(np.float32)
    N, K = W.shape
    g = np.arange(K) // G
    s = scales.numpy().astype(np.float32)[:, g]
    m = offsets.numpy().astype(np.float32)[:, g]
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint((W - m) / safe), 0, 2 ** B - 1)
    q = np.where(s > 0, q, 0).astype(np.int64)
    c = q >> (B - k)
    per = 2 ** (B - k)
    return c, m + s * (c * per + (per - 1) / 2)


@pytest.mark.parametrize("B,G,shape", [(8, 64, (5, 100)), (4, 32, (3, 70)), (6, 128, (7, 129)), (3, 32, (1, 9))])
def test_view_matches_numpy_formula(B, G, shape):
    W = heavy(*shape, seed=B * 7 + G)
    qt = quantize_uniform(W, max_bits=B, group_size=G)
    assert tuple(qt.scales.shape) == (shape[0], math.ceil(shape[1] / G))
    for k in range(1, B + 1):
        codes, ref = numpy_view(W, qt.scales, qt.offsets, B, k, G)
        assert np.array_equal(qt.codes(k).numpy().astype(np.int64), codes), k
        np.testing.assert_allclose(qt.dequantize(k).numpy(), ref, rtol=1e-6, atol=1e-9)


def test_full_view_is_rtn_without_clipping():
    W = heavy(6, 100, seed=1)
    for B in (2, 4, 8):
        qt = quantize_uniform(W, max_bits=B, group_size=32, clip="none")
        torch.testing.assert_close(qt.dequantize(B), quantize_rtn(W, B, 32), rtol=0, atol=1e-7)


def test_rtn_levels():
    W = heavy(4, 64, seed=2)
    for bits in (2, 3, 8):
        Wq = quantize_rtn(W, bits, 32)
        for row in range(4):
            for grp in range(2):
                assert len(torch.unique(Wq[row, grp * 32:(grp + 1) * 32])) <= 2 ** bits
        torch.testing.assert_close(Wq.amax(1), W.amax(1), rtol=1e-2, atol=1e-4)  # min/max kept, fp16 aside


def test_error_decreases_with_k_and_nested_low_bits_beat_rtn():
    W = heavy(32, 192, seed=3)
    for clip in ("search", "none"):
        qt = quantize_uniform(W, max_bits=8, group_size=64, clip=clip)
        e = [err(qt, W, k) for k in range(1, 9)]
        assert all(a > b for a, b in zip(e, e[1:])), e
        assert e[-1] < e[0] * 1e-3
    # the mid-interval views are better 2- and 3-bit quantizers than min/max RTN at 2 and 3 bits
    qt = quantize_uniform(W, max_bits=8, group_size=64)
    for k in (2, 3):
        assert err(qt, W, k) < float(((quantize_rtn(W, k, 64) - W) ** 2).sum())


def test_search_beats_none_on_low_bits():
    # at G = 64 the default search minimizes the plain squared error these sums measure (saliency 0)
    W = heavy(48, 256, seed=4)
    none = quantize_uniform(W, clip="none")
    low = quantize_uniform(W, bit_weights={2: 1.0, 3: 1.0, 4: 1.0})
    assert sum(err(low, W, k) for k in (2, 3, 4)) < 0.99 * sum(err(none, W, k) for k in (2, 3, 4))
    # the default view weights trade nothing at 2..5 bits and gain overall
    dflt = quantize_uniform(W)
    ratios = [err(dflt, W, k) / err(none, W, k) for k in range(2, 9)]
    assert all(r < 1.0 for r in ratios[:4]), ratios
    assert sum(ratios) < 0.98 * len(ratios), ratios


def saliency_weights(W, G, alpha):
    Wg = W.reshape(W.shape[0], -1, G)
    return (1 + alpha * Wg ** 2 / (Wg ** 2).mean(dim=2, keepdim=True)).reshape(W.shape)


def test_saliency_weights_the_large_weights():
    W = heavy(64, 256, seed=11)
    plain = quantize_uniform(W, saliency=0)
    sal2 = quantize_uniform(W, saliency=2.0)
    # the function's default is the plain squared error at every group size (the artifact picks per module)
    assert torch.equal(quantize_uniform(W).offsets, plain.offsets)
    assert torch.equal(quantize_uniform(W, group_size=128).offsets, quantize_uniform(W, group_size=128, saliency=0).offsets)
    assert not torch.equal(plain.offsets, sal2.offsets)  # it changes the chosen ranges
    # the search lowers what it optimizes: the saliency-weighted error, summed over the weighted views
    sw = saliency_weights(W, 64, 2.0)
    bw = {k: 1.5 ** (8 - k) for k in range(2, 9)}
    rel = [err(sal2, W, k, sw) / err(plain, W, k, sw) for k in range(2, 9)]
    assert sum(bw[k] * r for k, r in zip(range(2, 9), rel)) < sum(bw.values()), rel
    # and so the error on each group's largest weight (by magnitude) at 3..6 bits
    Wg = W.reshape(64, -1, 64)
    top = torch.zeros_like(Wg).scatter_(2, Wg.abs().argmax(dim=2, keepdim=True), 1.0).reshape(W.shape)
    for k in (3, 4, 5, 6):
        assert err(sal2, W, k, top) < err(plain, W, k, top), k
    # a larger saliency weighs the large weights more
    assert err(quantize_uniform(W, saliency=8), W, 4, top) < err(plain, W, 4, top)
    # a partial last group: the rms is over its real columns only (the padding repeats the last column)
    tail = W[:, 254:]  # 2 columns
    a = quantize_uniform(W[:, 126:], group_size=128, saliency=2)  # 130 columns: group 1 = 2 real + 126 padding
    b = quantize_uniform(tail, group_size=8, saliency=2)  # 2 real + 6 padding
    assert torch.equal(a.offsets[:, 1], b.offsets[:, 0]) and torch.equal(a.scales[:, 1], b.scales[:, 0])
    # importance replaces the proxy; clip="none" ignores it
    imp = torch.rand(256, generator=torch.Generator().manual_seed(12)) + 0.5
    assert torch.equal(quantize_uniform(W, importance=imp).offsets, quantize_uniform(W, importance=imp, saliency=0).offsets)
    assert torch.equal(quantize_uniform(W, clip="none", saliency=5).planes, quantize_uniform(W, clip="none").planes)


def test_importance_reduces_weighted_error():
    W = heavy(48, 200, seed=5)
    imp = torch.exp(torch.randn(200, generator=torch.Generator().manual_seed(6)) * 1.5)
    plain = quantize_uniform(W)
    weighted = quantize_uniform(W, importance=imp)
    # importance weighs the views from IMPORTANCE_MIN_VIEW (3) bits up; the 2-bit view keeps the plain error
    ratios = [err(weighted, W, k, imp) / err(plain, W, k, imp) for k in range(3, 7)]  # 3..6 bits
    assert all(r < 1.0 for r in ratios), ratios
    assert sum(ratios) < 0.95 * len(ratios), ratios
    # with the absolute objective the search minimizes exactly this sum per group over the same candidates
    bw = {3: 1.0, 4: 1.0, 5: 1.0}
    a_plain = quantize_uniform(W, bit_weights=bw, objective="absolute")
    a_weighted = quantize_uniform(W, bit_weights=bw, objective="absolute", importance=imp)
    assert sum(err(a_weighted, W, k, imp) for k in bw) <= sum(err(a_plain, W, k, imp) for k in bw) * (1 + 1e-6)


def test_importance_spares_the_lowest_views_and_weighs_the_top_ones():
    """With importance the views below IMPORTANCE_MIN_VIEW keep the plain squared error (a 2-bit-only search
    picks the same ranges with or without importance) and the top two views weigh IMPORTANCE_TOP_WEIGHT."""
    from bitdial.quant.uniform import IMPORTANCE_MIN_VIEW, IMPORTANCE_TOP_WEIGHT, default_bit_weights

    assert IMPORTANCE_MIN_VIEW == 3
    W = heavy(24, 150, seed=7)  # K = 150: a partial last group, whose padding must weigh 0 in the plain error
    imp = torch.exp(torch.randn(150, generator=torch.Generator().manual_seed(8)) * 1.5)
    for bw in ({2: 1.0}, {1: 1.0, 2: 2.0}):
        a, b = quantize_uniform(W, group_size=64, bit_weights=bw), quantize_uniform(W, group_size=64, bit_weights=bw,
                                                                                     importance=imp)
        assert torch.equal(a.scales, b.scales) and torch.equal(a.offsets, b.offsets)
    c = quantize_uniform(W, group_size=64, bit_weights={3: 1.0}, importance=imp)
    assert not torch.equal(c.offsets, quantize_uniform(W, group_size=64, bit_weights={3: 1.0}).offsets)
    plain, weighted = default_bit_weights(8), default_bit_weights(8, importance=True)
    assert weighted == {**plain, 7: IMPORTANCE_TOP_WEIGHT, 8: IMPORTANCE_TOP_WEIGHT} and plain[8] == 1.0
    assert default_bit_weights(4, importance=True) == {2: 2.25, 3: 4.0, 4: 4.0}


def test_guard_keeps_a_view_no_worse_than_nesting_in_every_group():
    """guard=(2,): no group's 2-bit error exceeds that of its plain [min, max] range (clip none), while the
    unguarded importance search does exceed it in some groups; guard views outside the objective are errors."""
    from bitdial.quant.uniform import GUARD_PATTERN, default_guard_map

    W = heavy(40, 150, seed=11)  # a partial last group too
    imp = torch.exp(torch.randn(150, generator=torch.Generator().manual_seed(12)) * 1.5)
    nested = quantize_uniform(W, group_size=64, clip="none")

    def group_err(qt, k):  # [N, n_groups] plain squared error of view k
        d = torch.nn.functional.pad(W - qt.dequantize(k), (0, 192 - 150))
        return (d * d).reshape(40, 3, 64).sum(-1)

    free = quantize_uniform(W, group_size=64, importance=imp)
    guarded = quantize_uniform(W, group_size=64, importance=imp, guard=(2,))
    ref = group_err(nested, 2)
    assert (group_err(free, 2) > ref * (1 + 1e-6)).any()  # the guard has something to do
    assert (group_err(guarded, 2) <= ref * (1 + 1e-6)).all()
    assert not torch.equal(guarded.offsets, free.offsets)
    # the views it does not guard still gain over plain nesting on the importance-weighted error
    wk = lambda qt, k: ((W - qt.dequantize(k)) ** 2 * imp).sum()  # noqa: E731
    assert all(wk(guarded, k) < wk(nested, k) for k in (3, 4, 5))
    assert default_guard_map(64) == {GUARD_PATTERN: (2,), "default": ()}
    assert default_guard_map(32) == default_guard_map(128) == {"default": ()}
    for bad, bw in (((9,), None), ((2,), {3: 1.0})):
        with pytest.raises(ValueError, match="guard views"):
            quantize_uniform(W, group_size=64, importance=imp, guard=bad, bit_weights=bw)


def test_partial_group_and_constant_group():
    W = heavy(3, 70, seed=7)
    W[1, :64] = 0.3  # a constant group: scale 0, exact at every view
    qt = quantize_uniform(W, max_bits=8, group_size=64, clip="none")
    assert qt.scales[1, 0] == 0
    for k in (1, 2, 8):
        assert torch.equal(qt.dequantize(k)[1, :64], torch.full((64,), float(torch.tensor(0.3).half())))
    # the partial last group (6 columns) is quantized from those 6 columns only
    tail = W[:, 64:]
    torch.testing.assert_close(qt.offsets[:, 1].float(), tail.amin(1).half().float())
    torch.testing.assert_close(qt.scales[:, 1].float(), ((tail.amax(1) - tail.amin(1)) / 255).half().float())


def test_bits_per_weight_and_nbytes():
    W = heavy(16, 576, seed=8)
    for G in (32, 64, 128):
        qt = quantize_uniform(W, max_bits=8, group_size=G, clip="none")
        for k in range(1, 9):
            assert qt.bits_per_weight(k) == pytest.approx(k + 32 * math.ceil(576 / G) / 576)
        assert qt.nbytes == 8 * 16 * 72 + 4 * 16 * math.ceil(576 / G)


def test_serialization_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    W = heavy(5, 100, seed=9)
    qt = quantize_uniform(W, max_bits=6, group_size=32)
    meta = json.loads(json.dumps(qt.meta()))
    assert meta == {"method": "uniform", "shape": [5, 100], "group_size": 32, "max_bits": 6, "min_bits": 1,
                    "layout": "planes-v1"}
    tensors = qt.to_tensors("layers.0.mlp.down_proj")
    assert set(tensors) == {f"layers.0.mlp.down_proj.{n}" for n in ("planes", "scales", "offsets")}
    save_file(tensors, str(tmp_path / "q.safetensors"))
    back = QuantizedTensor.from_tensors("layers.0.mlp.down_proj", load_file(str(tmp_path / "q.safetensors")), meta)
    for k in range(1, 7):
        assert torch.equal(back.dequantize(k), qt.dequantize(k))
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors("x", {"x.planes": qt.planes, "x.scales": qt.scales}, meta)
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors("layers.0.mlp.down_proj", tensors, {**meta, "layout": "planes-v0"})
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors("layers.0.mlp.down_proj", tensors, {**meta, "shape": [5, 129]})


def test_bad_arguments():
    W = heavy(2, 16, seed=10)
    for kwargs in ({"group_size": 48}, {"max_bits": 9}, {"clip": "mse"}, {"bit_weights": {9: 1.0}},
                   {"importance": torch.ones(15)}, {"importance": -torch.ones(16)}, {"saliency": -1.0},
                   {"saliency": float("nan")}):
        with pytest.raises(ValueError):
            quantize_uniform(W, **kwargs)
    with pytest.raises(ValueError):
        quantize_uniform(torch.tensor([[float("nan")] * 8]))
    qt = quantize_uniform(W, max_bits=4, group_size=8)
    with pytest.raises(ValueError):
        qt.dequantize(5)
    assert (1.0, 1.0) in CLIP_CANDIDATES
