"""Dynamic per-token precision (after DP-LLM): every linear picks h or l bits at every step.

A *dynamic policy* is made for one target average precision (``bitdial calibrate``, see
:mod:`bitdial.policies.calibrate`). For every decoder linear i it holds two adjacent widths
``l_i < h_i`` (``h_i`` at most the module's memory maximum ``B_i``), a learned average precision
``p_i`` in ``[l_i, h_i]``, an error estimator and a threshold ``T_i``. At run time, for each token x::

    e_hat = estimate(x)              # cheap estimate of e = ||(W_h - W_l) x||
    bits  = h if e_hat > T_i else l  # T_i: the quantile r_i = h_i - p_i of e_hat on calibration text

so the module runs at h on a fraction ``1 - r_i`` of tokens and its expected width is ``p_i``; the
size-weighted mean of the ``p_i`` is the target.

Estimators (``ModuleRule.estimator``):

* ``linear``:  ``e_hat = a*||x|| + b``, used where a linear fit on calibration data has R^2 >= 0.9;
* ``jl``:      ``e_hat = a*||G x|| + c*||x|| + b`` with ``G = A (W_h - W_l)``, A a k x N Gaussian random
  projection (Johnson-Lindenstrauss), a/b/c by least squares on calibration pairs;
* ``pca``:     the same form with ``A = U_k^T``, the top-k principal directions of the error vectors
  ``(W_h - W_l) x`` on calibration text: the k-dimensional projection that keeps the most error energy
  (bitdial's refinement; it ranks tokens better than a random projection of the same k);
* ``fixed``:   ``l == h`` (the module has one width; nothing to decide).

Prefill runs every module at its maximum ``B_i`` (``prefill="max"``, the default) or per token
(``prefill="per-token"``: each row of the batch decides for itself, as in decoding; used for perplexity).

Storage: ``meta["policies"][name]`` (JSON, see :meth:`DynamicPolicy.to_json`) plus one F16 tensor
``policy.<name>.<module>.G`` per projection estimator, in the artifact itself. ``bitdial calibrate``
rounds every G to the *int8 estimator format* (:func:`round_g_int8`): each row is ``q * 2^e`` with
integer ``|q| <= 127``. Those values are exact in F16 (so the file format is unchanged), and the fused
decode step reads them as int8 codes plus one power-of-two scale per row: a quarter of the fp32 bytes,
the same estimate (:func:`g_int8_parts`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bitdial.errors import BitdialError

log = logging.getLogger(__name__)

try:  # the native estimate (portable C in the kernels library); torch when it is not built
    from bitdial.kernels import _native
except ImportError:
    _native = None

ESTIMATORS = ("linear", "jl", "pca", "fixed")
MAX_PROJ_DIM = 1024  # rows of an estimator's G the fused decode step takes (EST_MAXCH * EST_ROWS in decode.c)
PREFILL_MODES = ("max", "per-token")
POLICY_KIND = "dynamic"
SCHEMA_VERSION = 1


class PolicyError(BitdialError, ValueError):
    """A dynamic policy that is missing, malformed or does not fit the artifact."""


# ---- the int8 estimator format ---------------------------------------------------------------------
G_INT8_MAX = 127


def _row_exponents(G: torch.Tensor) -> torch.Tensor:
    """e [k, 1]: the smallest power of two with max_j |G_tj| <= 127 * 2^e (0 for an all-zero row)."""
    amax = G.abs().amax(dim=1, keepdim=True).double()
    e = torch.ceil(torch.log2(amax / G_INT8_MAX))
    return torch.where(amax > 0, e, torch.zeros_like(e))


def round_g_int8(G: torch.Tensor) -> torch.Tensor:
    """G [k, K] rounded to the int8 estimator format: row t becomes ``q_t * 2^e_t`` (fp32), ``q_t``
    integers in [-127, 127], ``e_t`` from the row's largest magnitude (at least 64 of the 127 steps used)."""
    G = G.to(torch.float32)
    sc = torch.exp2(_row_exponents(G)).to(torch.float32)
    return torch.round(G / sc).clamp_(-G_INT8_MAX, G_INT8_MAX).mul_(sc)


