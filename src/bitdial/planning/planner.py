"""Budgeted mixed-precision plans: one bit-width per module, least total sensitivity, every budget met.

The problem (a multiple-choice knapsack with a few knapsacks)::

    minimize    Σ_m Σ_b cost[m, b] · x[m, b]
    subject to  Σ_b x[m, b] = 1                                   for every module m     (one width each)
                Σ_m Σ_b r_j[m, b] · x[m, b] ≤ limit_j − fixed_j     for every budget j
                x[m, b] ∈ {0, 1}

Budgets ``j`` and their per-(module, width) resources ``r_j``:

``avg_bits``    bits per weight over the planned modules, size-weighted: ``r = n_weights(m) · b`` and
                ``limit = avg_bits · Σ n_weights``. Nominal bits (the scales/offsets are not counted; they
                add 32/G bits per weight at every width, see ``bytes``).
``memory``      bytes of weights read per token = resident weight bytes at those widths:
                ``r = qt.bytes_read(b)``; the fixed part adds the unplanned modules (embeddings/head at
                their widths) and the float tensors (norms).
``latency_ms``  predicted decode time per token (:class:`~bitdial.planning.device.DeviceModel`):
                ``r = t(shape, b)``, the fixed part ``c0`` plus the unplanned modules.
``energy_mj``   predicted energy per token, the same way.

Solved exactly with ``scipy.optimize.milp`` (HiGHS) when scipy is installed; else (or with
``solver="greedy"``) by a greedy on marginal cost per unit of resource: start every module at its
cheapest-cost width, lower the module with the smallest cost increase per resource saved until every
budget holds, then raise modules while the budgets allow. A budget below the smallest feasible value
raises :class:`~bitdial.errors.BudgetError` naming that smallest value (given the pins and the other
budgets). Costs come from a sensitivity profile (its chosen proxy by default).

Plans are stored in the artifact's header under ``plans`` (:func:`save_plan`); :func:`plan_bits`
returns the ``{module: bits}`` map that ``build_model``/``Engine.load(bits=...)`` take.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bitdial.artifact.writer import MODULE_NAMES_HINT, match_pattern
from bitdial.errors import BitdialError, BudgetError
from bitdial.planning.common import (PlanError, artifact_identity, fixed_modules, head_source, module_bit_range,
                                     parse_size, utc_now)

log = logging.getLogger(__name__)

__all__ = ["Budgets", "Problem", "Plan", "build_problem", "solve", "solve_milp", "solve_greedy", "solve_exhaustive",
           "make_plan", "parse_pins", "save_plan", "load_plans", "plan_bits", "delete_plan", "evaluate_assignment"]

RESOURCES = ("avg_bits", "memory", "latency_ms", "energy_mj")
_UNITS = {"avg_bits": "bits per weight", "memory": "bytes", "latency_ms": "ms per token", "energy_mj": "mJ per token"}
_FLAGS = {"avg_bits": "--avg-bits", "memory": "--memory", "latency_ms": "--latency-ms", "energy_mj": "--energy-mj"}


@dataclass
class Budgets:
    """Upper limits; ``None`` = unconstrained. ``memory`` is in bytes (``parse_size`` reads "60MB")."""

    avg_bits: float | None = None
    memory: int | None = None
    latency_ms: float | None = None
    energy_mj: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.memory, str):
            self.memory = parse_size(self.memory)

    def given(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def parse(cls, avg_bits=None, memory=None, latency_ms=None, energy_mj=None) -> "Budgets":
        return cls(avg_bits=None if avg_bits is None else float(avg_bits),
                   memory=None if memory is None else parse_size(memory),
                   latency_ms=None if latency_ms is None else float(latency_ms),
                   energy_mj=None if energy_mj is None else float(energy_mj))


@dataclass
class Problem:
    """A planning instance in solver form.

    ``options[m]``: widths module m may take; ``cost[m][b]``; ``res[j][m][b]`` the resource of budget j;
    ``fixed[j]``: the part of resource j no decision changes (pins, unplanned modules, c0);
    ``limits[j]``: the budgets (in the resource's units: avg_bits is converted to total weight-bits).
    """

    modules: list[str]
    options: dict[str, list[int]]
    cost: dict[str, dict[int, float]]
    res: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)  # resource units -> user units (avg_bits: 1/Σn)

    def usage(self, assign: dict[str, int], j: str) -> float:
        return self.fixed.get(j, 0.0) + sum(self.res[j][m][assign[m]] for m in self.modules)

    def total_cost(self, assign: dict[str, int]) -> float:
        return sum(self.cost[m][assign[m]] for m in self.modules)

    def feasible(self, assign: dict[str, int], tol: float = 1e-9) -> bool:
        return all(self.usage(assign, j) <= lim * (1 + tol) + tol for j, lim in self.limits.items())

    def min_usage(self, j: str) -> float:
        return self.fixed.get(j, 0.0) + sum(min(self.res[j][m].values()) for m in self.modules)


# ---- solvers ---------------------------------------------------------------------------------------------
def _infeasible(problem: Problem, j: str | None = None, smallest: float | None = None, note: str = "") -> BudgetError:
    if j is None:
        return BudgetError("the budgets cannot all be met together" + note)
    s = problem.scale.get(j, 1.0)
    want = problem.limits[j] * s
    val = smallest * s
    if j == "memory":
        txt = f"{val / 1e6:.3f} MB ({int(math.ceil(val))} bytes)"
        asked = f"{want / 1e6:.3f} MB"
    elif j == "avg_bits":
        txt, asked = f"{val:.4f} bits per weight", f"{want:g}"
    else:
        txt, asked = f"{val:.4f} {_UNITS[j]}", f"{want:g}"
    return BudgetError(f"{_FLAGS[j]} {asked} is infeasible: the smallest feasible {_FLAGS[j]} is {txt}{note}")


def _check_individual(problem: Problem) -> None:
    for j, lim in problem.limits.items():
        lo = problem.min_usage(j)
        if lo > lim * (1 + 1e-9) + 1e-9:
            raise _infeasible(problem, j, lo, " (every planned module at its smallest width, pins and fixed "
                                              "modules as they are)")


def solve_milp(problem: Problem, time_limit: float = 60.0, objective: dict[str, dict[int, float]] | None = None,
               limits: dict[str, float] | None = None) -> dict[str, int] | None:
    """Exact solution with ``scipy.optimize.milp`` (HiGHS); ``None`` if infeasible.

    ``objective`` replaces the cost (used to find the smallest feasible value of a budget); ``limits``
    replaces ``problem.limits``. Raises ImportError without scipy.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    limits = problem.limits if limits is None else limits
    obj = problem.cost if objective is None else objective
    idx = [(m, b) for m in problem.modules for b in problem.options[m]]
    n = len(idx)
    c = np.array([obj[m][b] for m, b in idx], dtype=float)
    cmax = float(np.abs(c).max()) if n else 1.0
    c = c / (cmax if cmax > 0 else 1.0)
    # tie-break: among equal costs prefer the smaller memory footprint (deterministic, smaller plans)
    if "memory" in problem.res and objective is None:
        r = np.array([problem.res["memory"][m][b] for m, b in idx], dtype=float)
        c = c + 1e-7 * r / max(float(r.sum()), 1.0)
    rows, cols, vals = [], [], []
    lb, ub = [], []
    pos = {k: i for i, k in enumerate(idx)}
    for i, m in enumerate(problem.modules):
        for b in problem.options[m]:
            rows.append(i)
            cols.append(pos[(m, b)])
            vals.append(1.0)
        lb.append(1.0)
        ub.append(1.0)
    r0 = len(problem.modules)
    for k, (j, lim) in enumerate(limits.items()):
        rhs = lim - problem.fixed.get(j, 0.0)
        s = max(abs(rhs), max(abs(v) for d in problem.res[j].values() for v in d.values()), 1e-30)
        for m, b in idx:
            v = problem.res[j][m][b]
            if v:
                rows.append(r0 + k)
                cols.append(pos[(m, b)])
                vals.append(v / s)
        lb.append(-np.inf)
        ub.append(rhs / s + 1e-9)
    A = csr_array((vals, (rows, cols)), shape=(r0 + len(limits), n))
    res = milp(c, constraints=LinearConstraint(A, lb, ub), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-7, "presolve": True})
    if res.x is None:
        if res.status == 2:  # infeasible
            return None
        raise BitdialError(f"the MILP solver failed: {res.message}")
    x = res.x
    out = {}
    for m in problem.modules:
        best = max(problem.options[m], key=lambda b: x[pos[(m, b)]])
        out[m] = best
    return out


