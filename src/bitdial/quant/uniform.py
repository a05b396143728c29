"""Nested uniform quantization: one B-bit code per weight, every k-bit view (k <= B) usable.

Groups of G consecutive input columns (the last group of a row may be partial) get an offset ``m`` and a
scale ``s`` (fp16). The B-bit code is ``q = clamp(round((w - m) / s), 0, 2**B - 1)``; its k-bit view
``c = q >> (B - k)`` is dequantized at the middle of the interval of B-bit codes it covers:

    w_k = m + s * (c * 2**(B-k) + (2**(B-k) - 1) / 2)          (w_B = m + s * q)

so every view is a mid-rise uniform quantizer of the same range [m - s/2, m + s (2**B - 1/2)], with
2**k levels. The views compete for the range: alone, the 2-bit view would clip outliers and the 8-bit
view would not. ``clip="search"`` picks, per (row, group), the range that minimizes a weighted sum of the
*relative* errors of all views (see ``quantize_uniform`` and docs/bitplanes.md, section 7).

``quantize_rtn`` is the non-nested baseline (plain min/max round-to-nearest at one bit width).
"""

from __future__ import annotations

import logging
import math

import torch

from bitdial.quant.bitplanes import pack_planes
from bitdial.quant.qtensor import QuantizedTensor