def g_int8_parts(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [k, K], scales fp32 [k]) with ``G == q * scales[:, None]`` exactly, the scales powers of two;
    None when G is not in the int8 estimator format (e.g. an older calibration's fp16 values)."""
    G = G.to(torch.float32)
    if G.ndim != 2 or not torch.isfinite(G).all():
        return None
    sc = torch.exp2(_row_exponents(G)).to(torch.float32)  # [k, 1]
    q = G / sc
    if not (torch.equal(q, torch.round(q)) and bool((q.abs() <= G_INT8_MAX).all())
            and torch.equal(q * sc, G)):
        return None
    return q.to(torch.int8).contiguous(), sc.flatten().contiguous()


def check_proj_rows(name: str, G: torch.Tensor) -> None:
    """The rows of an estimator matrix G are 1..MAX_PROJ_DIM, what the fused decode step takes."""
    rows = G.shape[0] if G.dim() else 0
    if not 1 <= rows <= MAX_PROJ_DIM:
        raise PolicyError(f"{name}: the estimator matrix has {rows} rows; the fused decode step takes "
                          f"1..{MAX_PROJ_DIM} (re-run `bitdial calibrate` with a smaller --proj-dim)")


def policy_name(target: float) -> str:
    """The stored name of the policy for ``target`` bits: ``dyn-3``, ``dyn-2.75``."""
    return f"dyn-{float(target):g}"


@dataclass
class ModuleRule:
    """One module's run-time decision rule."""

    name: str
    low: int  # l
    high: int  # h
    p: float  # learned average precision in [low, high]
    threshold: float  # run at high when the estimate exceeds it
    estimator: str = "linear"
    coef: tuple[float, float, float] = (1.0, 0.0, 0.0)  # linear: (a, b, -); projection: (a, c, b)
    G: torch.Tensor | None = None  # [k, K] fp32, projection estimators only
    max_bits: int = 8  # B_i: the memory maximum (prefill width in "max" mode)
    fit: dict[str, float] = field(default_factory=dict)  # calibration figures (r2, held-out rate, ...)
    # counters (since the last reset): rows decided, rows run at high
    n_rows: int = 0
    n_high: int = 0
    # online threshold tracking (DynamicRuntime(adapt=...)): the live threshold and its step
    live: float = float("nan")
    step: float = 0.0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise PolicyError(f"{self.name}: unknown estimator {self.estimator!r} (one of {', '.join(ESTIMATORS)})")
        if not (1 <= self.low <= self.high <= self.max_bits):
            raise PolicyError(f"{self.name}: widths l={self.low}, h={self.high}, B={self.max_bits} are out of order")
        if self.estimator in ("jl", "pca") and self.G is None:
            raise PolicyError(f"{self.name}: a {self.estimator} estimator needs its projection matrix G")
        if self.G is not None:
            self.G = self.G.to(torch.float32).contiguous()
            check_proj_rows(self.name, self.G)
        if not math.isfinite(self.threshold) and self.low != self.high:
            raise PolicyError(f"{self.name}: threshold {self.threshold} is not finite")

    @property
    def rate_low(self) -> float:
        """r = h - p: the intended fraction of tokens at the low width."""
        return self.high - self.p

    def estimate(self, x: torch.Tensor) -> torch.Tensor:  # [R, K] -> [R]
        n = torch.linalg.vector_norm(x, dim=-1)
        if self.estimator == "linear":
            return n * self.coef[0] + self.coef[1]
        if self.estimator == "fixed":
            return n
        g = torch.linalg.vector_norm(x @ self.G.T, dim=-1)  # [R, k] -> [R]
        a, c, b = self.coef
        return g * a + n * c + b

    def decide_one(self, x: torch.Tensor) -> bool:
        """One row (a decode step): True = run at the high width. The estimate runs in native code
        (``bitdial.kernels.dyn_estimate``) when the library is built, else in torch."""
        if self.low == self.high:
            return True
        if _native is not None and x.is_contiguous() and x.dtype == torch.float32:
            G = self.G
            if self.estimator == "linear":
                e = _native.dyn_estimate(x.data_ptr(), x.shape[-1], 0, 0, self.coef[0], 0.0, self.coef[1])
            else:
                e = _native.dyn_estimate(x.data_ptr(), x.shape[-1], G.data_ptr(), G.shape[0], *self.coef)
        else:
            e = float(self.estimate(x.reshape(1, -1))[0])
        if self.step:
            hi = e > self.live
            self._track(float(hi), 1)
            return hi
        return e > self.threshold

    def choose(self, x: torch.Tensor) -> torch.Tensor:  # [R, K] -> bool [R] (True = high)
        if self.low == self.high:
            return torch.ones(x.shape[0], dtype=torch.bool)
        if self.step:
            hi = self.estimate(x) > self.live
            self._track(float(hi.sum()), hi.shape[0])
            return hi
        return self.estimate(x) > self.threshold

    def _track(self, n_high: float, rows: int) -> None:
        """Stochastic-approximation quantile tracking: the live threshold drifts until the module runs at
        high on the intended fraction 1 - r of the rows it sees (a batch of R rows moves it as min(R, 64)
        single rows would: its mean rate is a good estimate)."""
        self.live += self.step * (n_high / rows - (1.0 - self.rate_low)) * min(rows, 64)

    def set_adapt(self, gain: float) -> None:
        """Track the intended rate online with step ``gain`` x (spread of the calibration estimates)."""
        self.live = self.threshold
        self.step = float(gain) * float(self.fit.get("est_std", 0.0)) if self.low != self.high else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "p": round(float(self.p), 6),
                "threshold": float(self.threshold), "estimator": self.estimator,
                "coef": [float(c) for c in self.coef], "max_bits": self.max_bits,
                "proj_dim": int(self.G.shape[0]) if self.G is not None else 0,
                "fit": {k: float(v) for k, v in self.fit.items()}}