def solve_greedy(problem: Problem) -> dict[str, int] | None:
    """Greedy on marginal cost per resource (see module doc); ``None`` if it cannot meet the budgets."""
    lim = problem.limits
    assign = {m: min(problem.options[m], key=lambda b: (problem.cost[m][b], -b)) for m in problem.modules}
    use = {j: problem.usage(assign, j) for j in lim}

    def weight(j: str) -> float:
        return max(abs(lim[j] - problem.min_usage(j)), 1e-30)

    # phase 1: lower until feasible
    while any(use[j] > lim[j] * (1 + 1e-12) for j in lim):
        viol = [j for j in lim if use[j] > lim[j] * (1 + 1e-12)]
        best, best_ratio = None, math.inf
        for m in problem.modules:
            cur = assign[m]
            for b in problem.options[m]:
                saved = sum((problem.res[j][m][cur] - problem.res[j][m][b]) / weight(j) for j in viol)
                if saved <= 0:
                    continue
                # never worsen a violated budget nor break a satisfied one: the total violation strictly
                # decreases, so this terminates even when a resource is not monotone in the bits
                if any(use[j] + problem.res[j][m][b] - problem.res[j][m][cur] > max(use[j], lim[j] * (1 + 1e-12))
                       for j in lim):
                    continue
                ratio = (problem.cost[m][b] - problem.cost[m][cur]) / saved
                if ratio < best_ratio:
                    best, best_ratio = (m, b), ratio
        if best is None:
            return None
        m, b = best
        for j in lim:
            use[j] += problem.res[j][m][b] - problem.res[j][m][assign[m]]
        assign[m] = b
    # phase 2: raise modules while every budget still holds (largest cost saved per resource first)
    improved = True
    while improved:
        improved = False
        best, best_ratio = None, 0.0
        for m in problem.modules:
            cur = assign[m]
            for b in problem.options[m]:
                gain = problem.cost[m][cur] - problem.cost[m][b]
                if gain <= 0:
                    continue
                if any(use[j] + problem.res[j][m][b] - problem.res[j][m][cur] > lim[j] * (1 + 1e-12) for j in lim):
                    continue
                extra = sum(max(problem.res[j][m][b] - problem.res[j][m][cur], 0.0) / weight(j) for j in lim)
                ratio = gain / max(extra, 1e-30)
                if ratio > best_ratio:
                    best, best_ratio = (m, b), ratio
        if best is not None:
            m, b = best
            for j in lim:
                use[j] += problem.res[j][m][b] - problem.res[j][m][assign[m]]
            assign[m] = b
            improved = True
    return assign


