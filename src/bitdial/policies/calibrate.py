"""Calibrate dynamic policies (DP-LLM): memory maxima, learned average precisions, thresholds, estimators.

``calibrate(artifact, targets, calib)`` runs four steps on calibration text and stores one policy per
target in the artifact (see :mod:`bitdial.policies.dynamic` for what a policy is):

1. **Maximum precision per module** ``B_i`` under a memory budget (``memory_bits``, average bits per
   weight of the decoder linears): the planner's integer program on the sensitivity profile when one is
   given, else ``floor(memory_bits)`` everywhere. Planes above ``B_i`` are never read.
2. **Average precision per module** ``p_i = b_min + sigmoid(z_i) (B_i - b_min)``: one trainable scalar per
   module; with ``l = floor(p_i)``, ``h = l + 1``, ``r_i = h - p_i`` the module outputs
   ``r_i W_l x + (1 - r_i) W_h x``. Weights frozen; loss = cross-entropy +
   ``alpha (size-weighted mean p - target)^2``; AdamW; z initialized at the target. Afterwards one common
   shift of all z_i (bisection) puts the size-weighted mean of p exactly on the target.
3. **Errors on calibration text**: with the learned mixture in place, every module records its inputs x
   and the exact error ``e = ||(W_h - W_l) x||`` of every token.
4. **Estimators and thresholds** per module: ``linear`` (``a ||x|| + b``) where its R^2 >= ``r2_min``,
   else a projection estimator (``pca`` by default, or DP-LLM's random ``jl``); the threshold is the
   ``r_i`` quantile of the *estimate* on the fit tokens, so the intended rate holds even where the
   estimate is biased. A held-out quarter of the tokens measures the realized rate and the rank
   correlation of estimate and exact error (stored in each rule's ``fit``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitdial.errors import BitdialError
from bitdial.policies.dynamic import (ESTIMATORS, MAX_PROJ_DIM, DynamicPolicy, ModuleRule, PolicyError, round_g_int8,
                                      save_policies)

log = logging.getLogger(__name__)


@dataclass
class CalibSettings:
    memory_bits: float = 5.0
    min_bits: int = 2
    calib_tokens: int = 4096  # tokens of calibration text: first half trains p, second half fits thresholds
    window: int = 256
    steps: int = 48  # optimizer steps (one window each) per target
    lr: float = 0.05
    alpha: float = 10.0  # weight of the (mean p - target)^2 penalty
    estimator: str = "auto"  # auto (linear where R^2 >= r2_min, else pca) | linear | jl | pca
    # bitdial's defaults beat DP-LLM's recipe (init target, ce, soft) on the default model: docs/dynamic.md
    init: str = "auto"  # p_i starts at the target (DP-LLM), the static plan's width ("plan", needs a profile), or auto:
    #                     plan when a profile is given, else target
    loss: str = "kl"  # ce: next-token cross-entropy (DP-LLM); kl: KL from the artifact at its stored maximum
    mix: str = "select"  # soft: r W_l x + (1 - r) W_h x (DP-LLM); select: the tokens with the largest error run high
    proj_dim: int = 32
    r2_min: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        if self.estimator not in ("auto",) + tuple(e for e in ESTIMATORS if e != "fixed"):
            raise BitdialError(f"--estimator {self.estimator!r}: use auto, linear, jl or pca")
        if not 1 <= self.min_bits <= 8:
            raise BitdialError(f"--min-bits must be 1..8, got {self.min_bits}")
        if self.memory_bits < self.min_bits:
            raise BitdialError(f"--memory-bits {self.memory_bits:g} is below the minimum width {self.min_bits}")
        for k in ("calib_tokens", "window", "proj_dim"):
            if getattr(self, k) < 2:
                raise BitdialError(f"{k} must be >= 2, got {getattr(self, k)}")
        if self.proj_dim > MAX_PROJ_DIM:
            raise BitdialError(f"--proj-dim {self.proj_dim} is above {MAX_PROJ_DIM}, the most the decode step takes")
        if self.loss not in ("ce", "kl"):
            raise BitdialError(f"--loss {self.loss!r}: use ce or kl")
        if self.mix not in ("soft", "select"):
            raise BitdialError(f"--mix {self.mix!r}: use soft or select")
        if self.init not in ("auto", "target", "plan"):
            raise BitdialError(f"--init {self.init!r}: use auto, target or plan")
        if self.steps < 0 or self.lr <= 0 or self.alpha < 0:
            raise BitdialError("steps must be >= 0, lr > 0 and alpha >= 0")


def parse_targets(text: str | list[float]) -> list[float]:
    """``"2.5,3,3.5"`` or ``"2.5:4.5:0.25"`` (start:stop:step, inclusive) -> sorted unique targets."""
    if isinstance(text, (list, tuple)):
        vals = [float(t) for t in text]
    else:
        vals = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ":" in part:
                    a, b, s = (float(v) for v in part.split(":"))
                    if s <= 0:
                        raise ValueError
                    n = int(math.floor((b - a) / s + 1e-9)) + 1
                    vals += [round(a + i * s, 6) for i in range(n)]
                else:
                    vals.append(float(part))
            except ValueError:
                raise BitdialError(f"--targets: cannot read {part!r}; give numbers like 2.5,3,3.5 or a range "
                                   "2.5:4.5:0.25") from None
    if not vals:
        raise BitdialError("--targets: give at least one target, e.g. --targets 2.5,3,3.5,4")
    return sorted(set(vals))


# ---- step 1: memory maxima ------------------------------------------------------------------------
def memory_max_bits(art, modules: list[str], memory_bits: float, profile=None, min_bits: int = 2) -> dict[str, int]:
    stored = {n: int(art.modules[n]["max_bits"]) for n in modules}
    if profile is None:
        b = int(math.floor(memory_bits + 1e-9))
        return {n: max(min(b, stored[n]), min_bits) for n in modules}
    from bitdial.planning.planner import Budgets, make_plan

    plan = make_plan(art, profile, Budgets.parse(avg_bits=memory_bits), name="memory", min_bits=min_bits)
    return {n: min(int(plan.bits[n]), stored[n]) for n in modules}


# ---- step 2: learned average precisions -----------------------------------------------------------
SELECT_TAU = 0.05  # width of the soft step of --mix select, in units of the batch's error quantile


class MixedLinear(nn.Module):
    """Stand-in for an AnyPrecisionLinear during calibration, differentiable in z: ``p = lo + sigmoid(z)
    (hi - lo)``, ``t = p - l`` the share of tokens at h. ``mix="soft"`` (DP-LLM): ``y = W_l x + t (W_h - W_l) x``
    for every token. ``mix="select"``: ``y = W_l x + g (W_h - W_l) x`` with ``g = sigmoid((u - (1 - t)) / tau)``,
    ``u`` the rank quantile of the token's exact error ``||(W_h - W_l) x||`` among the batch's tokens: a soft
    form of what decoding does (the tokens with the largest estimated error run at h, the rest at l), so the
    loss sees the cost of a fractional width as decoding pays it. Optionally records inputs and exact
    errors."""

    def __init__(self, lin, lo: int, hi: int, mix: str = "soft") -> None:
        super().__init__()
        self.lin, self.lo, self.hi, self.mix = lin, lo, hi, mix
        self.name = lin.name
        self.z = nn.Parameter(torch.zeros(()))
        self.record: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.teacher = False  # run at the stored maximum (the teacher of --loss kl)
        lin.cache_size = max(lin.cache_size, 3)

    def p(self) -> torch.Tensor:
        return self.lo + torch.sigmoid(self.z) * (self.hi - self.lo)

    def set_p(self, p: float) -> None:
        if self.hi == self.lo:
            return
        f = min(max((p - self.lo) / (self.hi - self.lo), 0.02), 0.98)
        self.z.data.fill_(math.log(f / (1 - f)))

    def widths(self) -> tuple[int, int]:
        if self.hi == self.lo:
            return self.lo, self.lo
        lo = min(int(math.floor(float(self.p().detach()))), self.hi - 1)
        return lo, lo + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, K] -> [B, T, N]
        bias = self.lin.bias
        if self.teacher:
            return F.linear(x, self.lin.qt.dequantize(), bias)
        if self.hi == self.lo:
            return F.linear(x, self.lin.weight_at(self.lo), bias)
        p = self.p()
        lo, hi = self.widths()
        if self.record is not None:  # recording pass (no grad): dequantize without caching, memory stays flat
            yl = F.linear(x, self.lin.qt.dequantize(lo))
            yh = F.linear(x, self.lin.qt.dequantize(hi))
        else:
            yl = F.linear(x, self.lin.weight_at(lo))
            yh = F.linear(x, self.lin.weight_at(hi))
        if self.record is not None:
            K = x.shape[-1]
            d = (yh - yl).detach().reshape(-1, yh.shape[-1])
            self.record.append((x.detach().reshape(-1, K).clone(), torch.linalg.vector_norm(d, dim=-1)))
        d = yh - yl
        if self.mix == "select":
            e = torch.linalg.vector_norm(d.detach(), dim=-1).flatten()  # [B*T] exact errors
            u = torch.empty_like(e)
            u[torch.argsort(e)] = (torch.arange(e.numel(), dtype=e.dtype) + 0.5) / e.numel()  # rank quantiles
            g = torch.sigmoid((u.view(d.shape[:-1]) - (1 - (p - lo))) / SELECT_TAU)  # [B, T]
            y = yl + g.unsqueeze(-1) * d
        else:
            y = yl + (p - lo) * d
        return y if bias is None else y + bias


def _install(model, maxb: dict[str, int], min_bits: int, mix: str = "soft") -> dict[str, MixedLinear]:
    mixed = {}
    for n, lin in list(model.linears().items()):
        if n == "lm_head" or n not in maxb:
            continue
        lo = max(min_bits, lin.min_bits)
        m = MixedLinear(lin, min(lo, maxb[n]), maxb[n], mix)
        model.set_submodule(n, m)
        mixed[n] = m
    return mixed


def _uninstall(model, mixed: dict[str, MixedLinear]) -> None:
    for n, m in mixed.items():
        m.lin.clear_cache()
        model.set_submodule(n, m.lin)


def _mean_p(mixed: dict[str, MixedLinear], sizes: dict[str, int]) -> torch.Tensor:
    tot = sum(sizes.values())
    return sum(m.p() * (sizes[n] / tot) for n, m in mixed.items())


def _project(mixed: dict[str, MixedLinear], sizes: dict[str, int], target: float) -> None:
    """Shift every z by one common delta so that the size-weighted mean p equals ``target``."""
    z0 = {n: float(m.z.detach()) for n, m in mixed.items()}

    def mean_at(delta: float) -> float:
        tot = sum(sizes.values())
        s = 0.0
        for n, m in mixed.items():
            s += sizes[n] * (m.lo + (m.hi - m.lo) / (1 + math.exp(-(z0[n] + delta))))
        return s / tot

    lo_d, hi_d = -40.0, 40.0
    if not mean_at(lo_d) - 1e-6 <= target <= mean_at(hi_d) + 1e-6:
        raise BitdialError(f"target {target:g} bits is outside what the memory maxima allow "
                           f"({mean_at(lo_d):.3f}..{mean_at(hi_d):.3f}); raise --memory-bits or lower the target")
    for _ in range(100):
        mid = (lo_d + hi_d) / 2
        if mean_at(mid) < target:
            lo_d = mid
        else:
            hi_d = mid
    d = (lo_d + hi_d) / 2
    for n, m in mixed.items():
        m.z.data.fill_(z0[n] + d)


def train_precisions(model, mixed: dict[str, MixedLinear], windows: list[torch.Tensor], target: float,
                     s: CalibSettings, progress=None, init: dict[str, float] | None = None) -> dict[str, Any]:
    """Learn z (so p) for ``target``, starting from ``init`` (per module) or the target; returns training
    figures."""
    sizes = {n: m.lin.weights for n, m in mixed.items()}
    for n, m in mixed.items():
        m.set_p(init[n] if init is not None else target)
    _project(mixed, sizes, target)
    params = [m.z for m in mixed.values() if m.hi > m.lo]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    teacher: dict[int, torch.Tensor] = {}
    if s.loss == "kl":  # log-probs of the artifact at its stored maximum, once per window
        for m in mixed.values():
            m.teacher = True
        with torch.no_grad():
            for i, w in enumerate(windows[: max(1, s.steps)]):
                model.max_seq = model.max_batch = 0
                model.setup_cache(1, w.shape[0])
                teacher[i] = F.log_softmax(model(w[None], 0)[0, :-1].float(), -1).to(torch.bfloat16)
        for m in mixed.values():
            m.teacher = False
    losses = []
    t0 = time.perf_counter()
    for step in range(s.steps):
        ids = windows[step % len(windows)][None]  # [1, T]
        model.max_seq = model.max_batch = 0  # fresh KV caches: no autograd history from the last step
        model.setup_cache(1, ids.shape[1])
        with torch.enable_grad():
            logits = model(ids, 0)  # [1, T, V]
            if s.loss == "kl":
                t_lp = teacher[step % len(windows)].float()
                ce = (t_lp.exp() * (t_lp - F.log_softmax(logits[0, :-1], -1))).sum(-1).mean()
            else:
                ce = F.cross_entropy(logits[0, :-1], ids[0, 1:])
            pen = (_mean_p(mixed, sizes) - target) ** 2
            loss = ce + s.alpha * pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(float(ce.detach()))
        if progress is not None:
            progress(step + 1, s.steps, losses[-1])
    _project(mixed, sizes, target)
    return {"steps": s.steps, "loss": s.loss, "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-8:]) / len(losses[-8:]) if losses else None,
            "train_seconds": round(time.perf_counter() - t0, 2)}


# ---- steps 3 and 4: errors, estimators, thresholds ---------------------------------------------------
def _lstsq(feats: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, float]:
    A = torch.stack(feats + [torch.ones_like(y)], dim=1).double()  # [T, F+1]
    sol = torch.linalg.lstsq(A, y.double()[:, None]).solution[:, 0]
    pred = (A @ sol).float()
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return sol.float(), r2


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 3:
        return float("nan")
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def projection_matrix(D: torch.Tensor, X: torch.Tensor, kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    """G [k, K] for the error matrix D = W_h - W_l [N, K]: a random (``jl``) or principal (``pca``,
    from inputs X [T, K]) k x N projection applied to D."""
    N = D.shape[0]
    k = min(k, N)
    if kind == "jl":
        A = torch.randn(k, N, generator=gen) / math.sqrt(k)
    else:
        E = (X @ D.T).double()  # [T, N] error vectors
        _, _, Vh = torch.linalg.svd(E, full_matrices=False)  # O(min(T, N)^2 max(T, N))
        A = Vh[:k].float()  # top-k principal directions [k, N]
        if A.shape[0] < k:  # fewer tokens than rows asked: pad with random directions
            A = torch.cat([A, torch.randn(k - A.shape[0], N, generator=gen) / math.sqrt(k)])
    return A @ D  # [k, K]


FIXED_RATE = 1e-3  # a learned high-width rate below this (or above 1 - this) is fixed at one width


def _fixed_rule(name: str, bits: int, max_bits: int) -> ModuleRule:
    """A module with one width: nothing to estimate or decide."""
    return ModuleRule(name, bits, bits, float(bits), 0.0, "fixed", (1.0, 0.0, 0.0), None, max_bits, {})


def fit_rule(name: str, lin, lo: int, hi: int, p: float, max_bits: int, X: torch.Tensor, e: torch.Tensor,
             n_fit: int, s: CalibSettings, gen: torch.Generator) -> ModuleRule:
    """Choose the estimator and threshold of one module from its recorded inputs X [T, K] and exact
    errors e [T]; rows ``[:n_fit]`` fit, the rest are held out."""
    if lo == hi:
        return _fixed_rule(name, lo, max_bits)
    # a module trained to (almost) always one width gets no estimator: the per-token estimate would cost
    # time on every token to change the width on fewer than 1 in 1000
    if p <= lo + FIXED_RATE:
        return _fixed_rule(name, lo, max_bits)
    if p >= hi - FIXED_RATE:
        return _fixed_rule(name, hi, max_bits)
    n = torch.linalg.vector_norm(X, dim=-1)
    fit, held = slice(0, n_fit), slice(n_fit, None)
    coef_l, r2_lin = _lstsq([n[fit]], e[fit])
    kind = s.estimator
    if kind == "auto":
        kind = "linear" if r2_lin >= s.r2_min else "pca"
    figs: dict[str, float] = {"r2_linear": r2_lin}
    if kind == "linear":
        coef = (float(coef_l[0]), float(coef_l[1]), 0.0)
        G = None
        est = n * coef[0] + coef[1]
    else:
        D = lin.qt.dequantize(hi) - lin.qt.dequantize(lo)  # [N, K]
        G = projection_matrix(D, X[fit], kind, s.proj_dim, gen)
        G = round_g_int8(G).half().float()  # the values stored: int8 codes x power-of-two row scales
        g = torch.linalg.vector_norm(X @ G.T, dim=-1)
        sol, r2p = _lstsq([g[fit], n[fit]], e[fit])
        coef = (float(sol[0]), float(sol[1]), float(sol[2]))
        est = g * coef[0] + n * coef[1] + coef[2]
        figs["r2_proj"] = r2p
    r = hi - p
    est_fit = est[fit]
    thr = float(torch.quantile(est_fit.double(), min(max(r, 0.0), 1.0)))
    if r <= 0:
        thr = float(est_fit.min()) - 1.0
    elif r >= 1:
        thr = float(est_fit.max()) + 1.0
    figs["rate_high_target"] = 1.0 - r
    figs["est_std"] = float(est_fit.std())
    figs["rate_high_fit"] = float((est_fit > thr).float().mean())
    if e[held].numel():
        figs["rate_high_heldout"] = float((est[held] > thr).float().mean())
        figs["spearman_heldout"] = _spearman(est[held], e[held])
    return ModuleRule(name, lo, hi, float(p), thr, kind, coef, G, max_bits, figs)


def fit_rules(model, mixed: dict[str, MixedLinear], windows: list[torch.Tensor], s: CalibSettings,
              gen: torch.Generator) -> dict[str, ModuleRule]:
    for m in mixed.values():
        m.record = []
        m.lin.clear_cache()
    with torch.no_grad():
        for w in windows:
            model(w[None], 0)
    n_fit_w = max(1, (3 * len(windows)) // 4) if len(windows) > 1 else 1
    rules = {}
    for n, m in mixed.items():
        rec, m.record = m.record, None
        lo, hi = m.widths()
        p = float(m.p().detach()) if m.hi > m.lo else float(m.lo)
        if lo == hi or not rec:
            rules[n] = _fixed_rule(n, lo, m.hi)
            continue
        X = torch.cat([r[0] for r in rec])
        e = torch.cat([r[1] for r in rec])
        n_fit = sum(r[0].shape[0] for r in rec[:n_fit_w]) if len(rec) > 1 else int(0.75 * X.shape[0])
        rules[n] = fit_rule(n, m.lin, lo, hi, p, m.hi, X, e, n_fit, s, gen)
    return rules


# ---- the whole pipeline ---------------------------------------------------------------------------
def calibrate(artifact, targets: list[float], calib: str | Path, settings: CalibSettings | None = None, *,
              profile=None, save: bool = True, progress: bool = True) -> list[DynamicPolicy]:
    """Make (and by default store) one dynamic policy per target."""
    from bitdial.artifact import open_artifact
    from bitdial.artifact.writer import _progress
    from bitdial.planning.sensitivity import calibration_windows
    from bitdial.runtime.anyprec import build_model

    s = settings or CalibSettings()
    s.validate()
    targets = parse_targets(targets)
    path = Path(artifact if not hasattr(artifact, "path") else artifact.path)
    art = open_artifact(path)
    if profile is not None:
        profile.check_artifact(art)
    elif s.init == "plan":
        raise BitdialError("--init plan starts from the static plan of each target: give --profile")
    init_plan = s.init == "plan" or (s.init == "auto" and profile is not None)
    modules = art.config.linear_names()
    maxb = memory_max_bits(art, modules, s.memory_bits, profile, s.min_bits)
    sizes = {n: int(art.modules[n]["shape"][0]) * int(art.modules[n]["shape"][1]) for n in modules}
    tot = sum(sizes.values())
    lo_avg = sum(sizes[n] * max(s.min_bits, int(art.modules[n]["min_bits"])) for n in modules) / tot
    hi_avg = sum(sizes[n] * maxb[n] for n in modules) / tot
    for t in targets:
        if not lo_avg <= t <= hi_avg:
            raise BitdialError(f"target {t:g} bits is outside {lo_avg:.2f}..{hi_avg:.2f}, the range the memory "
                               f"budget of {s.memory_bits:g} bits allows; raise --memory-bits or change --targets")
    wins = calibration_windows(art.tokenizer, calib, s.calib_tokens, s.window)
    half = max(1, len(wins) // 2)
    train_w, thr_w = wins[:half], (wins[half:] or wins[:half])
    log.info("calibrating %d targets on %d + %d windows of %d tokens (memory maxima: %.2f bits average)",
             len(targets), len(train_w), len(thr_w), s.window, hi_avg)
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    model = build_model(art, maxb)
    model.setup_cache(1, s.window)
    mixed = _install(model, maxb, s.min_bits, s.mix)
    policies = []
    bar = _progress(progress, len(targets) * (s.steps + 1))
    try:
        with bar:
            for t in targets:
                bar.update(f"target {t:g}: training")

                def step(i: int, n: int, ce: float, t=t) -> None:
                    bar.update(f"target {t:g}: step {i}/{n}, {s.loss} {ce:.3f}")
                    bar.advance()

                init = None
                if init_plan:
                    from bitdial.planning.planner import Budgets, make_plan

                    plan = make_plan(art, profile, Budgets.parse(avg_bits=t), name=f"init-{t:g}", min_bits=s.min_bits)
                    init = {n: float(plan.bits[n]) for n in mixed}
                train = train_precisions(model, mixed, train_w, t, s, progress=step, init=init)
                bar.update(f"target {t:g}: thresholds")
                t1 = time.perf_counter()
                rules = fit_rules(model, mixed, thr_w, s, gen)
                bar.advance()
                settings = {**asdict(s), "init": "plan" if init_plan else "target"}  # auto resolved
                info = {"settings": settings, "calib": str(calib), "train": train,
                        "fit_seconds": round(time.perf_counter() - t1, 2),
                        "estimators": {k: sum(r.estimator == k for r in rules.values()) for k in ESTIMATORS},
                        "profile": str(getattr(profile, "path", None)) if profile is not None else None}
                pol = DynamicPolicy(t, rules, s.memory_bits, info)
                log.info("target %g: expected %.4f bits; estimators %s", t, pol.expected_bits(sizes), info["estimators"])
                policies.append(pol)
                if save:  # each target is stored as soon as it is done: an interrupted run keeps its work
                    save_policies(path, [pol])
    finally:
        _uninstall(model, mixed)
    art.close()
    return policies


__all__ = ["CalibSettings", "MixedLinear", "calibrate", "fit_rule", "fit_rules", "memory_max_bits", "parse_targets",
           "projection_matrix", "train_precisions", "PolicyError"]
