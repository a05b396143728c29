"""Decode speed of dynamic precision against static widths with the same average bits (issue 6).

    python benchmarks/dynamic_overhead.py --artifact A.bitdial [--profile P.json] [--targets 3,3.5]
        [--runs 5] [--new-tokens 64] [--threads 2] [--label default] [--out benchmarks/results/dynamic_overhead.json]

For each target the artifact holds a policy for, decode runs alternate (one of each per round, ``--runs``
rounds, medians quoted) between:

* ``dynamic``: the stored policy (every module estimates its error and picks l or h bits per token);
* ``static-plan``: the planner's static plan at the target (needs ``--profile``);
* ``uniform-l`` / ``uniform-h``: every decoder linear at floor / ceil of the target. Decode time is
  linear in the bytes read, so interpolating their ms/token at the *realized* bits of the dynamic run
  gives the static cost of exactly the same average precision (``static-matched``).

Every run generates ``--new-tokens`` tokens greedily after the same prompt (end-of-sequence ignored),
in one process, on an idle machine. Writes JSON and prints a table. The overheads (``dyn vs matched``,
``dyn vs plan``) are medians of the per-round ratios: the runs of one round are back to back, so each
ratio is measured on one machine state (on a noisy host the times of one configuration move by 30%
between rounds, far more than the ratios).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitdial.artifact import open_artifact
from bitdial.policies import attach, policy_max_bits, stored_targets
from bitdial.policies.calibrate import parse_targets
from bitdial.runtime.anyprec import build_model, set_bits
from bitdial.runtime.engine import set_threads
from bitdial.runtime.generate import SamplingParams, generate

ROOT = Path(__file__).resolve().parent
PROMPT = ("The history of the city begins in the first century, when a small settlement grew on the banks of the "
          "river. Over the next centuries it became")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--targets", default=None, help="default: every stored target")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "dynamic_overhead.json"))
    args = ap.parse_args()
    console = Console(stderr=True)
    set_threads(args.threads)
    from bitdial import kernels

    kernels.set_threads(args.threads)
    art = open_artifact(args.artifact)
    targets = parse_targets(args.targets) if args.targets else stored_targets(art)
    prof = None
    if args.profile:
        from bitdial.planning import load_profile

        prof = load_profile(args.profile, art)
    model = build_model(art, policy_max_bits(art))
    rt = attach(model, art, targets)
    lin = {n: m for n, m in model.linears().items() if n != "lm_head"}
    ids = art.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.new_tokens, stop_ids=[])

    def run() -> tuple[float, float]:
        r = generate(model, art.tokenizer, ids, params)
        return r.decode_s / r.decode_steps * 1e3, r.realized_bits

    configs: dict[str, dict] = {}
    for t in targets:
        lo, hi = math.floor(t), math.ceil(t)
        cfg = {"dynamic": ("dyn", t), f"uniform-{lo}": ("bits", {n: lo for n in lin})}
        if hi != lo:
            cfg[f"uniform-{hi}"] = ("bits", {n: hi for n in lin})
        if prof is not None:
            from bitdial.planning import Budgets, make_plan

            plan = make_plan(art, prof, Budgets(avg_bits=t), name=f"s{t:g}")
            cfg["static-plan"] = ("bits", {n: b for n, b in plan.bits.items() if n in lin})
        configs[f"{t:g}"] = cfg

    def apply(kind, val) -> None:
        if kind == "dyn":
            rt.set_target(val)
        else:
            rt.set_target(None)
            set_bits(model, val)

    for cfg in configs.values():  # warm up every configuration once (page-in, caches)
        for kind, val in cfg.values():
            apply(kind, val)
            run()
    times: dict[str, dict[str, list]] = {t: {c: [] for c in cfg} for t, cfg in configs.items()}
    bits: dict[str, dict[str, list]] = {t: {c: [] for c in cfg} for t, cfg in configs.items()}
    for i in range(args.runs):
        for t, cfg in configs.items():
            for c, (kind, val) in cfg.items():
                apply(kind, val)
                ms, b = run()
                times[t][c].append(ms)
                bits[t][c].append(b)
        console.print(f"round {i + 1}/{args.runs} done")

    rows = []
    for t, cfg in configs.items():
        med = {c: statistics.median(v) for c, v in times[t].items()}
        rb = {c: statistics.fmean(v) for c, v in bits[t].items()}
        tf = float(t)
        lo, hi = math.floor(tf), math.ceil(tf)
        T = times[t]

        def matched_at(i: int) -> float:  # the uniform-l/h interpolation at the realized bits, round i
            if hi == lo:
                return T[f"uniform-{lo}"][i]
            x = bits[t]["dynamic"][i]
            return T[f"uniform-{lo}"][i] + (x - lo) * (T[f"uniform-{hi}"][i] - T[f"uniform-{lo}"][i])

        # the configurations of one round run back to back, so the ratio of one round is measured on one
        # machine state: on a noisy host the median of per-round ratios is the robust figure
        r_matched = [T["dynamic"][i] / matched_at(i) - 1 for i in range(args.runs)]
        row = {"target": tf, "ms_per_token": med, "realized_bits": rb, "runs": times[t],
               "static_matched_ms": statistics.median(matched_at(i) for i in range(args.runs)),
               "dynamic_vs_matched": statistics.median(r_matched), "dynamic_vs_matched_rounds": r_matched}
        if "static-plan" in med:
            r_plan = [T["dynamic"][i] / T["static-plan"][i] - 1 for i in range(args.runs)]
            row["dynamic_vs_static_plan"] = statistics.median(r_plan)
            row["dynamic_vs_static_plan_rounds"] = r_plan
        rows.append(row)

    out_path = Path(args.out)
    prev = json.loads(out_path.read_text()) if out_path.exists() else {}
    label = args.label or Path(args.artifact).stem
    prev[label] = {"artifact": args.artifact, "config": art.meta["config"], "threads": args.threads,
                   "runs": args.runs, "new_tokens": args.new_tokens, "cpu": os.cpu_count(),
                   "kernel_variant": kernels.variant(), "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(prev, indent=1))

    tab = Table(title=f"Decode ms/token, dynamic vs static ({label}, {args.threads} threads, medians of {args.runs} "
                      f"rounds; the ratios are medians of per-round ratios)")
    for c in ("target", "dynamic", "realized bits", "static plan", "uniform l / h", "static matched",
              "dyn vs matched", "dyn vs plan"):
        tab.add_column(c, justify="right")
    for r in rows:
        m = r["ms_per_token"]
        lo, hi = math.floor(r["target"]), math.ceil(r["target"])
        tab.add_row(f"{r['target']:g}", f"{m['dynamic']:.1f}", f"{r['realized_bits']['dynamic']:.3f}",
                    f"{m['static-plan']:.1f}" if "static-plan" in m else "-",
                    f"{m[f'uniform-{lo}']:.1f} / {m.get(f'uniform-{hi}', m[f'uniform-{lo}']):.1f}",
                    f"{r['static_matched_ms']:.1f}", f"{100 * r['dynamic_vs_matched']:+.1f}%",
                    f"{100 * r['dynamic_vs_static_plan']:+.1f}%" if "dynamic_vs_static_plan" in r else "-")
    Console().print(tab)
    console.print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
