"""Cost of picking the next token: bitdial's sampler against the textbook one (full sort + multinomial).

    python benchmarks/sampling.py [--artifact A --bits 4 --threads 2 --tokens 128 --runs 3]

Part 1 times ``sample_next`` per sampling mode on logits of the default model's size (49152, one torch
thread, as in a decode loop) next to a textbook sampler that sorts the vocabulary and draws with
``torch.multinomial``. Part 2 (with ``--artifact``) generates ``--tokens`` tokens greedily and with
``temperature=0.7, top_p=0.9``, interleaved, and reports decode tokens/s. Prints tables and writes
benchmarks/results/sampling.json (medians).
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

from bitdial.runtime.generate import GenerationResult, SamplingParams, sample_next, stream_generate

ROOT = Path(__file__).resolve().parent
MODES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(temperature=1.0),
    "top_k 40": SamplingParams(temperature=0.7, top_k=40),
    "top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "top_p 0.99": SamplingParams(temperature=1.0, top_p=0.99),
}


def textbook(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Full-vocabulary sort, top-k/top-p masks, softmax, torch.multinomial (bitdial before stop 20)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    z = logits / p.temperature
    if p.top_k:
        z = z.masked_fill(z < torch.topk(z, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        s, i = torch.sort(z, descending=True)
        pr = torch.softmax(s, -1)
        s = s.masked_fill(torch.cumsum(pr, -1) - pr > p.top_p, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(0, i, s)
    return int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen))


def time_ms(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--calls", type=int, default=100, help="timed calls per sampler and mode")
    ap.add_argument("--artifact", default=None, help="also time generation with this artifact")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "sampling.json"))
    a = ap.parse_args()
    con = Console()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(a.vocab, generator=g) * 3.0  # [V]
    rows = []
    for name, p in MODES.items():
        ours = time_ms(lambda: sample_next(logits, p, None, g), a.calls)
        ref = time_ms(lambda: textbook(logits, p, g), a.calls)
        rows.append({"mode": name, "bitdial_ms": ours, "textbook_ms": ref})
    torch.set_num_threads(before)
    t = Table(title=f"next-token pick, V = {a.vocab}, 1 torch thread, median ms")
    for c in ("mode", "bitdial", "textbook", "speedup"):
        t.add_column(c, justify="left" if c == "mode" else "right")
    for r in rows:
        t.add_row(r["mode"], f"{r['bitdial_ms']:.3f}", f"{r['textbook_ms']:.3f}",
                  f"{r['textbook_ms'] / r['bitdial_ms']:.1f}x")
    con.print(t)
    out = {"benchmark": "sampling", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(a),
           "machine": {"platform": platform.platform(), "torch": torch.__version__}, "sampler": rows}
    if a.artifact:
        from bitdial.runtime.engine import Engine

        eng = Engine.load(a.artifact, threads=a.threads, bits=a.bits)
        ids = eng.tokenizer.encode("The history of the city of London begins")
        gen_modes = {"greedy": SamplingParams(max_tokens=a.tokens, temperature=0.0, stop_ids=[]),
                     "top_p 0.9": SamplingParams(max_tokens=a.tokens, temperature=0.7, top_p=0.9, seed=0,
                                                 stop_ids=[])}
        tps: dict[str, list[float]] = {m: [] for m in gen_modes}
        for _ in range(a.runs):  # interleaved: the host's phases hit both modes alike
            for m, p in gen_modes.items():
                res = GenerationResult()
                for _ in stream_generate(eng.model, eng.tokenizer, ids, p, res):
                    pass
                tps[m].append(res.decode_tps)
        gt = Table(title=f"decode tok/s, {Path(a.artifact).name} at {a.bits} bits, {a.threads} threads, "
                         f"{a.tokens} tokens, median of {a.runs}")
        gt.add_column("mode")
        gt.add_column("tok/s", justify="right")
        for m, v in tps.items():
            gt.add_row(m, f"{statistics.median(v):.1f}")
        con.print(gt)
        out["generation"] = {m: {"tokens_per_s": statistics.median(v), "runs": v} for m, v in tps.items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    con.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