def solve_exhaustive(problem: Problem) -> dict[str, int] | None:
    """Brute force over every assignment (tests and tiny instances only: Π |options| must be small)."""
    n = math.prod(len(problem.options[m]) for m in problem.modules)
    if n > 2_000_000:
        raise BitdialError(f"exhaustive search over {n} assignments is too large")
    best, best_c = None, math.inf
    for combo in itertools.product(*(problem.options[m] for m in problem.modules)):
        a = dict(zip(problem.modules, combo))
        if problem.feasible(a):
            c = problem.total_cost(a)
            if c < best_c - 1e-15:
                best, best_c = a, c
    return best


def _smallest_feasible(problem: Problem, j: str, solver: str) -> float | None:
    """Smallest value of budget j reachable under the other budgets (None if those are infeasible)."""
    others = {k: v for k, v in problem.limits.items() if k != j}
    if solver == "milp":
        try:
            a = solve_milp(problem, objective=problem.res[j], limits=others)
        except ImportError:
            a = None
        if a is not None:
            return problem.usage(a, j)
        return None
    sub = Problem(problem.modules, problem.options, problem.res[j], problem.res, problem.fixed, others, problem.scale)
    a = solve_greedy(sub)
    return None if a is None else problem.usage(a, j)


def solve(problem: Problem, solver: str = "auto") -> tuple[dict[str, int], str]:
    """Solve ``problem``; returns (assignment, solver used). Raises BudgetError when infeasible."""
    if solver not in ("auto", "milp", "greedy"):
        raise BitdialError(f"unknown solver {solver!r}: use auto, milp or greedy")
    _check_individual(problem)
    used = solver
    assign = None
    if solver in ("auto", "milp"):
        try:
            assign = solve_milp(problem)
            used = "milp"
        except ImportError:
            if solver == "milp":
                raise BitdialError("--solver milp needs scipy (pip install scipy); or use --solver greedy") from None
            log.warning("scipy is not installed: planning with the greedy solver (not guaranteed optimal)")
            used = "greedy"
            assign = solve_greedy(problem)
    else:
        assign = solve_greedy(problem)
    if assign is None:
        parts = []
        for j in problem.limits:
            s = _smallest_feasible(problem, j, used)
            if s is not None and s > problem.limits[j]:
                e = _infeasible(problem, j, s, " given the other budgets")
                parts.append(str(e))
        if parts:
            raise BudgetError("; ".join(parts))
        raise _infeasible(problem, None, note=" (each is feasible alone; relax one of them)")
    return assign, used