@dataclass
class DynamicPolicy:
    """A calibrated dynamic policy for one target average precision."""

    target: float
    rules: dict[str, ModuleRule]
    memory_bits: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # calibration settings and figures

    @property
    def name(self) -> str:
        return policy_name(self.target)

    def expected_bits(self, sizes: Mapping[str, int]) -> float:
        """Size-weighted mean of the learned p_i (what the thresholds aim at)."""
        tot = sum(sizes[n] for n in self.rules)
        return sum(sizes[n] * r.p for n, r in self.rules.items()) / tot

    def max_bits(self) -> dict[str, int]:
        return {n: r.max_bits for n, r in self.rules.items()}

    def tensor_name(self, module: str) -> str:
        return f"policy.{self.name}.{module}.G"

    def to_json(self) -> dict[str, Any]:
        return {"kind": POLICY_KIND, "schema_version": SCHEMA_VERSION, "target": float(self.target),
                "memory_bits": self.memory_bits, "info": self.info,
                "modules": {n: r.to_json() for n, r in self.rules.items()},
                "tensors": {n: self.tensor_name(n) for n, r in self.rules.items() if r.G is not None}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.tensor_name(n): r.G.to(torch.float16) for n, r in self.rules.items() if r.G is not None}

    @classmethod
    def from_json(cls, d: Any, tensor_fn, where: str = "policy") -> "DynamicPolicy":
        """Parse a stored policy; ``tensor_fn(name)`` returns a stored tensor."""
        try:
            if d.get("kind") != POLICY_KIND:
                raise PolicyError(f"{where} is not a dynamic policy (kind={d.get('kind')!r})")
            if d.get("schema_version") != SCHEMA_VERSION:
                raise PolicyError(f"{where}: schema version {d.get('schema_version')} is not supported "
                                  f"(this bitdial reads {SCHEMA_VERSION}); re-run `bitdial calibrate`")
            tens = d.get("tensors", {})
            rules = {}
            for n, m in d["modules"].items():
                G = tensor_fn(tens[n]).to(torch.float32) if n in tens else None
                rules[n] = ModuleRule(n, int(m["low"]), int(m["high"]), float(m["p"]), float(m["threshold"]),
                                      m["estimator"], tuple(float(c) for c in m["coef"]), G, int(m["max_bits"]),
                                      dict(m.get("fit", {})))
            return cls(float(d["target"]), rules, d.get("memory_bits"), dict(d.get("info", {})))
        except PolicyError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PolicyError(f"{where} is malformed ({type(e).__name__}: {e}); re-run `bitdial calibrate`") from None


# ---- storage in the artifact ----------------------------------------------------------------------
def _art(artifact):
    from bitdial.artifact import open_artifact
    from bitdial.artifact.reader import Artifact

    return artifact if isinstance(artifact, Artifact) else open_artifact(artifact)


