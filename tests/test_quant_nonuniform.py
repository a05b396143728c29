"""Non-uniform any-precision: the cluster tree, LUTs as weighted means, k-means quality, vs uniform."""

import json

import numpy as np
import pytest
import torch

from bitdial.quant.nonuniform import derive_lower_lut, quantize_nonuniform
from bitdial.quant.qtensor import QuantizedTensor
from bitdial.quant.uniform import quantize_uniform


def heavy(n, k, seed, df=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(n, k, int(df), generator=g).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df) * 0.02


def mse(qt, W, k, w=None):
    d = (qt.dequantize(k) - W) ** 2
    return float((d if w is None else d * w).sum())


def test_cluster_tree_and_lut_are_weighted_means():
    W = heavy(6, 100, seed=1)
    imp = torch.exp(torch.randn(100, generator=torch.Generator().manual_seed(2)))
    qt, masses = quantize_nonuniform(W, max_bits=6, importance=imp, return_masses=True)
    Wn, wn = W.double().numpy(), imp.double().numpy()
    codes6 = qt.codes(6).numpy().astype(np.int64)
    for k in range(2, 7):
        ck = qt.codes(k).numpy().astype(np.int64)
        assert np.array_equal(ck, codes6 >> (6 - k))
        lut = qt.luts[k].float().numpy()
        assert lut.shape == (6, 2 ** k)
        for n in range(6):
            # clusters are intervals of the row, ordered by code: max(cluster c) < min(cluster c') for c < c'
            order = np.argsort(Wn[n], kind="stable")
            assert np.all(np.diff(ck[n][order]) >= 0), (k, n)
            for c in np.unique(ck[n]):
                sel = ck[n] == c
                ref = (Wn[n][sel] * wn[sel]).sum() / wn[sel].sum()
                assert lut[n, c] == pytest.approx(ref, rel=2e-3, abs=1e-6)  # fp16 LUT
                assert masses[k][n, c].item() == pytest.approx(wn[sel].sum(), rel=1e-9)
    # k = 2 (below the 3-bit seed): the weighted mean of the two merged 3-bit children
    l3 = qt.luts[3].double()
    merged = derive_lower_lut(l3, masses[3])
    torch.testing.assert_close(qt.luts[2].double(), merged, rtol=2e-3, atol=1e-6)
    # and LUT_k[c] lies between its children LUT_{k+1}[2c], LUT_{k+1}[2c+1] wherever both are used
    for k in range(2, 6):
        lo, hi = qt.luts[k + 1][:, 0::2].float(), qt.luts[k + 1][:, 1::2].float()
        used = (masses[k + 1][:, 0::2] > 0) & (masses[k + 1][:, 1::2] > 0)
        mid = qt.luts[k].float()
        assert bool(((mid >= lo - 1e-3) & (mid <= hi + 1e-3))[used].all())


def numpy_lloyd(x, w, n_clusters, iters=300):
    """Reference weighted 1-D Lloyd from weighted quantiles, one row at a time."""
    order = np.argsort(x)
    xs, ws = x[order], w[order]
    cw = np.cumsum(ws) / ws.sum()
    mu = np.array([xs[np.searchsorted(cw, (j + 0.5) / n_clusters)] for j in range(n_clusters)])
    for _ in range(iters):
        a = np.abs(x[:, None] - mu[None]).argmin(1)
        for j in range(n_clusters):
            if np.any(a == j):
                mu[j] = (x[a == j] * w[a == j]).sum() / w[a == j].sum()
    a = np.abs(x[:, None] - mu[None]).argmin(1)
    return (w * (x - mu[a]) ** 2).sum()


def test_seed_kmeans_matches_reference_lloyd():
    W = heavy(8, 256, seed=3, df=5.0)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.1
    qt = quantize_nonuniform(W, max_bits=4, importance=imp)
    ours = ((qt.dequantize(3).double() - W.double()) ** 2 * imp.double()).sum(1).numpy()
    ref = np.array([numpy_lloyd(W[n].double().numpy(), imp.double().numpy(), 8) for n in range(8)])
    assert np.all(ours <= ref * 1.02 + 1e-12), (ours / ref)


def test_splits_are_optimal_two_means():
    W = heavy(4, 64, seed=5)
    qt = quantize_nonuniform(W, max_bits=5)
    x = W.double().numpy()
    for k in (3, 4):
        parent = qt.codes(k).numpy()
        child = qt.codes(k + 1).numpy() & 1
        for n in range(4):
            for c in np.unique(parent[n]):
                v = np.sort(x[n][parent[n] == c])
                sse = lambda a: ((a - a.mean()) ** 2).sum() if a.size else 0.0  # noqa: E731
                best = min(sse(v[:t]) + sse(v[t:]) for t in range(v.size + 1))
                got = x[n][(parent[n] == c) & (child[n] == 0)], x[n][(parent[n] == c) & (child[n] == 1)]
                assert sse(got[0]) + sse(got[1]) <= best + 1e-12


def test_beats_uniform_at_3_bits_on_heavy_tails():
    W = heavy(32, 512, seed=6)
    nu = quantize_nonuniform(W, max_bits=8)
    u = quantize_uniform(W, max_bits=8, group_size=64)  # more metadata than the per-row LUT, still loses
    assert mse(nu, W, 3) < 0.9 * mse(u, W, 3)
    e = [mse(nu, W, k) for k in range(2, 9)]
    assert all(a > b for a, b in zip(e, e[1:])), e


def test_importance_reduces_weighted_error():
    W = heavy(32, 256, seed=7, df=5.0)
    imp = torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(8)) * 1.5)
    plain, weighted = quantize_nonuniform(W, 6), quantize_nonuniform(W, 6, importance=imp)
    for k in range(2, 7):
        assert mse(weighted, W, k, imp) < 0.95 * mse(plain, W, k, imp), k


def test_degenerate_rows():
    W = torch.zeros(3, 40)
    W[1] = 0.5  # constant
    W[2, ::2] = 0.25  # two distinct values
    qt = quantize_nonuniform(W, max_bits=8)
    for k in range(2, 9):
        assert torch.isfinite(qt.luts[k].float()).all()
        assert torch.equal(qt.dequantize(k)[:2], W[:2])
        if k >= 3:  # the 8-cluster seed separates the two values; k = 2 merges seed pairs and may not
            assert torch.equal(qt.dequantize(k), W)


def test_bits_per_weight_and_serialization(tmp_path):
    from safetensors.torch import load_file, save_file

    W = heavy(4, 576, seed=9)
    qt = quantize_nonuniform(W, max_bits=8)
    for k in range(2, 9):
        assert qt.bits_per_weight(k) == pytest.approx(k + 2 ** k * 16 / 576)
    assert qt.nbytes == 8 * 4 * 72 + 2 * 4 * sum(2 ** k for k in range(2, 9))
    meta = json.loads(json.dumps(qt.meta()))
    assert meta["method"] == "nonuniform" and meta["min_bits"] == 2 and meta["group_size"] is None
    tensors = qt.to_tensors("lm")
    assert set(tensors) == {"lm.planes"} | {f"lm.lut{k}" for k in range(2, 9)}
    save_file(tensors, str(tmp_path / "q.safetensors"))
    back = QuantizedTensor.from_tensors("lm", load_file(str(tmp_path / "q.safetensors")), meta)
    for k in range(2, 9):
        assert torch.equal(back.dequantize(k), qt.dequantize(k))
    with pytest.raises(ValueError):
        qt.dequantize(1)