# ---- building a problem from an artifact -------------------------------------------------------------------
def parse_pins(pins: list[str] | dict[str, int] | None) -> dict[str, int]:
    """``["*.mlp.down_proj=6", "layers.0.*=8"]`` -> ordered ``{pattern: bits}`` (first match wins)."""
    if not pins:
        return {}
    if isinstance(pins, dict):
        return {str(k): int(v) for k, v in pins.items()}
    out: dict[str, int] = {}
    for p in pins:
        pat, sep, b = str(p).rpartition("=")
        if not sep or not pat or not b.strip().isdigit():
            raise PlanError(f"--pin {p!r}: expected PATTERN=BITS, e.g. 'layers.0.*=8' or '*.mlp.down_proj=6'")
        out[pat.strip()] = int(b)
    return out


def _float_bytes(art) -> int:
    return sum(art.header.tensors[n].nbytes for n in art.meta.get("float_tensors", []))


def _spec(art, name: str, bits: int):
    from bitdial.planning.device import ModuleSpec

    m = art.modules[name]
    return ModuleSpec(shape=(int(m["shape"][0]), int(m["shape"][1])), bits=int(bits),
                      bytes=int(art.qtensor(name).bytes_read(int(bits))))


def _timed(art, name: str) -> bool:
    """Whether a module costs a linear's time per token (the head does; an untied embedding lookup does not)."""
    return not (name == "embed_tokens" and head_source(art) != "embed_tokens")


@dataclass
class Context:
    """Everything :func:`build_problem` derived, kept to describe the plan afterwards."""

    art: Any
    profile: Any
    device: Any
    proxy: str
    planned: list[str]  # modules the solver decides
    pinned: dict[str, int]  # every module pinned (planned or fixed)
    fixed_bits: dict[str, int]  # unplanned modules' widths (pinned or max)
    n_weights: dict[str, int]