def stored_policies(artifact) -> dict[str, dict[str, Any]]:
    """The artifact's dynamic policies as stored JSON, by name."""
    art = _art(artifact)
    pol = art.meta.get("policies") or {}
    if not isinstance(pol, dict):
        raise PolicyError(f"{art.path.name}: the stored policies are malformed (expected an object)")
    return {n: p for n, p in pol.items() if isinstance(p, dict) and p.get("kind") == POLICY_KIND}


def stored_targets(artifact) -> list[float]:
    return sorted(float(p["target"]) for p in stored_policies(artifact).values())


def load_policy(artifact, target: float) -> DynamicPolicy:
    """The stored policy for ``target`` bits, validated against the artifact."""
    art = _art(artifact)
    pols = stored_policies(art)
    for n, d in pols.items():
        if abs(float(d.get("target", -1)) - float(target)) < 1e-9:
            pol = DynamicPolicy.from_json(d, art.tensor, where=f"{art.path.name}: policy {n!r}")
            check_policy(art, pol)
            return pol
    have = ", ".join(f"{t:g}" for t in sorted(float(d["target"]) for d in pols.values())) or "none"
    raise PolicyError(f"{art.path.name} has no dynamic policy for target {float(target):g} bits (stored targets: "
                      f"{have}); make one with `bitdial calibrate {art.path.name} --targets {float(target):g} "
                      "--calib FILE`")


def check_policy(art, pol: DynamicPolicy) -> None:
    for n, r in pol.rules.items():
        m = art.modules.get(n)
        if m is None:
            raise PolicyError(f"{art.path.name}: policy {pol.name!r} names module {n!r}, which the artifact lacks")
        if not int(m["min_bits"]) <= r.low <= r.high <= r.max_bits <= int(m["max_bits"]):
            raise PolicyError(f"{art.path.name}: policy {pol.name!r} runs {n} at {r.low}..{r.max_bits} bits, "
                              f"but it stores {m['min_bits']}..{m['max_bits']}")
        K = int(m["shape"][1])
        if r.G is not None and (r.G.dim() != 2 or r.G.shape[1] != K):
            raise PolicyError(f"{art.path.name}: policy {pol.name!r}: {n} estimator matrix is "
                              f"{list(r.G.shape)}, expected [k, {K}]")


def save_policies(path, policies: list[DynamicPolicy]) -> None:
    """Store ``policies`` in the artifact at ``path`` (atomic rewrite; other stored policies kept,
    same-named ones replaced)."""
    from bitdial.artifact import rewrite_tensors

    art = _art(path)
    for pol in policies:
        check_policy(art, pol)
    meta_pol = dict(art.meta.get("policies") or {})
    drop: set[str] = set()
    for pol in policies:
        old = meta_pol.get(pol.name)
        if isinstance(old, dict):
            drop |= set((old.get("tensors") or {}).values())
        meta_pol[pol.name] = pol.to_json()
    add: dict[str, torch.Tensor] = {}
    for pol in policies:
        add.update(pol.tensors())
    drop = {t for t in drop if t in art.header.tensors}
    art.close()
    rewrite_tensors(path, add=add, drop=drop, meta={"policies": meta_pol})


def delete_policy(path, target: float) -> None:
    from bitdial.artifact import rewrite_tensors

    art = _art(path)
    name = policy_name(target)
    meta_pol = dict(art.meta.get("policies") or {})
    if name not in meta_pol:
        raise PolicyError(f"{art.path.name} has no policy {name!r}")
    drop = {t for t in (meta_pol.pop(name).get("tensors") or {}).values() if t in art.header.tensors}
    art.close()
    rewrite_tensors(path, drop=drop, meta={"policies": meta_pol})


