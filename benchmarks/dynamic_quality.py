"""Acceptance table of dynamic per-token precision (issue 6), in the spirit of DP-LLM's Table 1.

    python benchmarks/dynamic_quality.py --artifact A.bitdial --profile P.json [--targets 2.5,2.75,3,3.25,3.5,4]
        [--windows 8] [--adapt 0,0.05] [--out benchmarks/results/dynamic_quality.json]

The artifact must hold dynamic policies for the targets (`bitdial calibrate`). On WikiText-2 validation
(context 512, ``--windows`` windows) it measures, against the dense fp32 default model (GGUF):

* uniform: every decoder linear at the same integer width (targets that are integers);
* static:  the planner's best static plan at the target average bits (integer program on the profile);
* dynamic: the stored policy of the target, every token deciding per module (``--prefill per-token``),
  for each online threshold-tracking gain of ``--adapt`` (0 = the calibrated thresholds as stored).

Reported: mean KL (top-64 + rest lower bound, and the unbiased full-KL estimate), perplexity, top-1
agreement, realized size-weighted bits over the text and the p99 per-window (per-request) deviation.
Embeddings and head stay at their stored 8 bits in every row. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bitdial.artifact import open_artifact
from bitdial.eval import kl_divergence, model_logits_fn
from bitdial.eval.realized import MeteredLogits
from bitdial.planning import Budgets, load_profile, make_plan
from bitdial.policies import attach, policy_max_bits, stored_targets
from bitdial.policies.calibrate import parse_targets
from bitdial.runtime.anyprec import build_model, set_bits
from wiki_reference import WIKI, dense_reference

ROOT = Path(__file__).resolve().parent
console = Console(stderr=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--targets", default="2.5,2.75,3,3.25,3.5,4")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--adapt", default="0,0.05", help="online threshold-tracking gains to evaluate")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label", default="", help="a name for this policy set in the JSON")
    ap.add_argument("--out", default=str(ROOT / "results" / "dynamic_quality.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = parse_targets(args.targets)
    gains = [float(g) for g in args.adapt.split(",")]

    art = open_artifact(args.artifact)
    prof = load_profile(args.profile, art)
    have = stored_targets(art)
    missing = [t for t in targets if t not in have]
    if missing:
        raise SystemExit(f"{args.artifact} has no policy for {missing} (stored: {have}); run `bitdial calibrate`")
    ids, ref = dense_reference(art.tokenizer, args.ctx, args.windows)

    model = build_model(art, policy_max_bits(art))
    rt = attach(model, art, targets, prefill="per-token")
    linears = {n: m for n, m in model.linears().items() if n != "lm_head"}

    def measure(target_for_dev: float | None) -> dict:
        fn = MeteredLogits(model, model_logits_fn(model))
        t0 = time.perf_counter()
        r = kl_divergence(fn, ids, ref, progress=False)
        d = {"kl_mean": r.kl_mean, "kl_mean_estimate": r.kl_mean_estimate, "ppl": r.ppl_cand, "ppl_ref": r.ppl_ref,
             "top1_agreement": r.top1_agreement, "seconds": round(time.perf_counter() - t0, 1)}
        d.update(fn.summary(target_for_dev) or {})
        return d

    rows: list[dict] = []
    for t in targets:
        if float(t).is_integer():
            rt.set_target(None)
            set_bits(model, {n: int(t) for n in linears})
            rows.append(dict(measure(t), method="uniform", target=t))
            console.print(rows[-1])
        rt.set_target(None)
        plan = make_plan(art, prof, Budgets(avg_bits=t), name=f"static-{t:g}")
        set_bits(model, {n: b for n, b in plan.bits.items() if n in linears})
        rows.append(dict(measure(t), method="static", target=t, planned_bits=plan.predicted["avg_bits"]))
        console.print(rows[-1])
        for g in gains:
            rt.set_adapt(g)
            rt.set_target(t)
            rt.reset_counters()
            d = measure(t)
            rates = rt.module_rates()
            pol = rt.policies[t]
            errs = [abs(rates[n] - (1 - r.rate_low)) for n, r in pol.rules.items() if r.low != r.high and rates[n] == rates[n]]
            d.update(method="dynamic" if g == 0 else f"dynamic+adapt{g:g}", target=t, adapt=g,
                     expected_bits=rt.expected_bits(t),
                     module_rate_abs_err_mean=sum(errs) / len(errs) if errs else None)
            rows.append(d)
            console.print(rows[-1])
        rt.set_adapt(0.0)

    best = {}
    for t in targets:
        st = next(r for r in rows if r["target"] == t and r["method"] == "static")
        dyn = [r for r in rows if r["target"] == t and r["method"].startswith("dynamic")]
        best[f"{t:g}"] = {r["method"]: {"kl_vs_static": r["kl_mean"] / st["kl_mean"],
                                        "kl_est_vs_static": r["kl_mean_estimate"] / st["kl_mean_estimate"],
                                        "bits_dev": r["realized_bits"] - t} for r in dyn}
    out = {"artifact": args.artifact, "label": args.label, "profile": args.profile,
           "setup": {"text": str(WIKI), "ctx": args.ctx, "windows": args.windows, "n_tokens": ref.n_scored,
                     "reference": "dense fp32 default model (GGUF)", "prefill": "per-token",
                     "statistic": "kl_mean = top-64 + rest lower bound; kl_mean_estimate = unbiased full-KL estimate",
                     "threads": torch.get_num_threads()},
           "policies": {f"{t:g}": rt.policies[t].info for t in targets}, "rows": rows, "dynamic_vs_static": best}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    tab = Table(title=f"Dynamic vs static vs uniform on WikiText-2 validation (ctx {args.ctx}, {ref.n_scored} tokens)")
    for c in ("target", "method", "KL (bound)", "KL (estimate)", "PPL", "top-1", "realized bits", "p99 |dev|/window"):
        tab.add_column(c, justify="right")
    for r in rows:
        tab.add_row(f"{r['target']:g}", r["method"], f"{r['kl_mean']:.4f}", f"{r['kl_mean_estimate']:.4f}",
                    f"{r['ppl']:.2f}", f"{r['top1_agreement']:.3f}", f"{r['realized_bits']:.3f}",
                    f"{r.get('per_window_p99_abs_dev', float('nan')):.3f}")
    Console().print(tab)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