def build_problem(art, profile, budgets: Budgets, *, device=None, pins: dict[str, int] | None = None,
                  proxy: str | None = None, min_bits: int | None = None) -> tuple[Problem, Context]:
    """Turn an artifact + profile + budgets (+ device) into a :class:`Problem`."""
    given = budgets.given()
    if ("latency_ms" in given or "energy_mj" in given) and device is None:
        raise PlanError("latency and energy budgets need a device profile (--device, or run `bitdial profile device`)")
    proxy = proxy or profile.chosen_proxy
    costs = profile.costs(proxy)
    pins = dict(pins or {})
    prof_mods = list(profile.modules)
    all_mods = list(art.modules)
    used_pins = {p: False for p in pins}
    pinned: dict[str, int] = {}
    for n in all_mods:
        for p, b in pins.items():
            if match_pattern(p, n):
                used_pins[p] = True
                pinned[n] = int(b)
                break
    for p, ok in used_pins.items():
        if not ok:
            raise PlanError(f"--pin {p}={pins[p]} matches no module of {art.path.name} ({MODULE_NAMES_HINT})")
    for n, b in pinned.items():
        lo, hi = int(art.modules[n]["min_bits"]), int(art.modules[n]["max_bits"])
        if not lo <= b <= hi:
            raise PlanError(f"--pin: {n} cannot run at {b} bits (it stores {lo}..{hi})")
    lo_bits = int(profile.data.get("min_bits", 2)) if min_bits is None else int(min_bits)
    options: dict[str, list[int]] = {}
    for n in prof_mods:
        if n in pinned:
            continue
        opts = [b for b in module_bit_range(art, n, lo_bits) if b in costs[n]]
        if not opts:
            raise PlanError(f"{n}: no width at or above {lo_bits} bits in the profile")
        options[n] = opts
    planned = [n for n in prof_mods if n not in pinned]
    fixed = [n for n in all_mods if n not in profile.modules]
    fixed_bits = {n: pinned.get(n, int(art.modules[n]["max_bits"])) for n in fixed}
    pinned_planned = {n: b for n, b in pinned.items() if n in profile.modules}
    n_w = {n: int(art.modules[n]["shape"][0]) * int(art.modules[n]["shape"][1]) for n in all_mods}

    prob = Problem(modules=planned, options=options, cost={n: costs[n] for n in planned})
    total_planned_w = sum(n_w[n] for n in prof_mods)
    n_layers = art.config.n_layers
    specs = {(n, b): _spec(art, n, b) for n in planned for b in options[n]}
    const_specs = [_spec(art, n, b) for n, b in list(pinned_planned.items()) + list(fixed_bits.items())]
    const_timed = [_spec(art, n, b) for n, b in list(pinned_planned.items()) + list(fixed_bits.items()) if _timed(art, n)]
    # resources are always computed (for reporting); constraints only for the given budgets
    prob.res["avg_bits"] = {n: {b: float(n_w[n] * b) for b in options[n]} for n in planned}
    prob.fixed["avg_bits"] = float(sum(n_w[n] * b for n, b in pinned_planned.items()))
    prob.scale["avg_bits"] = 1.0 / total_planned_w
    prob.res["memory"] = {n: {b: float(specs[(n, b)].bytes) for b in options[n]} for n in planned}
    prob.fixed["memory"] = float(sum(s.bytes for s in const_specs) + _float_bytes(art))
    prob.scale["memory"] = 1.0
    if device is not None:
        prob.res["latency_ms"] = {n: {b: device.module_ms(specs[(n, b)]) if _timed(art, n) else 0.0
                                      for b in options[n]} for n in planned}
        prob.fixed["latency_ms"] = device.c0_ms(n_layers) + sum(device.module_ms(s) for s in const_timed)
        prob.res["energy_mj"] = {n: {b: device.module_mj(specs[(n, b)]) if _timed(art, n) else 0.0
                                     for b in options[n]} for n in planned}
        prob.fixed["energy_mj"] = device.c0_mj(n_layers) + sum(device.module_mj(s) for s in const_timed)
        prob.scale["latency_ms"] = prob.scale["energy_mj"] = 1.0
    for j, v in given.items():
        prob.limits[j] = v / prob.scale[j] if j == "avg_bits" else v
    ctx = Context(art=art, profile=profile, device=device, proxy=proxy, planned=planned, pinned=pinned,
                  fixed_bits=fixed_bits, n_weights=n_w)
    return prob, ctx


def evaluate_assignment(problem: Problem, ctx: Context, assign: dict[str, int]) -> dict[str, Any]:
    """Predicted figures of a full assignment (planned modules) under ``problem``."""
    out: dict[str, Any] = {"cost": problem.total_cost(assign), "proxy": ctx.proxy}
    out["avg_bits"] = problem.usage(assign, "avg_bits") * problem.scale["avg_bits"]
    out["memory_bytes"] = int(round(problem.usage(assign, "memory")))
    w = sum(ctx.n_weights[n] for n in ctx.profile.modules)
    plan_bytes = sum(problem.res["memory"][m][assign[m]] for m in problem.modules) + sum(
        ctx.art.qtensor(n).bytes_read(b) for n, b in ctx.pinned.items() if n in ctx.profile.modules)
    out["bits_read_per_weight"] = plan_bytes * 8 / w
    if "latency_ms" in problem.res:
        out["latency_ms"] = problem.usage(assign, "latency_ms")
        out["energy_mj"] = problem.usage(assign, "energy_mj")
        out["device"] = ctx.device.name
        out["device_estimate"] = ctx.device.estimate
    return out


