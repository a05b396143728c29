"""Decode GEMV bandwidth of the native kernels on Llama-3.2-1B shapes, against the machine's read bandwidth.

    python benchmarks/bandwidth.py [--bits 2,3,4,5,6,7,8] [--threads 1,2] [--reps 5] [--group 64]
                                   [--layers 16] [--no-head] [--isa avx512-gfni,avx512-mask] [--bw-gib 1]

A stack of 16 layers x (q 2048x2048, k 512x2048, v 512x2048, o 2048x2048, gate 8192x2048, up 8192x2048,
down 2048x8192) plus the tied lm_head (128256x2048), stored as 8-bit uniform planes with fp16
scales/offsets per group of 64 (synthetic random codes: built directly from random planes, no
quantization search; the bytes come from a 64 MiB random pool). One token goes through every matrix
at k = 2..8 bits, so a pass reads
``sum(qt.bytes_read(k))`` bytes (planes[:k] + scales + offsets: 386 MB at k = 2, 1.3 GB at k = 8),
far more than the last-level cache.

Reported per (kernel variant, threads, k): bytes read, median pass time over --reps, effective GB/s =
bytes / time, that as a % of the read bandwidth measured in the same run (a SIMD sum over a --bw-gib GiB
buffer on the same threads, interleaved with the passes so that both see the same machine load; median
of the probes), time(k) / time(8) next to the k/8 + 0.05 target, and the same pass through the Python
wrapper ``bitdial.kernels.gemv`` (validation + dispatch overhead included). Kernel times call the
native entry point directly with precomputed pointers. Writes benchmarks/results/bandwidth.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

import bitdial.kernels as BK
from bitdial.quant.qtensor import QuantizedTensor

ROOT = Path(__file__).resolve().parent

LAYER_SHAPES = [  # (name, N out, K in) of one Llama-3.2-1B decoder layer
    ("q_proj", 2048, 2048), ("k_proj", 512, 2048), ("v_proj", 512, 2048), ("o_proj", 2048, 2048),
    ("gate_proj", 8192, 2048), ("up_proj", 8192, 2048), ("down_proj", 2048, 8192),
]
HEAD_SHAPE = ("lm_head", 128256, 2048)


def random_qtensor(N: int, K: int, B: int, G: int, pool: torch.Tensor, gen: torch.Generator) -> QuantizedTensor:
    """A uniform QuantizedTensor whose planes are bytes of the random pool (at a random offset) and with
    plausible fp16 scales/offsets."""
    RB = (K + 7) // 8
    n = B * N * RB
    planes = torch.empty(n, dtype=torch.uint8)
    for a in range(0, n, pool.numel() // 2):
        b = min(n, a + pool.numel() // 2)
        off = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
        planes[a:b] = pool[off:off + b - a]
    planes = planes.view(B, N, RB)
    if K % 8:  # keep the layout's zero padding bits
        planes[:, :, -1] &= (1 << (K % 8)) - 1
    ng = math.ceil(K / G)
    scales = (torch.rand(N, ng, generator=gen) * 1e-3 + 1e-4).half()
    offsets = (-torch.rand(N, ng, generator=gen) * 0.1).half()
    return QuantizedTensor("uniform", (N, K), B, G, planes, scales, offsets)


def build_stack(layers: int, head: bool, B: int, G: int) -> list[tuple[str, QuantizedTensor]]:
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen)
    out = [(f"layers.{i}.{n}", random_qtensor(N, K, B, G, pool, gen)) for i in range(layers) for n, N, K in LAYER_SHAPES]
    if head:
        out.append((HEAD_SHAPE[0], random_qtensor(HEAD_SHAPE[1], HEAD_SHAPE[2], B, G, pool, gen)))
    return out


def probe_bandwidth(buf: torch.Tensor) -> float:
    """GB/s of one full SIMD reduction over buf on the kernel threads."""
    t0 = time.perf_counter()
    BK.read_bandwidth(buf)
    return buf.numel() / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--max-bits", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--no-head", action="store_true", help="leave out the 128256x2048 lm_head")
    ap.add_argument("--isa", default=None,
                    help="kernel variants or families to compare, comma-separated (default: the best available)")
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the read-bandwidth buffer (GiB)")
    ap.add_argument("--no-wrapper", action="store_true", help="skip the timing through bitdial.kernels.gemv")
    ap.add_argument("--out", default=str(ROOT / "results" / "bandwidth.json"))
    a = ap.parse_args()
    if not BK.available():
        raise SystemExit("bitdial native kernels are not built: pip install -e . (needs a C compiler)")
    isas = a.isa.split(",") if a.isa else [BK.variant()]
    from bitdial.kernels import _native

    bits = [int(b) for b in a.bits.split(",")]
    thread_counts = [int(t) for t in a.threads.split(",")]
    con = Console(width=max(Console().width, 140))
    t0 = time.perf_counter()
    stack = build_stack(a.layers, not a.no_head, a.max_bits, a.group)
    planes_total = sum(qt.planes.numel() for _, qt in stack)
    con.print(f"[bold]{len(stack)} matrices[/], {sum(q.shape[0] * q.shape[1] for _, q in stack) / 1e9:.3f} G weights, "
              f"planes {planes_total / 2**20:.0f} MiB at {a.max_bits} bits (built in {time.perf_counter() - t0:.1f} s); "
              f"variants {', '.join(isas)}")

    xs = {K: torch.randn(1, K) for K in {qt.shape[1] for _, qt in stack}}
    outs = [torch.empty(1, qt.shape[0]) for _, qt in stack]
    bw_buf = torch.ones(int(a.bw_gib * 2**30), dtype=torch.uint8)

    def kernel_args(k: int, isa_id: int) -> list[tuple]:
        return [(qt.planes.data_ptr(), qt.scales.data_ptr(), qt.offsets.data_ptr(), xs[qt.shape[1]].data_ptr(),
                 y.data_ptr(), qt.shape[0], qt.shape[1], qt.group_size, qt.max_bits, k, 1, isa_id,
                 BK.plane_stride(qt))
                for (_, qt), y in zip(stack, outs)]

    def pass_native(args: list[tuple]) -> float:
        g = _native.gemv
        t = time.perf_counter()
        for ar in args:
            g(*ar)
        return time.perf_counter() - t

    def pass_wrapper(k: int, isa: str) -> float:
        t = time.perf_counter()
        for (_, qt), y in zip(stack, outs):
            BK.gemv(qt, xs[qt.shape[1]], k, out=y, isa=isa)
        return time.perf_counter() - t

    rows, bw = [], {}
    for nt in thread_counts:
        BK.set_threads(nt)
        probe_bandwidth(bw_buf)  # warm: page tables, threads
        probes = []
        for isa in isas:
            isa_id = _native.isa_id(isa)
            args = {k: kernel_args(k, isa_id) for k in bits}
            for k in bits:
                pass_native(args[k])  # warm-up
            ts = {k: [] for k in bits}
            tw = {k: [] for k in bits}
            for rep in range(a.reps):  # interleave probes and passes: same machine load for both
                probes.append(probe_bandwidth(bw_buf))
                for k in bits:
                    ts[k].append(pass_native(args[k]))
                    if not a.no_wrapper and rep < max(1, a.reps // 2):
                        tw[k].append(pass_wrapper(k, isa))
            times = {k: statistics.median(v) for k, v in ts.items()}
            for k in bits:
                nbytes = sum(qt.bytes_read(k) for _, qt in stack)
                rows.append({"variant": _native.isas()[isa_id][1], "threads": nt, "k": k, "bytes": nbytes,
                             "time_s": times[k], "times_s": ts[k], "gbps": nbytes / times[k] / 1e9,
                             "wrapper_time_s": statistics.median(tw[k]) if tw[k] else None,
                             "time_ratio_vs_8": times[k] / times[8] if 8 in times else None,
                             "ratio_target": k / 8 + 0.05})
        bw[nt] = statistics.median(probes)
        for r in rows:
            if r["threads"] == nt:
                r["read_bw_gbps"] = bw[nt]
                r["pct_read_bw"] = 100 * r["gbps"] / bw[nt]
        con.print(f"threads={nt}: read bandwidth {bw[nt]:.2f} GB/s (median of {len(probes)} probes, "
                  f"min {min(probes):.2f}, max {max(probes):.2f})")

    table = Table(title=f"Decode GEMV, {len(stack)} Llama-3.2-1B matrices, G={a.group}, B={a.max_bits}")
    for col in ("variant", "threads", "k", "MB read", "kernel ms", "GB/s", "read BW", "% read BW", "t(k)/t(8)",
                "target", "wrapper ms"):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = r.get("time_ratio_vs_8")
        ok_ratio = ratio is not None and ratio <= r["ratio_target"]
        pct = r["pct_read_bw"]
        table.add_row(
            r["variant"], str(r["threads"]), str(r["k"]), f"{r['bytes'] / 1e6:.0f}", f"{r['time_s'] * 1e3:.2f}",
            f"{r['gbps']:.2f}", f"{r['read_bw_gbps']:.2f}", f"[{'green' if pct >= 80 else 'red'}]{pct:.0f}%[/]",
            "" if ratio is None else f"[{'green' if ok_ratio else 'red'}]{ratio:.3f}[/]",
            "" if ratio is None else f"{r['ratio_target']:.3f}",
            "" if r["wrapper_time_s"] is None else f"{r['wrapper_time_s'] * 1e3:.2f}",
        )
    con.print(table)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "isa": BK.isa(), "variants": isas, "torch": torch.__version__},
        "config": {"matrices": len(stack), "layers": a.layers, "head": not a.no_head, "group_size": a.group,
                   "max_bits": a.max_bits, "reps": a.reps, "planes_bytes": planes_total},
        "read_bandwidth_gbps": {str(k): v for k, v in bw.items()},
        "results": rows,
    }, indent=1))
    con.print(f"wrote {out}")


if __name__ == "__main__":
    main()
