"""Decode speed of dynamic precision against static widths with the same average bits (issue 6).

    python benchmarks/dynamic_overhead.py --artifact A.bitdial [--profile P.json] [--targets 3,3.5]
        [--runs 5] [--new-tokens 64] [--threads 2] [--label default] [--out benchmarks/results/dynamic_overhead.json]

For each target the artifact holds a policy for, decode runs alternate (one of each per round, ``--runs``
rounds, medians quoted) between:

* ``dynamic``: the stored policy (every module estimates its error and picks l or h bits per token);
* ``static-plan``: the planner's static plan at the target, or (``--plan-at realized``) at the bits the dynamic
  policy realized on the same steps in a first pass (needs ``--profile``);
* ``uniform-l`` / ``uniform-h``: every decoder linear at floor / ceil of the target. Decode time is
  linear in the bytes read, so interpolating their ms/token at the *realized* bits of the dynamic run
  gives the static cost of exactly the same average precision (``static-matched``).

Every run generates ``--new-tokens`` tokens greedily after the same prompt (end-of-sequence ignored),
in one process, on an idle machine. Writes JSON and prints a table. The overheads (``dyn vs matched``,
``dyn vs plan``) are medians of the per-round ratios: the runs of one round are back to back, so each
ratio is measured on one machine state (on a noisy host the times of one configuration move by 30%
between rounds, far more than the ratios).

``--interleave step`` makes a round one decode step: at each position of a teacher-forced text
(WikiText-2 validation, after the prompt) every configuration runs the same token at the same position,
back to back in a rotating order, and the native step's own time is taken (the fused step's counters;
the Python around it is the same for every configuration). The rounds are then ~30 ms apart instead of
seconds, so host drift cancels within a round; ``--runs`` is the number of positions (default 256 in
this mode), and the figures are medians and means over them.
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
DATA = ROOT.parent.parent / "shared" / "data"
PROMPT = ("The history of the city begins in the first century, when a small settlement grew on the banks of the "
          "river. Over the next centuries it became")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--targets", default=None, help="default: every stored target")
    ap.add_argument("--runs", type=int, default=None, help="rounds (default 5; 256 with --interleave step)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interleave", choices=("run", "step"), default="run",
                    help="a round is one generation per configuration (run) or one decode step (step)")
    ap.add_argument("--plan-at", choices=("target", "realized"), default="target",
                    help="static plan at the target, or at the dynamic policy's realized bits on the same steps "
                         "(measured in a first pass: the same average bits even where the policy misses its target)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "dynamic_overhead.json"))
    args = ap.parse_args()
    if args.runs is None:
        args.runs = 256 if args.interleave == "step" else 5
    if args.plan_at == "realized" and not args.profile:
        ap.error("--plan-at realized plans at the policies' realized bits: give --profile")
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

    def apply(kind, val) -> None:
        if kind == "dyn":
            rt.set_target(val)
        else:
            rt.set_target(None)
            set_bits(model, val)

    plan_bits = {t: t for t in targets}
    if args.plan_at == "realized":  # first pass: the dynamic policies alone
        pre = {f"{t:g}": {"dynamic": ("dyn", t)} for t in targets}
        pt = {k: {"dynamic": []} for k in pre}
        pb = {k: {"dynamic": []} for k in pre}
        if args.interleave == "step":
            step_rounds(model, art, ids, pre, apply, pt, pb, args.runs, console)
        else:
            for k, cfg in pre.items():
                apply(*cfg["dynamic"])
                pb[k]["dynamic"].append(run()[1])
        plan_bits = {t: statistics.fmean(pb[f"{t:g}"]["dynamic"]) for t in targets}
        console.print("static plans at the realized bits: " + ", ".join(f"{t:g} -> {b:.3f}" for t, b in plan_bits.items()))
    configs: dict[str, dict] = {}
    for t in targets:
        lo, hi = math.floor(t), math.ceil(t)
        cfg = {"dynamic": ("dyn", t), f"uniform-{lo}": ("bits", {n: lo for n in lin})}
        if hi != lo:
            cfg[f"uniform-{hi}"] = ("bits", {n: hi for n in lin})
        if prof is not None:
            from bitdial.planning import Budgets, make_plan

            plan = make_plan(art, prof, Budgets(avg_bits=plan_bits[t]), name=f"s{t:g}")
            cfg["static-plan"] = ("bits", {n: b for n, b in plan.bits.items() if n in lin})
        configs[f"{t:g}"] = cfg

    for cfg in configs.values():  # warm up every configuration once (page-in, caches)
        for kind, val in cfg.values():
            apply(kind, val)
            run()
    times: dict[str, dict[str, list]] = {t: {c: [] for c in cfg} for t, cfg in configs.items()}
    bits: dict[str, dict[str, list]] = {t: {c: [] for c in cfg} for t, cfg in configs.items()}
    if args.interleave == "step":
        step_rounds(model, art, ids, configs, apply, times, bits, args.runs, console)
    else:
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
        matched = [matched_at(i) for i in range(args.runs)]
        r_matched = [d / m - 1 for d, m in zip(T["dynamic"], matched)]
        row = {"target": tf, "ms_per_token": med, "realized_bits": rb, "runs": times[t], "plan_bits": plan_bits[tf],
               "static_matched_ms": statistics.median(matched),
               "dynamic_vs_matched": statistics.median(r_matched), "dynamic_vs_matched_rounds": r_matched,
               # ratio of the means: what tokens/s over the whole text would show
               "dynamic_vs_matched_mean": statistics.fmean(T["dynamic"]) / statistics.fmean(matched) - 1}
        if "static-plan" in med:
            r_plan = [d / p - 1 for d, p in zip(T["dynamic"], T["static-plan"])]
            row["dynamic_vs_static_plan"] = statistics.median(r_plan)
            row["dynamic_vs_static_plan_rounds"] = r_plan
            row["dynamic_vs_static_plan_mean"] = statistics.fmean(T["dynamic"]) / statistics.fmean(T["static-plan"]) - 1
        rows.append(row)

    out_path = Path(args.out)
    prev = json.loads(out_path.read_text()) if out_path.exists() else {}
    label = args.label or Path(args.artifact).stem
    prev[label] = {"artifact": args.artifact, "config": art.meta["config"], "threads": args.threads,
                   "interleave": args.interleave, "plan_at": args.plan_at, "runs": args.runs, "new_tokens": args.new_tokens, "cpu": os.cpu_count(),
                   "kernel_variant": kernels.variant(), "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(prev, indent=1))

    unit = "decode steps" if args.interleave == "step" else "rounds"
    tab = Table(title=f"Decode ms/token, dynamic vs static ({label}, {args.threads} threads, medians of {args.runs} "
                      f"{unit}; the ratios are medians of per-round ratios, [ratio of means])")
    for c in ("target", "dynamic", "realized bits", "static plan", "uniform l / h", "static matched",
              "dyn vs matched", "dyn vs plan"):
        tab.add_column(c, justify="right")
    for r in rows:
        m = r["ms_per_token"]
        lo, hi = math.floor(r["target"]), math.ceil(r["target"])
        tab.add_row(f"{r['target']:g}", f"{m['dynamic']:.1f}", f"{r['realized_bits']['dynamic']:.3f}",
                    f"{m['static-plan']:.1f}" if "static-plan" in m else "-",
                    f"{m[f'uniform-{lo}']:.1f} / {m.get(f'uniform-{hi}', m[f'uniform-{lo}']):.1f}",
                    f"{r['static_matched_ms']:.1f}",
                    f"{100 * r['dynamic_vs_matched']:+.1f}% [{100 * r['dynamic_vs_matched_mean']:+.1f}%]",
                    f"{100 * r['dynamic_vs_static_plan']:+.1f}% [{100 * r['dynamic_vs_static_plan_mean']:+.1f}%]"
                    if "dynamic_vs_static_plan" in r else "-")
    Console().print(tab)
    console.print(f"wrote {out_path}")


def step_rounds(model, art, ids, configs, apply, times, bits, n_steps, console) -> None:
    """One round per position: every configuration runs the same teacher-forced token at the same position
    (overwriting its KV entry), in a rotating order; the fused step's own time and bits are recorded."""
    import torch

    fd = model.fast_decode
    if fd is None:
        raise SystemExit("--interleave step needs the fused native decode step (kernels on)")
    wiki = DATA / "wikitext-2-raw" / "wiki.valid.raw"
    text = art.tokenizer.encode(wiki.read_text(encoding="utf-8")[:40000])[:n_steps]
    if len(text) < n_steps:
        raise SystemExit(f"only {len(text)} tokens of text for {n_steps} steps")
    flat = [(t, c, kv) for t, cfg in configs.items() for c, kv in cfg.items()]
    meter = model.bits_meter
    with torch.inference_mode():
        model.setup_cache(1, len(ids) + n_steps + 1)
        model(torch.tensor([ids]), 0, last_only=True)
        meter.take()
        for i, tok in enumerate(text):
            pos = len(ids) + i
            x = torch.tensor([[tok]])
            for j in range(len(flat)):
                t, c, (kind, val) = flat[(i + j) % len(flat)]
                apply(kind, val)
                fd.stats()  # reset the step counters
                model(x, pos)
                times[t][c].append(fd.stats()["step_ms"])
                bits[t][c].append(meter.take())
            if (i + 1) % 64 == 0:
                console.print(f"step {i + 1}/{n_steps}")


if __name__ == "__main__":
    main()
