"""The quality/size/latency frontier: plans at a sweep of average-bit budgets, each measured.

For every budget the optimal plan is solved, its size and predicted latency computed and its KL divergence
(against the artifact at maximum bits) measured on a small sample with :class:`~bitdial.planning.probe.KLProbe`.
Uniform widths are measured too, as the baseline. Points dominated in (size, KL) are flagged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bitdial.errors import BudgetError
from bitdial.planning.common import atomic_write_json, utc_now
from bitdial.planning.planner import Budgets, build_problem, evaluate_assignment, make_plan

log = logging.getLogger(__name__)

__all__ = ["probe_from_profile", "pareto_sweep", "write_pareto_plot", "uniform_point"]


def probe_from_profile(art, profile, *, text=None, ctx: int | None = None, n_windows: int | None = None,
                       cache_dir=None, progress: bool = False):
    """A KLProbe on the profile's ground-truth sample (or on ``text``/``ctx``/``n_windows`` when given)."""
    from bitdial.planning.probe import KLProbe
    from bitdial.planning.sensitivity import text_ids

    gt = profile.data.get("ground_truth") or {}
    ctx = int(ctx or gt.get("ctx") or 128)
    n_windows = int(n_windows or gt.get("n_windows") or 2)
    if text is None:
        text = gt.get("file") or profile.data["calibration"]["file"]
        offset = int(gt.get("offset_tokens", 0)) if gt.get("file") else int(profile.data["calibration"]["n_tokens"])
    else:
        offset = 0
    ids = text_ids(art.tokenizer, text, ctx * n_windows, offset_tokens=offset)
    return KLProbe(art, ids, ctx=ctx, n_windows=n_windows, cache_dir=cache_dir, progress=progress)


def uniform_point(art, profile, bits: int, device=None, pins=None) -> tuple[dict[str, int], dict[str, Any]]:
    """Every planned module at ``bits`` (clamped to its range; pins honored): (full map, predictions)."""
    prob, ctx = build_problem(art, profile, Budgets(), device=device, pins=pins)
    assign = {m: min(max(bits, min(prob.options[m])), max(prob.options[m])) for m in prob.modules}
    full = {**assign, **ctx.pinned, **ctx.fixed_bits}
    return full, evaluate_assignment(prob, ctx, assign)


def pareto_sweep(art, profile, avg_bits: list[float], *, device=None, pins=None, proxy=None, solver: str = "auto",
                 probe=None, uniform_bits: list[int] | None = None, progress: bool = False) -> dict[str, Any]:
    """Plans at each ``avg_bits`` budget (+ uniform baselines); KL measured when ``probe`` is given."""
    points = []
    todo = [("plan", b) for b in avg_bits] + [("uniform", b) for b in (uniform_bits or [])]
    it = todo
    if progress:
        from rich.progress import track

        it = track(todo, description="pareto sweep", transient=True)
    for kind, b in it:
        if kind == "plan":
            try:
                plan = make_plan(art, profile, Budgets(avg_bits=b), name=f"pareto-{b:g}", device=device, pins=pins,
                                 proxy=proxy, solver=solver)
            except BudgetError as e:
                log.warning("skipping avg_bits %g: %s", b, e)
                continue
            bits, pred = plan.bits, plan.predicted
        else:
            bits, pred = uniform_point(art, profile, int(b), device=device, pins=pins)
        pt = {"kind": kind, "budget_avg_bits": b, "avg_bits": pred["avg_bits"], "memory_bytes": pred["memory_bytes"],
              "bits_read_per_weight": pred["bits_read_per_weight"], "predicted_latency_ms": pred.get("latency_ms"),
              "predicted_energy_mj": pred.get("energy_mj"), "cost": pred["cost"]}
        if probe is not None:
            r = probe.measure(bits)
            pt.update(kl_mean=r.kl_mean, kl_p99=r.kl_p99, top1_agreement=r.top1_agreement, ppl_ratio=r.ppl_ratio)
        pt["bits"] = bits
        points.append(pt)
    if probe is not None:
        probe.apply({})
        planned = [p for p in points if p["kind"] == "plan"]
        for p in planned:
            p["dominated"] = any(q is not p and q["memory_bytes"] <= p["memory_bytes"] and q["kl_mean"] < p["kl_mean"]
                                 for q in planned)
    return {"created": utc_now(), "artifact": str(art.path), "proxy": proxy or profile.chosen_proxy,
            "device": None if device is None else device.name,
            "kl_sample": None if probe is None else {"ctx": probe.ctx, "n_windows": probe.n_windows,
                                                     "n_tokens": probe.n_tokens,
                                                     "reference": "the artifact at maximum bits"},
            "points": points}


def write_pareto(result: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, result)


def write_pareto_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Plot KL vs bits per weight (and vs predicted latency when known), plans and uniform widths."""
    from bitdial.planning.views import require_matplotlib

    plt = require_matplotlib()
    pts = result["points"]
    has_kl = any("kl_mean" in p for p in pts)
    has_lat = any(p.get("predicted_latency_ms") is not None for p in pts)
    ncols = 2 if has_lat else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    ykey = "kl_mean" if has_kl else "cost"
    for kind, style in (("plan", "o-"), ("uniform", "s--")):
        sel = sorted((p for p in pts if p["kind"] == kind and p[ykey] > 0), key=lambda p: p["avg_bits"])  # log axis
        if not sel:
            continue
        axes[0][0].plot([p["avg_bits"] for p in sel], [p[ykey] for p in sel], style, label=kind)
        if has_lat:
            axes[0][1].plot([p["predicted_latency_ms"] for p in sel], [p[ykey] for p in sel], style, label=kind)
    axes[0][0].set_xlabel("bits per weight (planned modules)")
    if has_lat:
        axes[0][1].set_xlabel(f"predicted decode latency, ms/token ({result.get('device')})")
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylabel("KL divergence vs max bits (nats/token)" if has_kl else f"total {result.get('proxy')} cost")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(Path(result["artifact"]).name)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
