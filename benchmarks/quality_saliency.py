"""KL divergence of variants of the clipping search's saliency weighting (docs/bitplanes.md, section 8).

    python benchmarks/quality_saliency.py --group-size 128 --bits 3,5,7,8 --variant sal=2:maxk=5 \\
        [--windows 32] [--text FILE] [--rtn | --nested] [--out benchmarks/results/quality_saliency.json]

The setting of `benchmarks/quality.py --dither 1`: SmolLM2-135M with its linear weights moved off the Q4_1 grid
(seed ``--dither``, default 1), WikiText-2 validation, context 512, KL against that model. Every linear is quantized at B = 8 with
the multi-view search (`quantize_uniform(clip="search")`) and one search variant, then read at each k:

* ``sal=A``: the squared error of every weight counts ``1 + A (w / rms_g)^2`` in every view's error
  (``quantize_uniform(saliency=A)``; A = 0 is the plain squared error);
* ``:maxk=K``: the saliency weights only in the errors of views k <= K, plain squared error above;
* ``:wK=X``: view K's weight in the objective is X instead of 1.5 ** (8 - K);
* ``:asal=A``: saliency A on the attention projections (``uniform.SALIENCY_PATTERN``) instead of ``sal``'s value
  (``sal=0:asal=2`` is the artifact's default at G >= 128, ``default_saliency_map``);
* ``:emax=X``: only the per-end expansions up to X among the search's candidates (default all, up to 1.125);
* ``:cap=X[:capk=K]``: a candidate range whose error at a view k >= K (default 7) is more than X times the
  best candidate's at that view is left out (the group's views above K-1 bits lose at most a factor X).

``--rtn`` scores separate k-bit RTN instead, ``--nested`` the plain nested views (``clip="none"``); ``--text`` scores another text than WikiText-2 validation
(a held-out check of choices made on WikiText), ``--dither S`` another seed of the off-grid noise (another
model of the same kind). Prints one line per k and appends rows to ``--out`` (JSON list).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy)
import torch
from rich.console import Console

import bitdial.quant.uniform as U
from bitdial.artifact.writer import match_pattern
from bitdial.eval import kl_divergence, load_or_build_reference, model_logits_fn
from bitdial.loading import load_model
from bitdial.model.llama import Transformer
from quality import DATA, dither_off_grid, reference_identity

ROOT = Path(__file__).resolve().parent


def parse_variant(spec: str) -> tuple[float, int, dict[int, float], float, int, float | None, float]:
    """(saliency, maxk, view weights, cap, capk, attention saliency or None, emax) of a ``--variant`` spec."""
    opts = dict(x.split("=", 1) for x in spec.split(":") if x)
    known = ("sal", "asal", "maxk", "cap", "capk", "emax")
    unknown = [k for k in opts if k not in known and not (k[:1] == "w" and k[1:].isdigit())]
    if unknown:
        raise SystemExit(f"--variant {spec!r}: unknown keys {unknown} (use sal=A, asal=A, maxk=K, wK=X, cap=X, capk=K, emax=X)")
    weights = U.default_bit_weights(8)
    for k, v in opts.items():
        if k[:1] == "w" and k[1:].isdigit():
            weights[int(k[1:])] = float(v)
    return (float(opts.get("sal", 0.0)), int(opts.get("maxk", 8)), weights, float(opts.get("cap", "inf")),
            int(opts.get("capk", 7)), float(opts["asal"]) if "asal" in opts else None, float(opts.get("emax", "inf")))


def search_ranges(alpha: float, maxk: int, cap: float = float("inf"), capk: int = 7, library=U._search_ranges,
                  emax: float = float("inf")):
    """A replacement for ``uniform._search_ranges`` with saliency on views <= maxk only and, with a finite
    ``cap``, no candidate whose relative error at a view >= capk exceeds it (relative objective); with every
    view salient and no cap it is the library's search (``library``) with saliency weights."""

    def ranges(Wg, wgt, max_bits, bit_weights, objective, factors=U.CLIP_CANDIDATES):
        factors = tuple((a, b) for a, b in factors if max(a, b) <= emax)
        if maxk >= max_bits and cap == float("inf"):
            return library(Wg, U._saliency_weights(Wg, wgt, alpha) if alpha else wgt, max_bits, bit_weights,
                           objective, factors)
        views = sorted(bit_weights)
        bw = torch.tensor([float(bit_weights[k]) for k in views]).view(1, -1, 1)  # [1, V, 1]
        sw = U._saliency_weights(Wg, wgt, alpha) if alpha else wgt  # [M, G]
        low, high = [k for k in views if k <= maxk], [k for k in views if k > maxk]
        lo_out, hi_out = torch.empty(Wg.shape[0]), torch.empty(Wg.shape[0])
        for a in range(0, Wg.shape[0], U._SEARCH_GROUPS):
            b = min(Wg.shape[0], a + U._SEARCH_GROUPS)
            W_ = Wg[a:b]
            LO, HI = U.clip_candidates(W_.min(dim=1).values, W_.max(dim=1).values, factors)  # [C, m]
            parts = []
            if low:
                parts.append(U.view_errors(W_, None if sw is None else sw[a:b], LO, HI, max_bits, low))
            if high:
                parts.append(U.view_errors(W_, None if wgt is None else wgt[a:b], LO, HI, max_bits, high))
            err = torch.cat(parts, dim=1)  # [C, V, m], views in sorted order
            err = err / (err.min(dim=0, keepdim=True).values + 1e-30)
            total = (err * bw).sum(dim=1)  # [C, m]
            if cap < float("inf"):  # candidates whose relative error at a view >= capk exceeds cap are out
                hv = torch.tensor([k >= capk for k in views])
                over = (err[:, hv, :] > cap).any(dim=1)  # [C, m]
                over &= ~over.all(dim=0, keepdim=True)  # a group with no candidate under the cap: unconstrained
                total = total.masked_fill(over, float("inf"))
            best = total.argmin(dim=0)  # [m]
            idx = torch.arange(b - a)
            lo_out[a:b], hi_out[a:b] = LO[best, idx], HI[best, idx]
        return lo_out, hi_out

    return ranges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--variant", default="sal=0:asal=2", help="sal=A[:asal=A][:maxk=K][:wK=X ...][:cap=X[:capk=K]]")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--text", default=None, help="text to score (default: WikiText-2 validation)")
    ap.add_argument("--dither", type=int, default=1, help="seed of the off-grid noise (quality.py --dither; 0: the model as it is)")
    baseline = ap.add_mutually_exclusive_group()
    baseline.add_argument("--rtn", action="store_true", help="score separate k-bit RTN instead of the search")
    baseline.add_argument("--nested", action="store_true", help="score the plain nested views (clip none) instead")
    ap.add_argument("--out", default=str(ROOT / "results" / "quality_saliency.json"))
    a = ap.parse_args()
    con = Console()
    alpha, maxk, weights, cap, capk, attn_alpha, emax = parse_variant(a.variant)
    library = U._search_ranges

    src = load_model("default")
    src.tensors = dict(src.tensors)
    if a.dither:  # 0: the model as it is, on its Q4_1 grid
        dither_off_grid(src, a.dither)
    text = Path(a.text) if a.text else DATA / "wikitext-2-raw" / "wiki.valid.raw"
    ids = src.tokenizer.encode(text.read_text(encoding="utf-8"))
    ident = reference_identity(a.dither) + ("" if a.text is None else f"-{text.stem}")
    ref = load_or_build_reference(model_logits_fn(Transformer(src.config, src.tensors).eval()), ids, ctx=512,
                                  max_windows=a.windows, top_k=64, identity=ident, tail_samples=32)
    t0 = time.perf_counter()
    qts = {}
    for n in [] if a.rtn else src.config.linear_names():
        al = attn_alpha if attn_alpha is not None and match_pattern(U.SALIENCY_PATTERN, n) else alpha
        U._search_ranges = search_ranges(al, maxk, cap, capk, library, emax)
        qts[n] = U.quantize_uniform(src.tensors[f"{n}.weight"], 8, a.group_size,
                                    clip="none" if a.nested else "search", saliency=0, bit_weights=weights)
    tq = time.perf_counter() - t0
    name = "rtn" if a.rtn else "nested" if a.nested else a.variant
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for k in (int(b) for b in a.bits.split(",")):
        w = dict(src.tensors)
        for n in src.config.linear_names():
            W = src.tensors[f"{n}.weight"]
            w[f"{n}.weight"] = U.quantize_rtn(W, k, a.group_size) if a.rtn else qts[n].dequantize(k)
        r = kl_divergence(model_logits_fn(Transformer(src.config, w).eval()), ids, ref)
        rows.append({"variant": name, "group_size": a.group_size, "bits": k,
                     "kl": r.kl_mean_estimate, "ppl": r.ppl_cand, "windows": a.windows, "text": text.name,
                     "dither": a.dither,
                     "quantize_s": tq})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        con.print(f"{name}  G={a.group_size}  k={k}  {text.name}: KL {r.kl_mean_estimate:.4f}  "
                  f"ppl {r.ppl_cand:.2f}")


if __name__ == "__main__":
    main()
