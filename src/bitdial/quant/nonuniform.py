"""Non-uniform any-precision quantization (after Any-Precision LLM, Park et al. 2024).

Per output row, the K weights are clustered with a sensitivity-weighted 1-D k-means (weights =
``importance`` of each input column, else 1) into ``2**seed_bits`` clusters (the seed, 3 bits), then
*upscaled* one bit at a time: every cluster is split in two by a weighted 2-means inside the cluster,
up to ``max_bits``. Cluster ids are ordered by value and a split sends the lower half to child ``2c`` and
the upper half to ``2c + 1``, so the top k bits of a weight's B-bit code are its k-bit cluster id: the
same bitplanes as the uniform method serve every k.

Per row and per k = 2..B a look-up table (fp16, ``2**k`` entries) holds the (importance-)weighted mean
of each k-bit cluster; for k >= seed those are the k-means centroids, for k < seed (k = 2) the weighted
means of the merged children. ``QuantizedTensor.dequantize(k)`` is ``luts[k][row, code]``.

Implementation: in one dimension, k-means clusters are intervals of the sorted row, so everything runs
on each row sorted once, with prefix sums of weight and weight*value:

* the seed is Lloyd's algorithm, a fixed number of iterations, each ``O(2**seed * log K)`` per row (a
  segment mean is two prefix-sum look-ups; the new boundaries are a batched ``searchsorted`` of the
  midpoints between centroids), started from the exact optimum over 64 candidate boundaries per row
  (a small dynamic program): plain quantile starts get stuck on heavy-tailed rows;
* each split is the *exact* optimal weighted 2-means of the segment (the threshold maximizing
  ``S_L**2 / W_L + S_R**2 / W_R``, evaluated at every position at once), which is at least as good as
  Lloyd-based 2-means.

Rows are processed together (batched, in chunks of 4096 rows to bound memory), with no Python loop over
rows or clusters.
"""

from __future__ import annotations

import logging

import torch

from bitdial.quant.bitplanes import pack_planes
from bitdial.quant.qtensor import QuantizedTensor

__all__ = ["quantize_nonuniform", "SEED_BITS", "LLOYD_ITERS", "derive_lower_lut"]

log = logging.getLogger(__name__)

SEED_BITS = 3
LLOYD_ITERS = 40  # fixed Lloyd iterations of the seed k-means (converged on our shapes; see docs/bitplanes.md)
MIN_LUT_BITS = 2
DP_CANDIDATES = 64  # candidate boundaries per row of the coarse DP that starts the seed k-means
_DP_ROWS = 512  # rows per chunk of the coarse DP ([rows, M, M] float64 temporaries)
_ROWS = 4096  # rows per chunk of the whole pipeline (rows are independent; bounds [rows, K] float64 temporaries)


