"""Where a decode step's time goes: the fused native step of an artifact at uniform k bits, by part.

    python benchmarks/step_profile.py --artifact smol.bitdial [--bits 2,3,4,5,6,7,8] [--threads 1,2]
        [--head-bits 8] [--dynamic 2.5,3.5] [--steps 64] [--runs 5] [--out benchmarks/results/step_profile.json]

For each thread count and width k (every decoder linear at k; the output head and the embedding at
``--head-bits``, default k): ``--runs`` runs of ``--steps`` greedy decode steps after a 16-token prompt, each
read from the fused step's own counters (`FusedDecoder.stats`): ms per step in the q/k/v, o, gate/up, down
and head GEMV jobs (activation quantization included, and shown on its own), in everything else inside the
native call (norms, RoPE, attention, SwiGLU, residuals), and outside it (Python, sampling). Each part's
effective bandwidth is its plane + scale bytes over its time, compared with this machine's read bandwidth
on the kernel threads (`bitdial.kernels.read_bandwidth`, best of 5 over 512 MiB, measured in the same run).
``--dynamic`` adds the artifact's stored dynamic policies at those targets (the head and embedding at their
stored maximum, as `generate --dynamic` runs them), with the time in the per-token error estimates on its
own and the realized bits of the decode steps (decoder linears, size-weighted). Medians over the runs; quote ratios
from one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

import bitdial.kernels as BK
from bitdial.artifact import open_artifact
from bitdial.runtime.anyprec import build_model
from bitdial.runtime.fused import PARTS
from bitdial.runtime.generate import SamplingParams, sample_next
from bandwidth import probe_bandwidth

ROOT = Path(__file__).resolve().parent
GREEDY = SamplingParams()  # temperature 0
console = Console(stderr=True)


def read_bw() -> float:
    """Best of 5 reads of 512 MiB on the kernel threads (bandwidth.py's probe), GB/s."""
    buf = torch.ones(512 << 20, dtype=torch.uint8)
    probe_bandwidth(buf)  # warm: page tables, threads
    return max(probe_bandwidth(buf) for _ in range(5))


def part_bytes(model, k: int | None, head_bits: int | None) -> dict[str, float]:
    """Plane + fp16 scale/offset bytes each part reads per step at uniform widths (k None: each module's
    current width, for a static run; a dynamic run's widths vary per token and are not counted)."""
    out = dict.fromkeys(PARTS, 0.0)
    kind = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down", "lm_head": "head"}
    for name, m in model.linears().items():
        part = kind[name.rsplit(".", 1)[-1]]
        out[part] += m.qt.bytes_read((head_bits if part == "head" else k) or m.bits)
    return out


def profile(model, steps: int, runs: int) -> dict:
    V = model.config.vocab_size
    fused = model.fast_decode
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (1, 16), generator=g)
    rows, bits = [], []
    meter = getattr(model, "bits_meter", None)
    with torch.inference_mode():
        model.setup_cache(1, 16 + steps + 8)
        for r in range(runs + 1):
            logits = model(prompt, 0, last_only=True)[0, -1]
            if meter is not None:
                meter.take()  # the prompt's rows are not decode
            fused.stats()
            t = time.perf_counter()
            for i in range(steps):
                tok = sample_next(logits, GREEDY, None, None)  # as generation picks greedily
                logits = model(torch.tensor([[tok]]), 16 + i)[0, -1]
            wall = (time.perf_counter() - t) / steps * 1e3
            s = fused.stats()
            b = meter.take() if meter is not None else float("nan")
            if r:  # the first run warms caches and page-ins
                rows.append((wall, s))
                bits.append(b)
    med = statistics.median
    res = {"wall_ms": med(w for w, _ in rows), "step_ms": med(s["step_ms"] for _, s in rows),
           "prepare_ms": med(s["prepare_ms"] for _, s in rows), "estimate_ms": med(s["estimate_ms"] for _, s in rows),
           "gbs_all": med(s["gbs"] for _, s in rows), "realized_bits": med(bits),
           "parts_ms": {p: med(s["parts_ms"][p] for _, s in rows) for p in (*PARTS, "other")}}
    res["parts_ms"]["outside"] = res["wall_ms"] - res["step_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--head-bits", type=int, default=None, help="width of the head and embedding (default: k)")
    ap.add_argument("--dynamic", default="", help="also profile these stored dynamic targets, e.g. 2.5,3.5")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "step_profile.json"))
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    art = open_artifact(args.artifact)
    results = []
    for nt in threads:
        torch.set_num_threads(nt)
        BK.set_threads(nt)
        bw = read_bw()
        console.log(f"{nt} thread(s): read bandwidth {bw:.1f} GB/s")
        for k in bits:
            hb = args.head_bits or k
            model = build_model(art, {"default": k, "lm_head": hb, "embed_tokens": hb})
            if getattr(model, "fast_decode", None) is None:
                raise SystemExit("this build has no fused native decode step (bitdial.kernels not native)")
            p = profile(model, args.steps, args.runs)
            nb = part_bytes(model, k, hb)
            p["gbs"] = {q: nb[q] / p["parts_ms"][q] / 1e6 for q in PARTS if p["parts_ms"][q] > 0}
            p["pct_read_bw"] = {q: 100 * v / bw for q, v in p["gbs"].items()}
            p["mbytes"] = {q: nb[q] / 1e6 for q in PARTS}
            p["bytes_bound_ms"] = sum(nb.values()) / bw / 1e6
            results.append({"threads": nt, "bits": k, "head_bits": hb, "read_bw_gbs": bw, **p})
            console.log(f"{nt} thr k={k}: {p['wall_ms']:.2f} ms/token, step {p['step_ms']:.2f}, "
                        + ", ".join(f"{q} {v:.2f}" for q, v in p["parts_ms"].items()))
            del model
        if args.dynamic:
            from bitdial.policies import attach, policy_max_bits
            from bitdial.policies.calibrate import parse_targets

            targets = parse_targets(args.dynamic)
            model = build_model(art, policy_max_bits(art))
            rt = attach(model, art, targets)
            for t in targets:
                rt.set_target(t)
                p = profile(model, args.steps, args.runs)
                p["gbs"] = {}
                p["pct_read_bw"] = {}
                results.append({"threads": nt, "bits": f"dyn {t:g}", "head_bits": None, "read_bw_gbs": bw, **p})
                console.log(f"{nt} thr dynamic {t:g}: {p['wall_ms']:.2f} ms/token, estimates {p['estimate_ms']:.2f}, "
                            + ", ".join(f"{q} {v:.2f}" for q, v in p["parts_ms"].items()))
            del model, rt
    table = Table(title=f"{Path(args.artifact).name}: decode step by part, ms/token (% of read BW), "
                        f"medians of {args.runs} x {args.steps} steps")
    for c in ("thr", "k", "total", *PARTS, "other", "outside", "prepare", "estimate", "bytes-bound"):
        table.add_column(c, justify="right")
    for r in results:
        pm = r["parts_ms"]
        hb = r["head_bits"]
        table.add_row(str(r["threads"]), f"{r['bits']}" + (f"/h{hb}" if hb is not None and hb != r["bits"] else ""),
                      f"{r['wall_ms']:.2f}",
                      *(f"{pm[q]:.2f} ({r['pct_read_bw'].get(q, 0):.0f}%)" for q in PARTS),
                      f"{pm['other']:.2f}", f"{pm['outside']:.2f}", f"{r['prepare_ms']:.2f}",
                      f"{r['estimate_ms']:.2f}", f"{r['bytes_bound_ms']:.2f}" if "bytes_bound_ms" in r else "-")
    Console(width=max(Console().width, 190)).print(table)
    out = {"benchmark": "step_profile", "artifact": str(args.artifact), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "kernel_variant": BK.variant(), "torch": torch.__version__},
           "args": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    console.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