# ---- run time ---------------------------------------------------------------------------------------
class DynamicRuntime:
    """The policies of one model, attached to its linears; the target can change between (or during)
    requests without reloading: switching swaps each module's rule, nothing else."""

    def __init__(self, model, policies: Mapping[float, DynamicPolicy], prefill: str = "max",
                 adapt: float = 0.0) -> None:
        from bitdial.runtime.anyprec import AnyPrecisionLinear

        if not policies:
            raise PolicyError("no dynamic policy given")
        self.model = model
        self.policies = {float(t): p for t, p in policies.items()}
        self.lin = {n: m for n, m in model.linears().items() if n != "lm_head" and isinstance(m, AnyPrecisionLinear)}
        self.sizes = {n: m.weights for n, m in self.lin.items()}
        for t, p in self.policies.items():
            missing = set(self.lin) - set(p.rules)
            if missing:
                raise PolicyError(f"policy {p.name!r} has no rule for {len(missing)} modules (e.g. {sorted(missing)[0]})")
            for n, r in p.rules.items():
                if n in self.lin and not self.lin[n].min_bits <= r.low <= r.max_bits <= self.lin[n].max_bits:
                    raise PolicyError(f"policy {p.name!r}: {n} needs {r.low}..{r.max_bits} bits, "
                                      f"the layer stores {self.lin[n].min_bits}..{self.lin[n].max_bits}")
        self.prefill = "max"
        self.set_prefill(prefill)
        self.adapt = 0.0
        self.set_adapt(adapt)
        self.target: float | None = None
        self.set_target(max(self.policies))
        model.dynamic = self

    @property
    def targets(self) -> list[float]:
        return sorted(self.policies)

    def set_prefill(self, mode: str) -> None:
        if mode not in PREFILL_MODES:
            raise PolicyError(f"prefill mode {mode!r} is not one of {', '.join(PREFILL_MODES)}")
        self.prefill = mode
        for m in self.lin.values():
            m.per_token_prefill = mode == "per-token"

    def set_adapt(self, gain: float) -> None:
        """Online threshold tracking (0 = off: the calibrated thresholds as stored). With a gain > 0 every
        module nudges its threshold after each decision so that its realized rate of high-width rows
        converges to the intended ``1 - r_i`` on whatever text it sees; the calibrated value is the start."""
        if gain < 0:
            raise PolicyError(f"adapt gain must be >= 0, got {gain}")
        self.adapt = float(gain)
        for p in self.policies.values():
            for r in p.rules.values():
                r.set_adapt(gain)

    def set_target(self, target: float | None) -> None:
        """Switch every module to the policy of ``target`` (None: detach, static widths again)."""
        if target is None:
            for m in self.lin.values():
                m.rule = None
            self.target = None
            return
        t = float(target)
        if t not in self.policies:
            raise PolicyError(f"no dynamic policy for target {t:g} (loaded: "
                              f"{', '.join(f'{x:g}' for x in self.targets)})")
        pol = self.policies[t]
        for n, m in self.lin.items():
            m.rule = pol.rules[n]
            m.cache_size = max(m.cache_size, 2)  # batched per-token rows alternate between l and h
        self.target = t

    def _flush(self) -> None:
        fused = getattr(self.model, "fast_decode", None)
        if fused is not None and hasattr(fused, "flush"):
            fused.flush()

    def reset_counters(self) -> None:
        self._flush()
        for p in self.policies.values():
            for r in p.rules.values():
                r.n_rows = r.n_high = 0

    def module_rates(self) -> dict[str, float]:
        """Observed fraction of rows at the high width per module (current target, since the last reset)."""
        self._flush()
        pol = self.policies[self.target]
        return {n: (r.n_high / r.n_rows if r.n_rows else float("nan")) for n, r in pol.rules.items()}

    def expected_bits(self, target: float | None = None) -> float:
        return self.policies[float(target if target is not None else self.target)].expected_bits(self.sizes)


def attach(model, artifact, targets: list[float] | float | None = None, prefill: str = "max",
           adapt: float = 0.0) -> DynamicRuntime:
    """Load the artifact's policies for ``targets`` (default: all stored) onto a built model."""
    art = _art(artifact)
    if targets is None:
        targets = stored_targets(art)
        if not targets:
            raise PolicyError(f"{art.path.name} holds no dynamic policy; make some with `bitdial calibrate`")
    elif not isinstance(targets, (list, tuple)):
        targets = [targets]
    pols = {float(t): load_policy(art, t) for t in targets}
    return DynamicRuntime(model, pols, prefill, adapt)


def policy_max_bits(artifact, targets: list[float] | None = None) -> dict[str, int]:
    """Per module, the highest width any of the policies can run (the widths to build the model at)."""
    art = _art(artifact)
    pols = stored_policies(art)
    want = None if targets is None else {policy_name(t) for t in targets}
    out: dict[str, int] = {}
    for n, d in pols.items():
        if want is not None and n not in want:
            continue
        for m, r in d.get("modules", {}).items():
            out[m] = max(out.get(m, 0), int(r["max_bits"]))
    return out
