"""Quality of every k-bit view on the default model: KL divergence and perplexity vs full precision.

    python benchmarks/quality.py [--windows 16] [--ctx 512] [--groups 32,64,128] [--bits 2,3,4,5,6,7,8]
                                 [--methods rtn,nested,search,random,guard,calib,nonuniform] [--calib FILE]

Methods (all on the 210 linear layers; embeddings and the head stay full precision so the columns
compare the linear-layer quantizers alone):
  rtn         plain round-to-nearest k-bit min/max quantization, stored separately for each k
  nested      nested uniform views of one 8-bit code, group range = min/max (clip none)
  search      nested, with the multi-precision clipping search, data-free (``bitdial quantize --calib none``:
              plain squared error, the artifact's default saliency map)
  random      search, errors weighted by activation importance measured on 4096 random token ids, at G = 64
              the value projections' 2-bit view guarded (the default of ``bitdial quantize``: no text involved)
  guard       random, with the guard of G = 64 at every group size (the ablation of docs/bitplanes.md §8,
              "Stop 27")
  calib       search, errors weighted by activation importance from --calib text (not the eval text)
  nonuniform  per-row sensitivity-weighted k-means seed + incremental upscaling (LUTs; no groups)

``--dither SEED`` (off by default) takes the reference off the Q4_1 grid first: the default model's linear
weights sit on Q4_1 levels (groups of 32 along K, 16 levels ``m + d j``), so a 4- or 8-bit min/max
quantizer with groups aligned to 32 (RTN at G = 32, in part at 64 and 128) reproduces them almost
exactly, which no method with other levels can. With ``--dither`` every such weight gets uniform noise of
one Q4_1 step, ``U(-d/2, d/2)`` (d = (max - min) / 15 of its 32-group), seeded: a model with the same
shapes and weight distribution whose values are not on any grid. That dithered model, in fp32, is then
the reference of every method (its own reference cache; results to ``quality_dither.json`` by default).

Text: WikiText-2 validation, windows of --ctx (non-overlapping), the first --windows of them.
Writes benchmarks/results/quality.json and prints one table per group size. The reference's
distributions come from bitdial.eval's on-disk cache (top-64 + tail samples); KL is the unbiased
estimate of the full-vocabulary mean KL (nats), 'KL bound' the top-64 lower bound.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bitdial.eval import kl_divergence, load_or_build_reference, model_logits_fn
from bitdial.loading import load_model
from bitdial.model.llama import Transformer

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data"


def quantize_all(src, method: str, G: int, importance=None):
    """{module: QuantizedTensor at 8 bits} for every linear (or {module: {k: W_k}} for rtn)."""
    from bitdial.artifact.writer import guard_map, resolve_map, saliency_map
    from bitdial.quant.nonuniform import quantize_nonuniform
    from bitdial.quant.uniform import quantize_uniform

    out = {}
    names = src.config.linear_names()
    saliency = resolve_map(saliency_map(None, G), names, 0.0)  # the artifact's defaults
    guard = resolve_map(guard_map(None, importance is not None, G), names, [])
    guard_all = resolve_map(guard_map(None, True, 64), names, [])  # method "guard": G = 64's guard at any G
    for name in names:
        W = src.tensors[f"{name}.weight"]
        imp = importance.get(name) if importance else None
        if method == "nested":
            out[name] = quantize_uniform(W, 8, G, clip="none")
        elif method in ("search", "random", "calib"):
            out[name] = quantize_uniform(W, 8, G, clip="search", importance=imp, saliency=saliency[name],
                                         guard=guard[name])
        elif method == "guard":  # ablation: random, with the value projections' guard at every group size
            out[name] = quantize_uniform(W, 8, G, clip="search", importance=imp,
                                         guard=guard_all[name])
        elif method == "nonuniform":
            out[name] = quantize_nonuniform(W, 8, importance=imp)
    return out


def dither_off_grid(src, seed: int) -> None:
    """Move every linear weight of ``src`` off its Q4_1 grid in place: + U(-d/2, d/2), d the Q4_1 step of its
    group of 32 along K (d = (max - min) / 15: Q4_1 codes span 0..15 in every group)."""
    g = torch.Generator().manual_seed(seed)
    for name in src.config.linear_names():
        W = src.tensors[f"{name}.weight"].float()
        N, K = W.shape
        if K % 32:
            raise SystemExit(f"--dither: {name} has K={K}, not a multiple of the Q4_1 group of 32")
        Wg = W.reshape(N, K // 32, 32)
        d = (Wg.amax(dim=-1, keepdim=True) - Wg.amin(dim=-1, keepdim=True)) / 15  # [N, K/32, 1]
        u = torch.rand(Wg.shape, generator=g) - 0.5
        src.tensors[f"{name}.weight"] = (Wg + u * d).reshape(N, K).contiguous()


def reference_identity(dither: int) -> str:
    """The KL reference's cache identity for the default model (off its grid with ``--dither`` seed, or as it is)."""
    return f"default-fp32-dither{dither}" if dither else "default-fp32"