__all__ = [
    "QuantizedTensor",
    "quantize_uniform",
    "quantize_rtn",
    "clip_candidates",
    "default_bit_weights",
    "default_guard_map",
    "view_errors",
    "CLIP_CANDIDATES",
    "DEFAULT_GROUP_SIZE",
    "GUARD_GROUP_SIZES",
    "GUARD_PATTERN",
    "IMPORTANCE_MIN_VIEW",
    "IMPORTANCE_TOP_WEIGHT",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 64
MIN_VIEW_BITS = 2

#: Per-end factors of the clipping search: candidate range ``[a + r_lo (lo - a), a + r_hi (hi - a)]`` around the
#: anchor ``a = clamp(0, lo, hi)`` of the group's [lo, hi] = [min, max]. (1, 1), no clipping, is always a
#: candidate, so the search can only lower its objective. Chosen by measurement (docs/bitplanes.md,
#: "Clipping search"): with every view in the objective, shrinking never wins (clipping an outlier costs
#: the 6..8-bit views far more than it saves at 2 bits) while independent 0..12.5% expansions of each end,
#: which re-align all views' levels with the weights, lower the error of the 3..7-bit views by 2..8%.
#: The symmetric shrinks serve ``bit_weights`` that leave out the high-bit views.
_EXPAND = (1.0, 1.025, 1.05, 1.075, 1.1, 1.125)
_SHRINK = (0.95, 0.9, 0.85, 0.8, 0.7)
CLIP_CANDIDATES: tuple[tuple[float, float], ...] = (
    tuple((a, b) for a in _EXPAND for b in _EXPAND) + tuple((r, r) for r in _SHRINK)
)

#: Default view weights of the search objective: ``BIT_WEIGHT_BASE ** (B - k)`` on the relative error of
#: view k = 2..B (mild emphasis on low bits; see ``default_bit_weights``).
BIT_WEIGHT_BASE = 1.5

#: With ``importance``, the search changes two things (measured by KL on the default model at G = 32, 64 and
#: 128, docs/bitplanes.md section 8, "Stop 26"): the views below ``IMPORTANCE_MIN_VIEW`` bits keep the plain
#: squared error (weighted, the 2-bit view gave up KL on one model of five), and the top two views weigh
#: ``IMPORTANCE_TOP_WEIGHT`` instead of 1.5 and 1 (weighted by importance, the low views pull the ranges
#: wider, which cost the 8-bit view 1.21x the KL of separate RTN; with 4 it is 0.73x).
IMPORTANCE_MIN_VIEW = 3
IMPORTANCE_TOP_WEIGHT = 4.0

#: With ``importance`` and a group size in ``GUARD_GROUP_SIZES``, the modules matching ``GUARD_PATTERN`` guard
#: their views below ``IMPORTANCE_MIN_VIEW`` bits (``default_guard_map``): no group may pick a range whose
#: error at those views exceeds that of its plain [min, max] range, the nested view's. Measured by KL
#: (docs/bitplanes.md section 8, "Stop 27"): at G = 64 the 2-bit view's gap to plain nesting came from the
#: value projections alone, and guarding them took it below nesting on the models where it was above; at
#: G = 128 (two models) and G = 32 (one) the guard raised the KL of the 2- to 4-bit views. Guarding every
#: module instead costs the 3-bit view 24-38%.
GUARD_PATTERN = "*.self_attn.v_proj"
GUARD_GROUP_SIZES = (64,)

#: Data-free saliency of the search (used when no ``importance`` is given): the squared error of weight w_j
#: counts ``1 + saliency * (w_j / rms_g)**2``, rms_g the root mean square of its group, so a group's extreme
#: weights are placed more precisely (the k-quants of llama.cpp weight by sigma^2 + w^2 without an importance
#: matrix). It is a per-module setting (``default_saliency_map``): by default ``SALIENCY`` on the attention
#: projections (``SALIENCY_PATTERN``) for groups of ``SALIENCY_MIN_GROUP`` columns or more, and 0 everywhere
#: else. Measured on the default model by KL divergence (docs/bitplanes.md, section 8): at G = 128 it lowers
#: the KL of the 3..5-bit views when the attention projections carry it, and raises that of the 7- and 8-bit
#: views when the MLP projections do; at G = 32 and 64 it raises the KL at most views.
SALIENCY = 2.0
SALIENCY_MIN_GROUP = 128
SALIENCY_PATTERN = "*.self_attn.*"

_CHUNK_GROUPS = 1024  # groups per inner chunk of view_errors: keeps the [chunk, G] temporaries in L2
_SEARCH_GROUPS = 16384  # groups per outer chunk of the search: bounds the [C, V, chunk] error tensor


# ------------------------------------------------------------------------------------------------
# grouping helpers
# ------------------------------------------------------------------------------------------------
def _check_matrix(W: torch.Tensor) -> torch.Tensor:
    if W.ndim != 2 or not W.numel():
        raise ValueError(f"expected a non-empty 2-D weight matrix [N, K], got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise ValueError("weight matrix has NaN or Inf values; fix the source weights before quantizing")
    if W.numel() and W.abs().max() > 65504:
        raise ValueError("weights exceed the fp16 range (|w| > 65504); fp16 offsets cannot represent them")
    return W


def _check_group_size(group_size: int) -> None:
    if group_size < 8 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 8 (32, 64, 128, ...), got {group_size}")


def _grouped(W: torch.Tensor, G: int) -> torch.Tensor:
    """[N, K] -> [N, n_groups, G]; a partial last group is padded by repeating its last column (so the
    group's min/max are unchanged; padded columns get weight 0 in every error sum)."""
    N, K = W.shape
    ng = math.ceil(K / G)
    pad = ng * G - K
    if pad:
        W = torch.cat([W, W[:, -1:].expand(N, pad)], dim=1)
    return W.reshape(N, ng, G)


def _column_weights(K: int, G: int, importance: torch.Tensor | None) -> torch.Tensor | None:
    """Per-column error weights [n_groups, G] (0 on padding), or None when they are all 1."""
    ng = math.ceil(K / G)
    pad = ng * G - K
    if importance is None and not pad:
        return None
    if importance is None:
        w = torch.ones(K)
    else:
        w = importance.detach().to(torch.float32).reshape(-1)
        if w.numel() != K:
            raise ValueError(f"importance must have K={K} entries (one per input column), got {w.numel()}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("importance must be finite and non-negative (mean x^2 of each input column)")
    return torch.cat([w, torch.zeros(pad)]).reshape(ng, G)


def _saliency_weights(Wg: torch.Tensor, wgt: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Per-weight error weights [M, G]: ``1 + alpha * w^2 / mean_g(w^2)`` (times ``wgt``, whose zeros mark padding)."""
    sq = Wg * Wg  # [M, G]
    if wgt is None:
        ms = sq.mean(dim=1, keepdim=True)  # [M, 1]
    else:
        live = (wgt > 0).to(sq.dtype)
        ms = (sq * live).sum(dim=1, keepdim=True) / live.sum(dim=1, keepdim=True).clamp_min(1.0)
    sal = sq.div_(ms + torch.finfo(torch.float32).tiny).mul_(alpha).add_(1.0)  # all-zero group: all 1
    return sal if wgt is None else sal.mul_(wgt)


def _fp16_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets and scales for the ranges [lo, hi] as stored (fp16), widened back to fp32."""
    m = lo.to(torch.float16).to(torch.float32)
    s = ((hi - lo) / levels).to(torch.float16).to(torch.float32)
    return m, s


# ------------------------------------------------------------------------------------------------
# clipping search
# ------------------------------------------------------------------------------------------------
def clip_candidates(lo: torch.Tensor, hi: torch.Tensor,
                    factors: tuple[tuple[float, float], ...] = CLIP_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ranges [C, M] from group min/max [M]: for each (r_lo, r_hi) in ``factors``, each end scaled
    about the anchor ``a = clamp(0, lo, hi)`` (r < 1 clips, r > 1 widens)."""
    a = torch.clamp(torch.zeros_like(lo), lo, hi)  # [M]
    f = torch.as_tensor(factors, dtype=torch.float32)  # [C, 2]
    r_lo, r_hi = f[:, :1], f[:, 1:]  # [C, 1]
    return a + r_lo * (lo - a), a + r_hi * (hi - a)


def view_errors(Wg: torch.Tensor, wgt: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, max_bits: int,
                views: list[int]) -> torch.Tensor:
    """Weighted squared error of each k-bit view for each candidate range.

    Args:
        Wg: [M, G] weights of M groups.
        wgt: [M, G] per-weight error weights, or None for all 1.
        lo, hi: [C, M] candidate ranges (C candidates per group).
        max_bits: B.
        views: bit widths k to evaluate.

    Returns:
        fp32 [C, len(views), M]: ``sum_j wgt_j (w_j - w_k,j)^2`` with fp16-rounded offsets/scales, exactly as
        ``quantize_uniform`` would store them (ties in rounding aside).
    """
    L = (1 << max_bits) - 1
    m, s = _fp16_params(lo, hi, L)  # [C, M]
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # s = 0: every weight maps to code 0
    C, M = lo.shape
    out = torch.empty(C, len(views), M)
    for a in range(0, M, _CHUNK_GROUPS):
        b = min(M, a + _CHUNK_GROUPS)
        W_ = Wg[a:b]  # [m, G]
        w_ = None if wgt is None else wgt[a:b]
        for c in range(C):
            u = (W_ - m[c, a:b, None]).mul_(inv[c, a:b, None])  # [m, G] position in B-bit code units
            v = (u + 0.5).clamp_(0.0, L + 0.5)  # floor(v) = clamp(round(u)); floor(v / 2^(B-k)) = q >> (B-k)
            for i, k in enumerate(views):
                per = float(1 << (max_bits - k))
                f = v.mul(1.0 / per).floor_()  # [m, G] k-bit code
                d = u.sub(f) if per == 1 else (u - (per - 1) / 2).sub_(f, alpha=per)  # u - level_k
                out[c, i, a:b] = torch.linalg.vecdot(d if w_ is None else d * w_, d)
    return out.mul_((s * s).unsqueeze(1))  # code units -> weight units


def _search_ranges(Wg: torch.Tensor, wgt: torch.Tensor | None, max_bits: int, bit_weights: dict[int, float],
                   objective: str, factors=CLIP_CANDIDATES, low_views: tuple[int, ...] = (),
                   low_wgt: torch.Tensor | None = None,
                   guard: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group best range [M] over ``clip_candidates`` for the multi-view objective.

    The error of every view is weighted by ``wgt``, except the views in ``low_views``, weighted by ``low_wgt``
    (both [M, G] or None for all 1). A candidate whose error at a view in ``guard`` (views of the objective)
    exceeds that of the unclipped candidate (1, 1) is left out of its group. Groups are independent, so the
    search runs over chunks of ``_SEARCH_GROUPS`` groups: memory stays bounded ([C, V, chunk] errors) even
    for a 49152 x 576 embedding.
    """
    if objective not in ("relative", "absolute"):
        raise ValueError(f"objective must be 'relative' or 'absolute', got {objective!r}")
    views = sorted(bit_weights)
    if any(k not in views for k in guard):
        raise ValueError(f"guard views {tuple(guard)} must be views of the objective {tuple(views)}")
    if guard and (1.0, 1.0) not in factors:
        raise ValueError("guard needs the unclipped candidate (1, 1) among the factors")
    i0 = list(factors).index((1.0, 1.0)) if guard else 0  # the unclipped candidate: [min, max]
    bw = torch.tensor([float(bit_weights[k]) for k in views]).view(1, -1, 1)  # [1, V, 1]
    M = Wg.shape[0]
    lo_out, hi_out = torch.empty(M), torch.empty(M)
    for a in range(0, M, _SEARCH_GROUPS):
        b = min(M, a + _SEARCH_GROUPS)
        W_ = Wg[a:b]  # [m, G]
        w_ = None if wgt is None else wgt[a:b]
        lo, hi = W_.min(dim=1).values, W_.max(dim=1).values  # [m]
        LO, HI = clip_candidates(lo, hi, factors)  # [C, m]
        low = [k for k in views if k in low_views]
        err = view_errors(W_, w_, LO, HI, max_bits, [k for k in views if k not in low_views])  # [C, V, m]
        if low:  # views are sorted and low_views are the lowest ones: their rows go first
            lw = None if low_wgt is None else low_wgt[a:b]
            err = torch.cat([view_errors(W_, lw, LO, HI, max_bits, low), err], dim=1)
        excluded = torch.zeros(err.shape[0], err.shape[2], dtype=torch.bool)  # [C, m]
        for k in guard:
            i = views.index(k)
            excluded |= err[:, i] > err[i0:i0 + 1, i]
        if objective == "relative":
            # each view's error relative to the best any candidate reaches at that view for this group
            floor = err.min(dim=0, keepdim=True).values  # [1, V, m]
            energy = (W_ * W_ if w_ is None else W_ * W_ * w_).sum(dim=1)  # [m]
            err = err / (floor + 1e-12 * energy + 1e-30)
        obj = (err * bw).sum(dim=1).masked_fill_(excluded, float("inf"))  # [C, m]
        best = obj.argmin(dim=0)  # [m]
        idx = torch.arange(b - a)
        lo_out[a:b], hi_out[a:b] = LO[best, idx], HI[best, idx]
    return lo_out, hi_out


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def default_saliency_map(group_size: int) -> dict[str, float]:
    """The search's default ``{module pattern: saliency}`` map for a group size (``"default"``: the rest).

    ``SALIENCY`` on the attention projections from ``SALIENCY_MIN_GROUP`` columns up, else 0 everywhere.
    """
    if group_size >= SALIENCY_MIN_GROUP:
        return {SALIENCY_PATTERN: SALIENCY, "default": 0.0}
    return {"default": 0.0}


def default_guard_map(group_size: int) -> dict[str, tuple[int, ...]]:
    """The search's default ``{module pattern: guarded views}`` map with ``importance`` (``"default"``: the rest).

    For a group size in ``GUARD_GROUP_SIZES``, the views below ``IMPORTANCE_MIN_VIEW`` bits on the modules
    matching ``GUARD_PATTERN``; none elsewhere.
    """
    if group_size in GUARD_GROUP_SIZES:
        return {GUARD_PATTERN: tuple(range(MIN_VIEW_BITS, IMPORTANCE_MIN_VIEW)), "default": ()}
    return {"default": ()}


def default_bit_weights(max_bits: int, importance: bool = False) -> dict[int, float]:
    """``{k: 1.5 ** (B - k)}`` for k = 2..B: the relative error of every view counts, lower views more.

    Measured (docs/bitplanes.md): equal weights cost the 2-bit view ~1% to gain 4..8% at 4..8 bits;
    1.5 ** (B - k) gains at every view from 2 to 7 bits and gives up ~1.7% at 8 bits, where it matters least.
    With ``importance`` the views B - 1 and B weigh ``IMPORTANCE_TOP_WEIGHT`` (section 8, "Stop 26").
    """
    bw = {k: BIT_WEIGHT_BASE ** (max_bits - k) for k in range(MIN_VIEW_BITS, max_bits + 1)}
    if importance:
        for k in (max_bits - 1, max_bits):
            if k in bw:
                bw[k] = max(bw[k], IMPORTANCE_TOP_WEIGHT)
    return bw


def quantize_uniform(W: torch.Tensor, max_bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE,
                     clip: str = "search", bit_weights: dict[int, float] | None = None,
                     importance: torch.Tensor | None = None, objective: str = "relative",
                     saliency: float = 0.0, guard: tuple[int, ...] = ()) -> QuantizedTensor:
    """Quantize W [N, K] once at ``max_bits`` so that every k-bit view (k = 1..B) is a usable quantization.

    Args:
        W: fp32 (or any float) [N, K], rows = output features, columns = input features.
        max_bits: B, 2..8.
        group_size: G columns per (row, group) offset/scale; a power of two >= 8. K need not be a multiple.
        clip: ``"search"`` (default) picks each group's range among the ``CLIP_CANDIDATES`` rescalings of
            [min, max]; ``"none"`` uses [min, max].
        bit_weights: {k: weight} of the views in the search objective; default ``1.5 ** (B - k)`` on
            k = 2..B, with ``IMPORTANCE_TOP_WEIGHT`` on the top two views when ``importance`` is given
            (``default_bit_weights``).
        importance: [K] per-input-column error weights (mean x^2 of the column's activations, like
            llama.cpp's imatrix, measured on text or on random token ids: ``bitdial.quant.calibrate``);
            None = all 1. It weights the error of the views from ``IMPORTANCE_MIN_VIEW`` bits up; lower
            views keep the plain squared error.
        objective: ``"relative"`` (default): ``sum_k bit_weights[k] * E_k / min_candidates E_k`` per group,
            where E_k is the (importance-weighted) squared error of view k, so each view counts by its
            regret rather than by its absolute error (which the 2-bit view would dominate 4**6 to 1 over the
            8-bit one); ``"absolute"``: ``sum_k bit_weights[k] * E_k``.
        saliency: without ``importance``, the search weighs the squared error of each weight by
            ``1 + saliency * (w / rms_g)**2`` (rms_g: root mean square of its group), a data-free proxy of
            which weights the output is most sensitive to; 0 (default) = plain squared error. Which modules
            get it is an artifact setting (``default_saliency_map``: 2 on the attention projections at
            G >= 128). Ignored with ``importance`` (the activation statistics replace the proxy) and with
            ``clip="none"``.
        guard: views (bit widths) that no group may quantize worse than its plain [min, max] range does:
            the search leaves out every candidate whose error at one of them exceeds the unclipped one's
            (each view's own error weighting). The artifact guards the 2-bit view of the value projections
            when it has importance, at G = 64 (``default_guard_map``); () = none. Views outside the objective
            (or k > B) are an error; ignored with ``clip="none"``.

    Returns:
        A uniform QuantizedTensor (fp16 scales/offsets [N, n_groups], planes [B, N, ceil(K/8)]).
    """
    W = _check_matrix(W)
    if not 2 <= max_bits <= 8:
        raise ValueError(f"max_bits must be in 2..8, got {max_bits}")
    _check_group_size(group_size)
    N, K = W.shape
    G = group_size
    Wg3 = _grouped(W, G)  # [N, ng, G]
    ng = Wg3.shape[1]
    Wg = Wg3.reshape(N * ng, G)  # [M, G]
    def per_weight(colw: torch.Tensor | None) -> torch.Tensor | None:  # [ng, G] column weights -> [M, G]
        return None if colw is None else colw.unsqueeze(0).expand(N, ng, G).reshape(N * ng, G)

    wgt = per_weight(_column_weights(K, G, importance))  # [M, G] or None
    L = (1 << max_bits) - 1

    if clip == "search":
        bw = default_bit_weights(max_bits, importance is not None) if bit_weights is None else dict(bit_weights)
        bw = {int(k): float(v) for k, v in bw.items() if float(v) > 0}
        if not bw or any(not 1 <= k <= max_bits for k in bw):
            raise ValueError(f"bit_weights must give a positive weight to at least one k in 1..{max_bits}, "
                             f"got {bit_weights}")
        sal = float(saliency)
        if not (math.isfinite(sal) and sal >= 0):
            raise ValueError(f"saliency must be a finite number >= 0, got {saliency}")
        if sal > 0 and importance is None:
            wgt = _saliency_weights(Wg, wgt, sal)
        guard = tuple(int(k) for k in guard)
        if importance is None:
            lo, hi = _search_ranges(Wg, wgt, max_bits, bw, objective, guard=guard)  # [M]
        else:  # the lowest views keep the plain squared error (padding still weighs 0)
            plain = per_weight(_column_weights(K, G, None))  # [M, G] or None
            low = tuple(k for k in sorted(bw) if k < IMPORTANCE_MIN_VIEW)
            lo, hi = _search_ranges(Wg, wgt, max_bits, bw, objective, low_views=low, low_wgt=plain, guard=guard)
    elif clip == "none":
        lo, hi = Wg.min(dim=1).values, Wg.max(dim=1).values  # [M]
    else:
        raise ValueError(f"clip must be 'search' or 'none', got {clip!r}")

    m, s = _fp16_params(lo, hi, L)  # [M], exactly the stored values
    log.debug("quantize_uniform: [%d, %d] B=%d G=%d clip=%s importance=%s", N, K, max_bits, G, clip,
              importance is not None)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((Wg - m[:, None]) / safe[:, None]).clamp_(0, L)  # [M, G]
    q = torch.where((s > 0)[:, None], q, torch.zeros_like(q))
    codes = q.to(torch.uint8).reshape(N, ng * G)[:, :K]  # [N, K]
    return QuantizedTensor(
        method="uniform", shape=(N, K), max_bits=max_bits, group_size=G, planes=pack_planes(codes, max_bits),
        scales=s.reshape(N, ng).to(torch.float16), offsets=m.reshape(N, ng).to(torch.float16),
    )


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """Baseline: plain round-to-nearest ``bits``-bit min/max quantization per (row, group), dequantized.

    Levels ``m + s q``, ``q = 0..2**bits - 1``, ``m = min``, ``s = (max - min) / (2**bits - 1)`` (fp16-rounded
    like the stored nested parameters). Returns fp32 [N, K].
    """
    W = _check_matrix(W)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    _check_group_size(group_size)
    N, K = W.shape
    Wg = _grouped(W, group_size)  # [N, ng, G]
    L = (1 << bits) - 1
    m, s = _fp16_params(Wg.min(dim=2).values, Wg.max(dim=2).values, L)  # [N, ng]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((Wg - m[..., None]) / safe[..., None]).clamp_(0, L)  # [N, ng, G]
    out = m[..., None] + s[..., None] * q
    return out.reshape(N, -1)[:, :K].contiguous()

