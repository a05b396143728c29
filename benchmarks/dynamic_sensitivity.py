"""The observation behind dynamic precision: per-module sensitivity changes from one decoding step to the next.

    python benchmarks/dynamic_sensitivity.py --artifact A.bitdial [--base-bits 4] [--steps 32] [--layers 0,7,15,22,29]

On the default model, every decoder linear runs at ``--base-bits``. The text (WikiText-2 validation) is
teacher-forced: after a prefix, at each of ``--steps`` decoding steps and for each sampled module, only
that module drops one bit (``base-bits - 1``) for only that step, and the KL divergence of that step's
next-token distribution from the unperturbed one is recorded. The KV cache is restored after each probe
so every step sees the exact unperturbed context.

Reported: the [module x step] KL matrix, per module the spread across steps (p90/p10 ratio, coefficient
of variation), how stable the *ranking* of modules is from step to step (mean Spearman correlation of
the module-sensitivity vectors of two steps) and how often each module is among the top quarter.
Writes benchmarks/results/dynamic_sensitivity.json and a heatmap PNG (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bitdial.artifact import open_artifact
from bitdial.policies.calibrate import _spearman
from bitdial.runtime.anyprec import build_model

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--base-bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--offset", type=int, default=2000, help="token offset into the text")
    ap.add_argument("--layers", default="0,7,15,22,29")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "dynamic_sensitivity.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    art = open_artifact(args.artifact)
    layers = [int(x) for x in args.layers.split(",")]
    mods = [f"layers.{i}.{k}" for i in layers for k in KINDS]
    B, lo = args.base_bits, args.base_bits - 1
    model = build_model(art, {"default": B, "embed_tokens": 8, "lm_head": 8})
    lin = model.linears()
    ids = art.tokenizer.encode(WIKI.read_text(encoding="utf-8"), bos=False)[args.offset:args.offset + args.prefix + args.steps + 1]
    ids_t = torch.tensor(ids)
    model.setup_cache(1, len(ids) + 1)
    kl = torch.zeros(len(mods), args.steps)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(ids_t[None, :args.prefix], 0)
        for s in range(args.steps):
            pos = args.prefix + s
            tok = ids_t[pos:pos + 1][None]
            base = F.log_softmax(model(tok, pos)[0, -1].float(), -1)
            for j, m in enumerate(mods):
                lin[m].bits = lo
                cand = F.log_softmax(model(tok, pos)[0, -1].float(), -1)
                lin[m].bits = B
                kl[j, s] = float((base.exp() * (base - cand)).sum())
            model(tok, pos)  # restore the KV cache entries of this position
            console.print(f"step {s + 1}/{args.steps} ({time.perf_counter() - t0:.0f} s)", end="\r")
    console.print()

    per_module = {}
    for j, m in enumerate(mods):
        v = sorted(kl[j].tolist())
        p10, p90 = v[len(v) // 10], v[(9 * len(v)) // 10]
        mean = statistics.fmean(v)
        per_module[m] = {"mean": mean, "median": v[len(v) // 2], "p10": p10, "p90": p90,
                         "p90_over_p10": p90 / max(p10, 1e-12), "cv": statistics.pstdev(v) / max(mean, 1e-12)}
    q = max(1, len(mods) // 4)
    top = torch.zeros(len(mods))
    for s in range(args.steps):
        top[kl[:, s].argsort(descending=True)[:q]] += 1
    for j, m in enumerate(mods):
        per_module[m]["top_quarter_fraction"] = float(top[j]) / args.steps
    rho = [_spearman(kl[:, a], kl[:, b]) for a in range(args.steps) for b in range(a + 1, args.steps)]
    adj = [_spearman(kl[:, a], kl[:, a + 1]) for a in range(args.steps - 1)]
    always_top = sum(1 for m in mods if per_module[m]["top_quarter_fraction"] == 1.0)
    sometimes_top = sum(1 for m in mods if 0 < per_module[m]["top_quarter_fraction"] < 1.0)
    summary = {"modules": len(mods), "steps": args.steps, "base_bits": B, "probe_bits": lo,
               "mean_spearman_between_steps": statistics.fmean(rho),
               "mean_spearman_adjacent_steps": statistics.fmean(adj),
               "median_p90_over_p10": statistics.median(d["p90_over_p10"] for d in per_module.values()),
               "median_cv": statistics.median(d["cv"] for d in per_module.values()),
               "modules_always_in_top_quarter": always_top, "modules_sometimes_in_top_quarter": sometimes_top,
               "seconds": round(time.perf_counter() - t0, 1)}
    out = {"artifact": args.artifact, "text": str(WIKI), "offset": args.offset, "prefix": args.prefix,
           "summary": summary, "modules": mods, "kl": kl.tolist(), "per_module": per_module}
    Path(args.out).write_text(json.dumps(out, indent=1))

    t = Table(title=f"Per-module sensitivity across {args.steps} decoding steps (KL when one module drops "
                    f"{B}->{lo} bits at one step)")
    for c in ("module", "mean KL", "p10", "p90", "p90/p10", "CV", "in top 1/4"):
        t.add_column(c, justify="right")
    for m in sorted(mods, key=lambda m: -per_module[m]["mean"])[:20]:
        d = per_module[m]
        t.add_row(m, f"{d['mean']:.2e}", f"{d['p10']:.1e}", f"{d['p90']:.1e}", f"{d['p90_over_p10']:.1f}",
                  f"{d['cv']:.2f}", f"{d['top_quarter_fraction']:.2f}")
    Console().print(t)
    Console().print(summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 9))
        im = ax.imshow(torch.log10(kl.clamp_min(1e-7)).numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(mods)), [m.replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                                         for m in mods], fontsize=6)
        ax.set_xlabel("decoding step")
        ax.set_title(f"log10 KL when one module drops {B}->{lo} bits at one step (SmolLM2-135M)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        png = Path(args.out).with_suffix(".png")
        fig.savefig(png, dpi=110)
        console.print(f"wrote {png}")
    except ImportError:
        console.print("matplotlib not installed: no heatmap (pip install bitdial[plot])")


if __name__ == "__main__":
    main()
