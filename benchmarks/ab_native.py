"""Interleaved A/B of two builds of the native library on the same GEMV stack, in one process.

    python setup.py build_ext --inplace && cp src/bitdial/kernels/_native*.so /tmp/a.so   # build A
    ... change the C code, rebuild, cp ... /tmp/b.so                                       # build B
    python benchmarks/ab_native.py /tmp/a.so /tmp/b.so [--shapes 1b|smol] [--copies 16] [--bits 2,4,8]
        [--threads 2] [--rounds 9] [--out benchmarks/results/ab_native.json]

On a shared VM the speed of a configuration moves by up to 2x within minutes, so two builds timed one
after the other cannot be compared. This loads both libraries into one process (two copies of the
extension module under different names), builds one token's stack of matrices, and in every round runs
a full pass of A and one of B at each width (A first in odd rounds, B first in even ones). Each round
gives a ratio B/A; the median ratio over the rounds is the figure to quote (slow phases of the host hit
both builds of a round alike).

``--shapes 1b``: ``--copies`` layers of Llama-3.2-1B shapes (q, k, v, o, gate, up, down; K = 2048 and
8192), 113 MB of planes per layer at 8 bits: DRAM-resident. ``--shapes smol``: ``--copies`` layers of the
default model's shapes (K = 576 and 1536). ``--shapes 7b``: Llama-2-7B layer shapes (K = 4096 and 11008),
12 layers by default, the 2.6 B synthetic model's stack without its embedding and head. Random 8-bit
planes, fp16 scales and offsets, group 64 (``bandwidth.random_qtensor``); the first round is a warm-up and
is not counted. Prints a table and writes JSON (per-round times and ratios).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bandwidth import LAYER_SHAPES as BANDWIDTH_LAYER
from bandwidth import random_qtensor
from bitdial.kernels import plane_stride

ROOT = Path(__file__).resolve().parent
LAYER_SHAPES = {  # (N, K) of q, k, v, o, gate, up, down
    "1b": [(N, K) for _, N, K in BANDWIDTH_LAYER],
    "smol": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "7b": [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)],
}


def load_copy(path: str, tag: str, tmp: Path):
    """The extension module at ``path`` loaded under its own name (its own thread pool and state)."""
    src = Path(path)
    if not src.is_file():
        raise SystemExit(f"{path}: no such file (build the library and copy src/bitdial/kernels/_native*.so)")
    d = tmp / tag
    d.mkdir()
    dst = d / src.name if src.name.startswith("_native") else d / "_native.so"
    shutil.copy(src, dst)
    spec = importlib.util.spec_from_file_location(f"{tag}._native", dst)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_stack(shapes: list[tuple[int, int]], seed: int = 0) -> list[tuple]:
    """(qt, x, y, plane stride) per matrix: bandwidth.py's random 8-bit planes, group 64."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=g)  # random plane bytes, reused
    mats = []
    for N, K in shapes:
        qt = random_qtensor(N, K, 8, 64, pool, g)
        mats.append((qt, torch.randn(1, K, generator=g), torch.empty(1, N), plane_stride(qt)))
    return mats


def one_pass(mod, mats: list[tuple], k: int) -> float:
    t0 = time.perf_counter()
    for qt, x, y, ps in mats:
        N, K = qt.shape
        mod.gemv(qt.planes.data_ptr(), qt.scales.data_ptr(), qt.offsets.data_ptr(), x.data_ptr(), y.data_ptr(), N, K,
                 qt.group_size, qt.max_bits, k, 1, -1, ps)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="build A: a copy of src/bitdial/kernels/_native*.so")
    ap.add_argument("b", help="build B")
    ap.add_argument("--shapes", choices=sorted(LAYER_SHAPES), default="1b")
    ap.add_argument("--copies", type=int, default=None, help="layers (default: 16 for 1b, 12 for 7b, 120 for smol)")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "results" / "ab_native.json"))
    a = ap.parse_args()
    if a.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (the first round is a warm-up)")
    ks = [int(v) for v in a.bits.split(",")]
    if any(not 1 <= k <= 8 for k in ks):
        raise SystemExit(f"--bits must be in 1..8, got {a.bits}")
    copies = a.copies or {"1b": 16, "7b": 12}.get(a.shapes, 120)
    con = Console()
    with tempfile.TemporaryDirectory() as tmp:
        mods = [load_copy(a.a, "build_a", Path(tmp)), load_copy(a.b, "build_b", Path(tmp))]
        for m in mods:
            m.set_threads(a.threads)
        mats = build_stack(LAYER_SHAPES[a.shapes] * copies)
        nbytes = {k: sum(qt.bytes_read(k) for qt, *_ in mats) for k in ks}
        times: dict[str, dict[int, list[float]]] = {"a": {k: [] for k in ks}, "b": {k: [] for k in ks}}
        for r in range(a.rounds):
            order = list(zip("ab", mods)) if r % 2 else list(zip("ba", mods[::-1]))  # ABBA: no fixed order
            for k in ks:
                for tag, m in order:
                    t = one_pass(m, mats, k)
                    if r:
                        times[tag][k].append(t)
    rows = []
    for k in ks:
        ta, tb = times["a"][k], times["b"][k]
        ratios = [y / x for x, y in zip(ta, tb)]
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append({"k": k, "bytes": nbytes[k], "a_ms": ma * 1e3, "b_ms": mb * 1e3, "a_gbs": nbytes[k] / ma / 1e9,
                     "b_gbs": nbytes[k] / mb / 1e9, "ratio_b_over_a": statistics.median(ratios), "ratios": ratios,
                     "a_times_s": ta, "b_times_s": tb})
    t = Table(title=f"A/B, {a.shapes} shapes x {copies} layers, {a.threads} threads, {a.rounds - 1} rounds")
    for c in ("k", "MB", "A ms", "B ms", "A GB/s", "B GB/s", "B/A (median of rounds)", "rounds B < A"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["k"]), f"{r['bytes'] / 1e6:.0f}", f"{r['a_ms']:.2f}", f"{r['b_ms']:.2f}", f"{r['a_gbs']:.1f}",
                  f"{r['b_gbs']:.1f}", f"{r['ratio_b_over_a']:.3f}",
                  f"{sum(x < 1 for x in r['ratios'])}/{len(r['ratios'])}")
    con.print(t)
    out = {"benchmark": "ab_native", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(a), "copies": copies,
           "machine": {"platform": platform.platform(), "torch": torch.__version__}, "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    con.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
