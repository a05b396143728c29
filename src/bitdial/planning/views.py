"""Views of a stored plan: a per-layer table of bits (rich) and a module-type × layer heatmap (matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bitdial.errors import BitdialError
from bitdial.planning.common import module_layer, module_type

log = logging.getLogger(__name__)

__all__ = ["plan_table", "plan_heatmap", "plan_grid", "require_matplotlib"]

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _open(artifact):
    from bitdial.artifact import open_artifact
    from bitdial.artifact.reader import Artifact

    return artifact if isinstance(artifact, Artifact) else open_artifact(artifact)


def plan_grid(artifact, name: str) -> tuple[list[str], list[int], dict[tuple[str, int], int], dict[str, int], dict[str, Any]]:
    """``(types, layers, {(type, layer): bits}, {other module: bits}, stored plan)`` of a plan."""
    from bitdial.planning.planner import load_plans, plan_bits

    art = _open(artifact)
    bits = plan_bits(art, name)
    stored = load_plans(art)[name]
    grid: dict[tuple[str, int], int] = {}
    other: dict[str, int] = {}
    for n, b in bits.items():
        layer = module_layer(n)
        if layer is None:
            other[n] = b
        else:
            grid[(module_type(n), layer)] = b
    types = [t for t in TYPES if any(k[0] == t for k in grid)]
    types += sorted({k[0] for k in grid} - set(types))
    layers = sorted({k[1] for k in grid})
    return types, layers, grid, other, stored


_STYLE = {2: "bold red", 3: "red", 4: "yellow", 5: "green", 6: "cyan", 7: "blue", 8: "bold blue"}


def plan_table(artifact, name: str):
    """A rich Table: one row per layer, one column per module type, cells = bits; plus a summary caption."""
    from rich.table import Table

    types, layers, grid, other, stored = plan_grid(artifact, name)
    pred = stored.get("predicted") or {}
    cap = []
    if "avg_bits" in pred:
        cap.append(f"{pred['avg_bits']:.3f} bits/weight (planned modules)")
    if "memory_bytes" in pred:
        cap.append(f"{pred['memory_bytes'] / 1e6:.1f} MB read/token")
    if "latency_ms" in pred:
        cap.append(f"{pred['latency_ms']:.2f} ms/token predicted on {pred.get('device')}")
    if other:
        cap.append(", ".join(f"{n}={b}" for n, b in other.items()))
    budgets = stored.get("budgets") or {}
    title = f"plan {name!r}" + (" (" + ", ".join(f"{k}={v}" for k, v in budgets.items()) + ")" if budgets else "")
    t = Table(title=title, caption="; ".join(cap) or None)
    t.add_column("layer", justify="right")
    for ty in types:
        t.add_column(ty.replace("_proj", ""), justify="center")
    t.add_column("mean", justify="right")
    for layer in layers:
        row = [grid.get((ty, layer)) for ty in types]
        vals = [v for v in row if v is not None]
        t.add_row(str(layer), *[("-" if v is None else f"[{_STYLE.get(v, '')}]{v}[/]") for v in row],
                  f"{sum(vals) / len(vals):.2f}" if vals else "-")
    return t


def require_matplotlib():
    """Import matplotlib (Agg backend) or raise a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BitdialError("plots need matplotlib: pip install 'bitdial[plot]' (or pip install matplotlib)") from None
    return plt


def plan_heatmap(artifact, name: str, path: str | Path) -> Path:
    """Write an image of the plan's bits: module types (rows) × layers (columns). Returns the path."""
    plt = require_matplotlib()
    import numpy as np

    types, layers, grid, other, stored = plan_grid(artifact, name)
    if not layers:
        raise BitdialError(f"plan {name!r} has no per-layer modules to draw")
    M = np.full((len(types), len(layers)), np.nan)
    for (ty, layer), b in grid.items():
        M[types.index(ty), layers.index(layer)] = b
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 0.45 * len(types) + 1.6))
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=np.nanmin(M), vmax=np.nanmax(M), interpolation="nearest")
    ax.set_yticks(range(len(types)), [t.replace("_proj", "") for t in types])
    step = max(1, len(layers) // 15)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("layer")
    if len(layers) * len(types) <= 400:
        for i in range(len(types)):
            for j in range(len(layers)):
                if not np.isnan(M[i, j]):
                    ax.text(j, i, str(int(M[i, j])), ha="center", va="center", fontsize=7, color="w")
    pred = stored.get("predicted") or {}
    sub = f" — {pred['avg_bits']:.2f} bits/weight" if "avg_bits" in pred else ""
    ax.set_title(f"plan {name}{sub}")
    fig.colorbar(im, ax=ax, label="bits")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)
    return path
