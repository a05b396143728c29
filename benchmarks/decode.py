"""Prefill and decode tokens/s of bitdial's fp32 decoder against transformers, on the default model.

    python benchmarks/decode.py [--threads 1,2] [--runs 5] [--prompt-tokens 128] [--new-tokens 128]

Prints a table and writes benchmarks/results/decode.json. Medians over --runs; both engines are run
in the same process, one after the other, at each thread count (quote ratios from one run).
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

from bitdial.loading import default_model_path, load_model
from bitdial.model.llama import Transformer
import bitdial.kernels as BK
from bitdial.runtime.fused import install_dense
from bitdial.runtime.generate import SamplingParams, generate

ROOT = Path(__file__).resolve().parent


def prompt_ids(tok, n: int) -> list[int]:
    text = (ROOT.parent.parent / "shared" / "data" / "gutenberg" / "pg84.txt")
    words = text.read_text(encoding="utf-8")[:20000] if text.is_file() else "the quick brown fox " * 400
    return tok.encode(words)[:n]


def bench_bitdial(model, tok, ids, new, runs):
    pre, dec = [], []
    params = SamplingParams(max_tokens=new, stop_ids=[])  # never stop early
    generate(model, tok, ids[:8], SamplingParams(max_tokens=4, stop_ids=[]))  # warm-up
    for _ in range(runs):
        r = generate(model, tok, ids, params)
        pre.append(r.prefill_tps)
        dec.append(r.decode_tps)
    return statistics.median(pre), statistics.median(dec)


def bench_transformers(hf, ids, new, runs):
    x = torch.tensor([ids])
    pre, dec = [], []
    with torch.inference_mode():
        hf.generate(x[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            hf(x)
            tp = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            tg = time.perf_counter() - t0
            pre.append(len(ids) / tp)
            dec.append((new - 1) / max(tg - tp, 1e-9))  # generate = one prefill + new-1 decode steps
    return statistics.median(pre), statistics.median(dec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "decode.json"))
    a = ap.parse_args()

    src = load_model("default")
    model = Transformer(src.config, src.tensors).eval().fuse()  # as `bitdial generate` runs it:
    install_dense(model)  # the fused native fp32 decode step (bitdial/runtime/fused.py)
    ids = prompt_ids(src.tokenizer, a.prompt_tokens)
    hf = None
    if not a.no_transformers:
        from transformers import AutoModelForCausalLM

        p = default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    rows = []
    for th in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(th)
        BK.set_threads(th)  # the fused step's kernel pool
        bp, bd = bench_bitdial(model, src.tokenizer, ids, a.new_tokens, a.runs)
        row = {"threads": th, "bitdial_prefill_tps": bp, "bitdial_decode_tps": bd}
        if hf is not None:
            tp, td = bench_transformers(hf, ids, a.new_tokens, a.runs)
            row.update(transformers_prefill_tps=tp, transformers_decode_tps=td,
                       decode_speedup=bd / td, prefill_speedup=bp / tp)
        rows.append(row)

    t = Table(title=f"default model, fp32, prompt {len(ids)} tokens, {a.new_tokens} new, median of {a.runs}")
    cols = list(rows[0])
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    Console().print(t)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "decode", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
            "prompt_tokens": len(ids), "new_tokens": a.new_tokens, "runs": a.runs,
            "torch": torch.__version__, "machine": platform.machine(), "cpu_count": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Console(stderr=True).print(f"wrote {out}")


if __name__ == "__main__":
    main()