@dataclass
class Plan:
    """A named plan: every quantized module's width, the budgets it was made for and its predictions."""

    name: str
    bits: dict[str, int]
    budgets: dict[str, float]
    predicted: dict[str, Any]
    pins: dict[str, int]
    solver: str
    profile: dict[str, Any]
    created: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(art, profile, budgets: Budgets, *, name: str, device=None, pins: dict[str, int] | None = None,
              proxy: str | None = None, solver: str = "auto", min_bits: int | None = None) -> Plan:
    """Solve for a plan (not stored; see :func:`save_plan`)."""
    if not name or not str(name).strip():
        raise PlanError("a plan needs a --name")
    if not budgets.given():
        log.info("no budget given: the plan keeps every module at its least-cost width")
    prob, ctx = build_problem(art, profile, budgets, device=device, pins=pins, proxy=proxy, min_bits=min_bits)
    assign, used = solve(prob, solver)
    bits = {**{n: int(b) for n, b in assign.items()}, **{n: int(b) for n, b in ctx.pinned.items()},
            **ctx.fixed_bits}
    bits = {n: bits[n] for n in art.modules if n in bits}
    pred = evaluate_assignment(prob, ctx, assign)
    budgets_json = {k: v for k, v in asdict(budgets).items() if v is not None}
    prof_ref = {"path": str(profile.path) if profile.path else None, "chosen_proxy": profile.chosen_proxy,
                "header_sha256": profile.identity().get("header_sha256")}
    return Plan(name=str(name), bits=bits, budgets=budgets_json, predicted=pred, pins=dict(pins or {}), solver=used,
                profile=prof_ref, created=utc_now())


# ---- storage in the artifact ---------------------------------------------------------------------------
def load_plans(art) -> dict[str, Any]:
    """The artifact's stored plans (``{}`` if none). ``art``: an Artifact or a path."""
    from bitdial.artifact import open_artifact
    from bitdial.artifact.reader import Artifact

    if not isinstance(art, Artifact):
        art = open_artifact(art)
    plans = art.meta.get("plans") or {}
    if not isinstance(plans, dict):
        raise PlanError(f"{art.path}: the stored plans are malformed (expected an object)")
    return plans


def save_plan(path, plan: Plan, *, overwrite: bool = True) -> None:
    """Store ``plan`` in the artifact at ``path`` (atomic header rewrite; other plans kept)."""
    from bitdial.artifact import open_artifact, update_metadata

    art = open_artifact(path)
    plans = dict(load_plans(art))
    for n, b in plan.bits.items():
        m = art.modules.get(n)
        if m is None or not int(m["min_bits"]) <= int(b) <= int(m["max_bits"]):
            raise PlanError(f"plan {plan.name!r}: {n}={b} does not fit {art.path.name}")
    if plan.name in plans and not overwrite:
        raise PlanError(f"{art.path.name} already has a plan named {plan.name!r}")
    plans[plan.name] = plan.to_json()
    art.close()
    update_metadata(path, "plans", plans)


def delete_plan(path, name: str) -> None:
    from bitdial.artifact import update_metadata

    plans = dict(load_plans(path))
    if name not in plans:
        raise PlanError(f"no plan named {name!r} in {path} (it has: {', '.join(sorted(plans)) or 'none'})")
    del plans[name]
    update_metadata(path, "plans", plans)


def plan_bits(artifact, name: str) -> dict[str, int]:
    """The ``{module: bits}`` map of a stored plan, for ``build_model(art, plan_bits(art, name))``.

    ``artifact``: an open Artifact or a path. Raises PlanError naming the stored plans if ``name`` is absent
    or the plan does not fit the artifact.
    """
    from bitdial.artifact import open_artifact
    from bitdial.artifact.reader import Artifact

    art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
    plans = load_plans(art)
    if name not in plans:
        raise PlanError(f"{art.path.name} has no plan named {name!r} (stored plans: "
                        f"{', '.join(sorted(plans)) or 'none'}; make one with `bitdial plan`)")
    p = plans[name]
    try:
        bits = {str(k): int(v) for k, v in p["bits"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PlanError(f"{art.path.name}: plan {name!r} is malformed") from None
    for n, b in bits.items():
        m = art.modules.get(n)
        if m is None or not int(m["min_bits"]) <= b <= int(m["max_bits"]):
            raise PlanError(f"{art.path.name}: plan {name!r} sets {n}={b}, which this artifact cannot run")
    return bits


def identity_matches(profile, art) -> bool:
    return profile.identity().get("header_sha256") == artifact_identity(art)["header_sha256"]


__all__ += ["identity_matches", "Context", "fixed_modules"]
