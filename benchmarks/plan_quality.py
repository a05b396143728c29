"""Acceptance figures of budgeted mixed-precision plans (issue 5) on the default model.

    python benchmarks/plan_quality.py --artifact /tmp/smol.bitdial [--profile P.json] [--windows 4]
        [--bits 2.5,3,3.5] [--latency] [--random-plans 20] [--threads 1]

1. Quality: on WikiText-2 validation (context 512, ``--windows`` windows), KL divergence against the dense
   fp32 default model of (a) uniform widths 2..5 and (b) plans at ``--bits`` average bits per weight
   (nominal, size-weighted over the decoder linears; embeddings/head at 8 bits in both), planned from a
   sensitivity profile calibrated on Pride and Prejudice (pg1342). The uniform curve between integer
   widths is interpolated geometrically; the target is plan KL <= 0.8 x uniform at the same bits.
2. Latency (``--latency``, only when the machine is idle: 1-minute load <= 1.5 unless ``--force``): this
   machine's device profile is measured on the artifact, then ``--random-plans`` random per-module
   assignments are timed and compared with the prediction (median absolute error; target < 10 %), and a plan
   made with a latency budget is timed against its budget.

Writes benchmarks/results/plan_quality.json (and prints a table). Use 1 thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bitdial.artifact import open_artifact
from bitdial.eval import kl_divergence, model_logits_fn
from bitdial.planning import Budgets, load_device, load_profile, make_plan, profile_sensitivity, save_profile
from bitdial.planning.device import kernel_threads, measure_decode, profile_device, save_device
from bitdial.planning.pareto import uniform_point
from bitdial.runtime.anyprec import build_model
from wiki_reference import WIKI, dense_reference

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "data"
CALIB = SHARED / "gutenberg" / "pg1342.txt"
console = Console(stderr=True)


def geo_interp(curve: dict[int, float], a: float) -> float:
    """Uniform KL at fractional bits ``a``: geometric interpolation between the integer widths around it."""
    lo = math.floor(a)
    hi = lo + 1
    if a == lo:
        return curve[lo]
    t = a - lo
    return curve[lo] ** (1 - t) * curve[hi] ** t


def quality(art, prof, args) -> dict:
    ids, ref = dense_reference(art.tokenizer, args.ctx, args.windows)
    model = build_model(art)
    res = {"uniform": {}, "plans": {}}

    def measure(bits) -> dict:
        for name, m in model.linears().items():
            m.bits = bits.get(name, m.max_bits) if name != "lm_head" else bits.get("embed_tokens", m.max_bits)
        model.embed_tokens.bits = bits.get("embed_tokens", model.embed_tokens.max_bits)
        t0 = time.perf_counter()
        r = kl_divergence(model_logits_fn(model), ids, ref, progress=False)
        return {"kl_mean": r.kl_mean, "kl_mean_estimate": r.kl_mean_estimate, "ppl_ratio": r.ppl_ratio,
                "top1_agreement": r.top1_agreement, "seconds": round(time.perf_counter() - t0, 1)}

    for b in range(2, 6):
        bits, pred = uniform_point(art, prof, b)
        res["uniform"][b] = dict(measure(bits), avg_bits=pred["avg_bits"], memory_bytes=pred["memory_bytes"])
        console.print(f"uniform {b}: {res['uniform'][b]}")
    for a in args.bits:
        plan = make_plan(art, prof, Budgets(avg_bits=a), name=f"avg{a:g}", proxy=args.proxy)
        r = measure(plan.bits)
        out = dict(r, avg_bits=plan.predicted["avg_bits"], memory_bytes=plan.predicted["memory_bytes"],
                   proxy=plan.predicted["proxy"])
        for key in ("kl_mean", "kl_mean_estimate"):
            u = geo_interp({b: v[key] for b, v in res["uniform"].items()}, a)
            out[f"uniform_{key}"] = u
            out[f"ratio_{key}"] = r[key] / u
        out["pass"] = out["ratio_kl_mean_estimate"] <= 0.8 and out["ratio_kl_mean"] <= 0.8
        out["widths"] = {str(b): sum(1 for n, v in plan.bits.items() if v == b and n in prof.modules) for b in range(2, 9)}
        res["plans"][f"{a:g}"] = out
        console.print(f"plan {a}: {out}")
    res["setup"] = {"text": str(WIKI), "ctx": args.ctx, "windows": args.windows, "n_tokens": ref.n_scored,
                    "reference": "dense fp32 default model (GGUF)", "tail_samples": 32,
                    "statistic": "kl_mean = top-64 + rest lower bound; kl_mean_estimate = unbiased full-KL estimate"}
    return res


def latency(art, prof, args) -> dict:
    load = os.getloadavg()[0]
    if load > 1.5 and not args.force:
        return {"skipped": f"machine busy (1-minute load {load:.2f} > 1.5); rerun with --latency when idle"}
    dev_path = ROOT / "results" / "plan_device_this_machine.json"
    data = profile_device(art, random_plans=8, seed=args.seed + 1, rounds=5, progress=True)
    data["load_average_at_start"] = load
    save_device(data, dev_path)
    dev = load_device(dev_path)
    model = build_model(art)
    lin = model.linears()
    rng = random.Random(args.seed)
    rows = []
    from bitdial.planning.planner import _spec

    plans = [{n: rng.randint(2, 8) for n in prof.modules} for _ in range(args.random_plans)]
    times = measure_decode(model, [dict(b, lm_head=lin["lm_head"].max_bits) for b in plans], steps=24, rounds=5)
    for bits, measured in zip(plans, times):
        specs = [_spec(art, n, b) for n, b in bits.items()] + [_spec(art, "embed_tokens", 8)]
        predicted = dev.token_ms(specs, art.config.n_layers)
        rows.append({"measured_ms": measured, "predicted_ms": predicted,
                     "abs_rel_error": abs(predicted - measured) / measured})
    med = statistics.median(r["abs_rel_error"] for r in rows) if rows else None
    # a plan under a latency budget halfway between the fastest and slowest predictions
    lo = make_plan(art, prof, Budgets(avg_bits=2), name="lo", device=dev).predicted["latency_ms"]
    hi = make_plan(art, prof, Budgets(), name="hi", device=dev).predicted["latency_ms"]
    budget = (lo + hi) / 2
    plan = make_plan(art, prof, Budgets(latency_ms=budget), name="lat", device=dev)
    measured = measure_decode(model, [dict(plan.bits, lm_head=plan.bits.get("embed_tokens", 8))], steps=24, rounds=3)[0]
    return {"load_at_start": load, "backend": dev.data["backend"], "latency_model": dev.kind,
            "random_plans": rows, "median_abs_rel_error": med, "pass_random": med is not None and med < 0.10,
            "latency_budget_ms": budget, "latency_plan_predicted_ms": plan.predicted["latency_ms"],
            "latency_plan_measured_ms": measured, "pass_budget": measured <= budget,
            "uniform_decode_ms": dev.data["latency"]["uniform_decode_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="/tmp/smol.bitdial")
    ap.add_argument("--profile", default=None, help="sensitivity profile (made if missing)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--bits", default="2.5,3,3.5")
    ap.add_argument("--proxy", default=None)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--random-plans", type=int, default=20)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "plan_quality.json"))
    args = ap.parse_args()
    args.bits = [float(x) for x in args.bits.split(",")]
    torch.set_num_threads(args.threads)
    kernel_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    art = open_artifact(args.artifact)
    prof_path = Path(args.profile or Path(args.artifact).with_suffix(".profile.json"))
    if not prof_path.is_file():
        console.print(f"profiling sensitivity -> {prof_path}")
        save_profile(profile_sensitivity(art, CALIB, progress=True), prof_path)
    prof = load_profile(prof_path, art)
    out = {"artifact": str(art.path), "profile": str(prof_path), "threads": args.threads,
           "chosen_proxy": prof.chosen_proxy, "correlation": prof.data["correlation"],
           "profile_seconds": prof.data.get("seconds")}
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    out["quality"] = prev.get("quality") if args.no_quality else quality(art, prof, args)
    out["latency"] = latency(art, prof, args) if args.latency else prev.get("latency")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    t = Table(title="planned mix vs uniform (KL vs dense fp32, WikiText-2)")
    for c in ("avg bits", "plan KL (bound)", "uniform KL (bound)", "ratio", "plan KL (est.)", "uniform (est.)", "ratio", "pass"):
        t.add_column(c, justify="right")
    for a, r in (out["quality"] or {}).get("plans", {}).items():
        t.add_row(a, f"{r['kl_mean']:.4f}", f"{r['uniform_kl_mean']:.4f}", f"{r['ratio_kl_mean']:.2f}",
                  f"{r['kl_mean_estimate']:.4f}", f"{r['uniform_kl_mean_estimate']:.4f}",
                  f"{r['ratio_kl_mean_estimate']:.2f}", "yes" if r["pass"] else "NO")
    Console().print(t)
    if out.get("latency"):
        Console().print({k: v for k, v in out["latency"].items() if k != "random_plans"})


if __name__ == "__main__":
    main()
