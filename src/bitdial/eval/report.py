"""Render evaluation results: rich tables (printed to a Console you pass in) and JSON-able dicts.

Every function accepts one result or a mapping ``{label: result}`` (e.g. one row per precision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

from rich.console import Console
from rich.table import Table

from bitdial.eval.kld import KLResult
from bitdial.eval.perplexity import PerplexityResult

Result = Union[PerplexityResult, KLResult]


def _rows(results: Result | Mapping[str, Result], kind: type) -> dict[str, Any]:
    if isinstance(results, (PerplexityResult, KLResult)):
        results = {"": results}
    if not isinstance(results, Mapping):
        raise TypeError(f"expected a {kind.__name__} or a mapping of label -> {kind.__name__}, "
                        f"got {type(results).__name__}")
    for label, r in results.items():
        if not isinstance(r, kind):
            raise TypeError(f"{label!r}: expected {kind.__name__}, got {type(r).__name__}")
    return dict(results)


def _f(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def perplexity_table(results: PerplexityResult | Mapping[str, PerplexityResult], title: str = "Perplexity") -> Table:
    """A table with one row per result: ppl +- stderr, mean NLL, tokens, windows, plan."""
    rows = _rows(results, PerplexityResult)
    table = Table(title=title)
    if any(rows):
        table.add_column("model")
    for name in ("PPL", "± stderr", "NLL", "tokens", "windows", "ctx", "stride", "convention"):
        table.add_column(name, justify="left" if name == "convention" else "right")
    for label, r in rows.items():
        cells = [_f(r.ppl, 4), _f(r.ppl_stderr, 4), _f(r.nll_mean, 5), str(r.n_scored), str(r.n_windows),
                 str(r.ctx), str(r.stride), r.convention]
        table.add_row(*([label] if any(rows) else []), *cells)
    return table


def kl_table(results: KLResult | Mapping[str, KLResult], title: str = "KL divergence vs reference") -> Table:
    """A table with one row per candidate: KL statistics, top-1 agreement and perplexities."""
    rows = _rows(results, KLResult)
    with_est = any(r.kl_mean_estimate is not None for r in rows.values())
    table = Table(title=title, caption=_kl_caption(rows, with_est))
    if any(rows):
        table.add_column("candidate")
    names = ["KL mean", "KL median", "KL p99", "KL max"] + (["KL est."] if with_est else [])
    for name in names + ["top-1 agree", "PPL", "PPL ref", "PPL ratio", "tokens"]:
        table.add_column(name, justify="right")
    for label, r in rows.items():
        cells = [_f(r.kl_mean, 5), _f(r.kl_median, 5), _f(r.kl_p99, 4), _f(r.kl_max, 4)]
        if with_est:
            cells.append(_f(r.kl_mean_estimate, 5))
        cells += [f"{100 * r.top1_agreement:.2f}%", _f(r.ppl_cand, 4), _f(r.ppl_ref, 4), _f(r.ppl_ratio, 4),
                  str(r.n_tokens)]
        table.add_row(*([label] if any(rows) else []), *cells)
    return table


def _kl_caption(rows: dict[str, KLResult], with_est: bool) -> str:
    ks = sorted({r.top_k for r in rows.values()})
    k = "/".join(map(str, ks)) or "?"
    cap = f"KL in nats; mean..max: top-{k} + rest lower bound of the full-vocabulary KL"
    if with_est:
        cap += "; KL est.: tail-sampled unbiased estimate of the full mean KL"
    return cap


def render_perplexity(console: Console, results: PerplexityResult | Mapping[str, PerplexityResult],
                      title: str = "Perplexity") -> None:
    """Print :func:`perplexity_table` to ``console``."""
    console.print(perplexity_table(results, title))


def render_kl(console: Console, results: KLResult | Mapping[str, KLResult],
              title: str = "KL divergence vs reference") -> None:
    """Print :func:`kl_table` to ``console``."""
    console.print(kl_table(results, title))


def render(console: Console, results: Result | Mapping[str, Result], title: str | None = None) -> None:
    """Print a perplexity or KL table, whichever the results are."""
    first = results if isinstance(results, (PerplexityResult, KLResult)) else next(iter(results.values()), None)
    if isinstance(first, KLResult):
        render_kl(console, results, title or "KL divergence vs reference")
    else:
        render_perplexity(console, results, title or "Perplexity")


def to_jsonable(results: Result | Mapping[str, Result]) -> dict[str, Any]:
    """``result.to_dict()`` for one result, ``{label: result.to_dict()}`` for a mapping (infinities as strings)."""
    if isinstance(results, (PerplexityResult, KLResult)):
        return _clean(results.to_dict())
    if not isinstance(results, Mapping):
        raise TypeError(f"expected a result or a mapping of results, got {type(results).__name__}")
    return {str(k): _clean(v.to_dict()) for k, v in results.items()}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON has no inf/nan: spell them as strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out
