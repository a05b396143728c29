"""Perplexity of the default model by bitdial and by transformers on the same windows (extra [hf]).

    python benchmarks/ppl_vs_transformers.py [--ctx 512] [--max-windows 64] [--text FILE]

bitdial: ``bitdial.eval.perplexity`` over our decoder. transformers: the same GGUF loaded with
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (fp32), run through the *same* window
plan, and, independently, the transformers perplexity-guide loop (``labels=`` loss per window,
first window all tokens, later windows only their new tokens). Writes benchmarks/results/ppl.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bitdial.eval import model_logits_fn, perplexity, plan_windows
from bitdial.loading import default_model_path, load_model
from bitdial.model.llama import Transformer

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--text", default=str(ROOT.parent.parent / "shared/data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--out", default=str(ROOT / "results" / "ppl.json"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    src = load_model("default")
    ids = src.tokenizer.encode(Path(a.text).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    ours = perplexity(model_logits_fn(Transformer(src.config, src.tensors).eval()), ids, ctx=a.ctx,
                      max_windows=a.max_windows)
    t_ours = time.perf_counter() - t0
    p = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()

    def hf_logits(x):
        with torch.no_grad():
            return hf(x).logits.float()

    t0 = time.perf_counter()
    theirs_same_windows = perplexity(hf_logits, ids, ctx=a.ctx, max_windows=a.max_windows)
    t_hf = time.perf_counter() - t0
    # the transformers perplexity guide, verbatim in spirit: loss with labels, -100 on context tokens
    x = torch.tensor([ids])
    nll_sum, n = 0.0, 0
    for w in plan_windows(len(ids), a.ctx, None, a.max_windows):
        inp = x[:, w.begin:w.end]
        labels = inp.clone()
        labels[:, : max(w.score_from - w.begin, 1)] = -100
        with torch.no_grad():
            loss = hf(inp, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * k
        n += k
    guide = math.exp(nll_sum / n)
    rows = {"bitdial": ours.ppl, "transformers (same windows)": theirs_same_windows.ppl,
            "transformers (guide loop, labels=)": guide}
    t = Table(title=f"Perplexity, {Path(a.text).name}, ctx {a.ctx}, {ours.n_windows} windows, {ours.n_scored} tokens")
    t.add_column("engine")
    t.add_column("ppl", justify="right")
    t.add_column("vs bitdial", justify="right")
    for k, v in rows.items():
        t.add_row(k, f"{v:.6f}", f"{(v / ours.ppl - 1) * 100:+.4f} %")
    Console().print(t)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"ctx": a.ctx, "max_windows": a.max_windows, "n_windows": ours.n_windows,
                                       "n_scored": ours.n_scored, "ppl": rows, "seconds": {"bitdial": t_ours,
                                                                                          "transformers": t_hf}},
                                      indent=2))


if __name__ == "__main__":
    main()