def weights_at(src, method: str, G: int, k: int, qts) -> dict[str, torch.Tensor]:
    from bitdial.quant.uniform import quantize_rtn

    w = dict(src.tensors)
    for name in src.config.linear_names():
        if method == "rtn":
            w[f"{name}.weight"] = quantize_rtn(src.tensors[f"{name}.weight"], k, G)
        else:
            w[f"{name}.weight"] = qts[name].dequantize(k)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--methods", default="rtn,nested,search,random,calib,nonuniform")
    ap.add_argument("--calib", default=str(DATA / "gutenberg" / "pg1342.txt"))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--dither", type=int, default=0, metavar="SEED",
                    help="take the reference off the Q4_1 grid with this seed (0: the model as it is)")
    ap.add_argument("--out", default=None, help="default: results/quality.json (quality_dither.json with --dither)")
    a = ap.parse_args()
    if a.out is None:
        a.out = str(ROOT / "results" / ("quality_dither.json" if a.dither else "quality.json"))
    con = Console()
    err = Console(stderr=True)

    src = load_model("default")
    src.tensors = dict(src.tensors)
    if a.dither:
        dither_off_grid(src, a.dither)
    ids = src.tokenizer.encode((DATA / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8"))
    ref_model = Transformer(src.config, src.tensors).eval()
    ref = load_or_build_reference(model_logits_fn(ref_model), ids, ctx=a.ctx, max_windows=a.windows, top_k=64,
                                  identity=reference_identity(a.dither),
                                  tail_samples=32)
    importance: dict[str, dict] = {}  # source ("calib" text or "random" ids) -> {module: importance}
    bits = [int(b) for b in a.bits.split(",")]
    groups = [int(g) for g in a.groups.split(",")]
    methods = a.methods.split(",")
    out_path = Path(a.out)
    results = json.loads(out_path.read_text())["results"] if out_path.exists() else []
    done = {(r["method"], r["group_size"], r["bits"]) for r in results}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"benchmark": "quality", "model": "SmolLM2-135M-Instruct", "text": "wikitext-2 valid",
                "ctx": a.ctx, "windows": a.windows, "scored_tokens": ref.n_scored, "ref_ppl": ref.ppl,
                "calib": a.calib, "calib_tokens": a.calib_tokens, "dither_seed": a.dither,
                "note": "linears only; embeddings/head full precision; kl = tail-sampled estimate of full KL"}
        out_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    for method in methods:
        for G in ([0] if method == "nonuniform" else groups):
            todo = [k for k in bits if (method, G, k) not in done]
            if not todo:
                continue
            t0 = time.perf_counter()
            source = {"calib": "calib", "random": "random", "guard": "random"}.get(method)
            if source is not None and source not in importance:
                from bitdial.quant.calibrate import RANDOM, RANDOM_TOKENS, collect_importance

                importance[source] = (collect_importance(src, a.calib, n_tokens=a.calib_tokens) if source == "calib"
                                      else collect_importance(src, RANDOM, n_tokens=RANDOM_TOKENS))
            qts = None if method == "rtn" else quantize_all(src, method, G, importance.get(source))
            tq = time.perf_counter() - t0
            err.print(f"{method} G={G}: quantized in {tq:.0f} s")
            for k in todo:
                model = Transformer(src.config, weights_at(src, method, G, k, qts)).eval()
                r = kl_divergence(model_logits_fn(model), ids, ref)
                row = {"method": method, "group_size": G, "bits": k, "kl": r.kl_mean_estimate, "kl_bound": r.kl_mean,
                       "kl_median": r.kl_median, "kl_p99": r.kl_p99, "top1": r.top1_agreement, "ppl": r.ppl_cand,
                       "ppl_ratio": r.ppl_ratio, "quantize_s": tq}
                results.append(row)
                err.print(f"  k={k}: KL {row['kl']:.4f}  ppl {row['ppl']:.3f}")
                save()

    for G in groups:
        t = Table(title=f"KL divergence (nats) / perplexity vs fp32{' (dithered)' if a.dither else ''} "
                        f"(ppl {ref.ppl:.3f}); group size {G} "
                        f"(nonuniform: per-row LUT); ctx {a.ctx}, {ref.n_scored} tokens")
        t.add_column("bits", justify="right")
        for m in methods:
            t.add_column(m, justify="right")
        for k in bits:
            cells = []
            for m in methods:
                r = next((r for r in results if r["method"] == m and r["bits"] == k
                          and r["group_size"] == (0 if m == "nonuniform" else G)), None)
                cells.append("-" if r is None else f"{r['kl']:.4f} / {r['ppl']:.2f}")
            t.add_row(str(k), *cells)
        con.print(t)
    save()


if __name__ == "__main__":
    main()