def _segment_means(P0: torch.Tensor, P1: torch.Tensor, C1: torch.Tensor, xs: torch.Tensor,
                   b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and weight of every segment ``[b[:, j], b[:, j+1])`` of the sorted rows.

    P0, P1: [N, K+1] prefix sums of weight and weight*value; C1: [N, K+1] prefix sums of value (for
    segments whose weight is 0, which get their plain mean); xs: [N, K] sorted values; b: [N, S+1] int64.
    Returns means [N, S] (an empty segment gets the value at its position) and weights [N, S].
    """
    lo, hi = b[:, :-1], b[:, 1:]  # [N, S]
    w = P0.gather(1, hi) - P0.gather(1, lo)  # [N, S]
    s = P1.gather(1, hi) - P1.gather(1, lo)
    n = (hi - lo).to(P0.dtype)
    plain = (C1.gather(1, hi) - C1.gather(1, lo)) / n.clamp_min(1)
    at = xs.gather(1, lo.clamp(max=xs.shape[1] - 1))  # empty segment: a value between its neighbours
    total = P0[:, -1:]  # [N, 1]
    heavy = w > total * 1e-12
    mean = torch.where(heavy, s / torch.where(heavy, w, torch.ones_like(w)), torch.where(n > 0, plain, at))
    return mean, w


def _lloyd(xs: torch.Tensor, P0: torch.Tensor, P1: torch.Tensor, C1: torch.Tensor, b: torch.Tensor,
           iters: int) -> torch.Tensor:
    """Weighted 1-D Lloyd iterations on sorted rows from boundaries b [N, C+1]; returns new boundaries."""
    N, K = xs.shape
    zero = torch.zeros(N, 1, dtype=torch.int64)
    full = torch.full((N, 1), K, dtype=torch.int64)
    for _ in range(iters):
        mu, _ = _segment_means(P0, P1, C1, xs, b)  # [N, C]
        mu = torch.cummax(mu, dim=1).values  # keep centroids ordered (empty-segment fallbacks)
        mid = (mu[:, :-1] + mu[:, 1:]) / 2  # [N, C-1]
        inner = torch.searchsorted(xs, mid.contiguous())  # x < mid -> left cluster
        b = torch.cat([zero, inner, full], dim=1)
    return b


def _coarse_dp(xs: torch.Tensor, P0: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor, n_clusters: int,
               n_cand: int) -> torch.Tensor:
    """Optimal k-means restricted to boundaries among ~n_cand candidate positions per row (DP).

    Candidates: weighted quantiles and an even grid of [min, max] (half each). Returns boundaries
    [N, n_clusters+1]. Cost O(n_clusters * n_cand**2) per row, vectorized over rows.
    """
    N, K = xs.shape
    half = n_cand // 2
    frac = torch.arange(1, half, dtype=P0.dtype) / half  # [h-1]
    q = torch.searchsorted(P0.contiguous(), (P0[:, -1:] * frac).contiguous())  # [N, h-1]
    lo, hi = xs[:, :1], xs[:, -1:]
    e = torch.searchsorted(xs, (lo + (hi - lo) * frac).contiguous())  # [N, h-1]
    zero = torch.zeros(N, 1, dtype=torch.int64)
    full = torch.full((N, 1), K, dtype=torch.int64)
    pos = torch.sort(torch.cat([zero, q.clamp(0, K), e, full], 1), dim=1).values  # [N, M]
    M = pos.shape[1]
    w, s, sq = P0.gather(1, pos), P1.gather(1, pos), P2.gather(1, pos)  # [N, M]
    dw = w[:, None, :] - w[:, :, None]  # [N, i, j] weight of segment pos_i..pos_j
    ds = s[:, None, :] - s[:, :, None]
    cost = sq[:, None, :] - sq[:, :, None] - torch.where(dw > 0, ds * ds / dw.clamp_min(1e-300), torch.zeros_like(dw))
    upper = torch.ones(M, M, dtype=torch.bool).triu()  # i <= j
    cost = torch.where(upper, cost.clamp_min(0), torch.full_like(cost, torch.inf))
    D = cost[:, 0, :]  # [N, M] one cluster over pos_0..pos_j
    args = []
    for _ in range(n_clusters - 1):
        D, arg = (D[:, :, None] + cost).min(dim=1)  # [N, M]
        args.append(arg)
    b = torch.empty(N, n_clusters + 1, dtype=torch.int64)
    j = torch.full((N,), M - 1, dtype=torch.int64)
    b[:, n_clusters] = K
    rows = torch.arange(N)
    for c in range(n_clusters - 1, 0, -1):
        j = args[c - 1][rows, j]
        b[:, c] = pos[rows, j]
    b[:, 0] = 0
    return b


def _seed_kmeans(xs: torch.Tensor, P0: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor, C1: torch.Tensor,
                 seed_bits: int, iters: int, n_cand: int = DP_CANDIDATES) -> torch.Tensor:
    """Weighted 1-D k-means with 2**seed_bits clusters on sorted rows; boundaries [N, 2**seed_bits + 1].

    Lloyd started from the optimal clustering over a coarse set of candidate boundaries (``_coarse_dp``).
    Lloyd from weighted quantiles gets stuck on heavy-tailed rows (22-44% above the exact optimum on
    average on Student-t rows, up to 2.5x on some); the best of quantile, even-grid and divisive starts is
    still 6-12% above. This start lands within ~0.1-0.3% (measured against an O(C K^2) DP, docs/bitplanes.md).
    """
    N = xs.shape[0]
    C = 1 << seed_bits
    b = torch.cat([_coarse_dp(xs[i:i + _DP_ROWS], P0[i:i + _DP_ROWS], P1[i:i + _DP_ROWS], P2[i:i + _DP_ROWS], C,
                              n_cand) for i in range(0, N, _DP_ROWS)])
    return _lloyd(xs, P0, P1, C1, b, iters)


def _split_all(b: torch.Tensor, P0: torch.Tensor, P1: torch.Tensor) -> torch.Tensor:
    """Split every segment of boundaries b [N, S+1] at its optimal weighted 2-means threshold.

    Returns boundaries [N, 2S+1]: segment j becomes children 2j (lower values) and 2j+1.
    """
    N, S1 = b.shape
    S = S1 - 1
    K = P0.shape[1] - 1
    t = torch.arange(K).expand(N, K)  # [N, K] candidate split positions
    seg = torch.searchsorted(b[:, 1:-1].contiguous(), t.contiguous(), right=True)  # [N, K] segment of t
    a, e = b.gather(1, seg), b.gather(1, seg + 1)  # [N, K]
    Pt0, Pt1 = P0[:, :-1], P1[:, :-1]  # prefix at t
    wl, sl = Pt0 - P0.gather(1, a), Pt1 - P1.gather(1, a)
    wr, sr = P0.gather(1, e) - Pt0, P1.gather(1, e) - Pt1
    eps = P0[:, -1:] * 1e-12
    score = torch.where(wl > eps, sl * sl / wl.clamp_min(1e-300), torch.zeros_like(wl)) + \
        torch.where(wr > eps, sr * sr / wr.clamp_min(1e-300), torch.zeros_like(wr))  # [N, K]
    best = torch.full((N, S), -torch.inf, dtype=score.dtype).scatter_reduce(1, seg, score, "amax")
    is_best = score >= best.gather(1, seg)
    cand = torch.where(is_best, t, torch.full_like(t, K))
    split = torch.full((N, S), K, dtype=torch.int64).scatter_reduce(1, seg, cand, "amin")  # first argmax
    split = torch.minimum(split, b[:, 1:])  # empty segments (no t inside) split at their end
    out = torch.empty(N, 2 * S + 1, dtype=torch.int64)
    out[:, 0::2] = b
    out[:, 1::2] = split
    return out


def derive_lower_lut(lut: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """LUT of k-1 bits from the LUT of k bits [N, 2**k]: merge children (2c, 2c+1).

    With ``mass`` [N, 2**k] (weight of each cluster) this is the exact weighted mean (what
    ``quantize_nonuniform`` stores); without it, the plain average of the two children (a reader that
    only has the top LUT). Kept for the storage trade-off measured in docs/bitplanes.md.
    """
    lut = lut.to(torch.float64)
    if mass is None:
        return (lut[:, 0::2] + lut[:, 1::2]) / 2
    m = mass.to(torch.float64)
    ml, mr = m[:, 0::2], m[:, 1::2]
    tot = ml + mr
    avg = (lut[:, 0::2] + lut[:, 1::2]) / 2
    return torch.where(tot > 0, (lut[:, 0::2] * ml + lut[:, 1::2] * mr) / tot.clamp_min(1e-300), avg)


def _quantize_rows(W: torch.Tensor, imp: torch.Tensor | None, max_bits: int, seed: int, iters: int):
    """Codes uint8 [n, K], LUTs {k: fp16 [n, 2**k]} and cluster weights {k: float64 [n, 2**k]} of rows W [n, K]."""
    N, K = W.shape
    xs, perm = torch.sort(W.to(torch.float64), dim=1)  # [N, K] sorted rows, perm: sorted -> column
    wts = torch.ones(N, K, dtype=torch.float64) if imp is None else imp[perm]  # [N, K]
    zero = torch.zeros(N, 1, dtype=torch.float64)
    P0 = torch.cat([zero, wts.cumsum(1)], 1)  # [N, K+1] prefix sums: weight, weight*x, weight*x^2, x
    P1 = torch.cat([zero, (wts * xs).cumsum(1)], 1)
    P2 = torch.cat([zero, (wts * xs * xs).cumsum(1)], 1)
    C1 = torch.cat([zero, xs.cumsum(1)], 1)

    b = _seed_kmeans(xs, P0, P1, P2, C1, seed, iters)  # [N, 2**seed + 1]
    for _ in range(seed, max_bits):
        b = _split_all(b, P0, P1)  # [N, 2S+1]

    # B-bit code of each sorted position = index of its level-B segment; scatter back to columns
    pos = torch.arange(K).expand(N, K).contiguous()
    code_sorted = torch.searchsorted(b[:, 1:-1].contiguous(), pos, right=True)  # [N, K]
    codes = torch.empty(N, K, dtype=torch.int64).scatter_(1, perm, code_sorted).to(torch.uint8)

    luts: dict[int, torch.Tensor] = {}
    masses: dict[int, torch.Tensor] = {}
    for k in range(MIN_LUT_BITS, max_bits + 1):
        bk = b[:, :: 1 << (max_bits - k)]  # [N, 2**k + 1] boundaries of the k-bit clusters
        mean, w = _segment_means(P0, P1, C1, xs, bk)
        luts[k] = mean.to(torch.float16)  # [N, 2**k]
        masses[k] = w
    return codes, luts, masses


def quantize_nonuniform(W: torch.Tensor, max_bits: int = 8, importance: torch.Tensor | None = None,
                        seed_bits: int = SEED_BITS, iters: int = LLOYD_ITERS,
                        return_masses: bool = False):
    """Quantize W [N, K] with per-row nested non-uniform codebooks readable at every k = 2..max_bits.

    Args:
        W: float [N, K].
        max_bits: B, 2..8.
        importance: [K] non-negative per-input-column weights of the k-means (mean x^2 of the column's
            activations); None = all 1.
        seed_bits: bits of the seed k-means (3, as in Any-Precision LLM); clipped to max_bits.
        iters: Lloyd iterations of the seed.
        return_masses: also return {k: float64 [N, 2**k]} cluster weights (for analysis/tests).

    Returns:
        A nonuniform QuantizedTensor (planes [B, N, ceil(K/8)], luts {k: fp16 [N, 2**k]} for k = 2..B),
        or (tensor, masses) with ``return_masses``.
    """
    if W.ndim != 2 or not W.numel():
        raise ValueError(f"expected a non-empty 2-D weight matrix [N, K], got shape {tuple(W.shape)}")
    if not MIN_LUT_BITS <= max_bits <= 8:
        raise ValueError(f"max_bits must be in {MIN_LUT_BITS}..8 for nonuniform, got {max_bits}")
    if not 1 <= seed_bits:
        raise ValueError(f"seed_bits must be >= 1, got {seed_bits}")
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise ValueError("weight matrix has NaN or Inf values; fix the source weights before quantizing")
    if W.numel() and W.abs().max() > 65504:
        raise ValueError("weights exceed the fp16 range (|w| > 65504); fp16 LUTs cannot represent them")
    N, K = W.shape
    imp = None
    if importance is not None:
        imp = importance.detach().to(torch.float64).reshape(-1)
        if imp.numel() != K:
            raise ValueError(f"importance must have K={K} entries (one per input column), got {imp.numel()}")
        if not torch.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("importance must be finite and non-negative (mean x^2 of each input column)")
        if imp.sum() <= 0:
            imp = None
    seed = min(seed_bits, max_bits)
    log.debug("quantize_nonuniform: [%d, %d] B=%d seed=%d iters=%d importance=%s", N, K, max_bits, seed, iters,
              imp is not None)
    parts = [_quantize_rows(W[i:i + _ROWS], imp, max_bits, seed, iters) for i in range(0, N, _ROWS)]
    codes = torch.cat([p[0] for p in parts])  # [N, K] uint8
    luts = {k: torch.cat([p[1][k] for p in parts]) for k in range(MIN_LUT_BITS, max_bits + 1)}
    masses = {k: torch.cat([p[2][k] for p in parts]) for k in range(MIN_LUT_BITS, max_bits + 1)}
    qt = QuantizedTensor(method="nonuniform", shape=(N, K), max_bits=max_bits, group_size=None,
                         planes=pack_planes(codes, max_bits), luts=luts)
    return (qt, masses) if return_masses else qt
