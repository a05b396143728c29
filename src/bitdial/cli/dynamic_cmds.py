"""``bitdial calibrate``: dynamic per-token precision policies (DP-LLM), stored in the artifact.

Wired into the main app with ``register(app)``. The work lives in :mod:`bitdial.policies`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from bitdial.errors import BitdialError


def _main():
    from bitdial.cli import main  # lazy: main imports this module's register()

    return main


def calibrate_cmd(
    artifact: Path = typer.Argument(..., help="The .bitdial artifact (policies are stored in it)."),
    targets: str = typer.Option("2.5,3,3.5,4", "--targets", help="Target average bits: '2.5,3,3.5' or a range "
                                                                  "'2.5:4.5:0.25'."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (UTF-8); first half trains the "
                                                               "precisions, second half fits thresholds."),
    memory_bits: float = typer.Option(5.0, "--memory-bits", help="Memory budget: average bits per weight of the "
                                                                 "planes kept (per-module maxima by the planner)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Sensitivity profile for the memory maxima "
                                           "(`bitdial profile sensitivity`); without it every module keeps "
                                           "floor(--memory-bits)."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens in all."),
    window: int = typer.Option(256, "--window", help="Tokens per calibration window."),
    steps: int = typer.Option(48, "--steps", help="Optimizer steps per target (one window each)."),
    lr: float = typer.Option(0.05, "--lr", help="AdamW learning rate of the precision logits."),
    alpha: float = typer.Option(10.0, "--alpha", help="Weight of the (mean precision - target)^2 penalty."),
    estimator: str = typer.Option("auto", "--estimator", help="auto (linear where R^2 >= --r2-min, else pca), "
                                                              "linear, jl (random projection) or pca."),
    proj_dim: int = typer.Option(32, "--proj-dim", help="Rows k of a projection estimator."),
    r2_min: float = typer.Option(0.9, "--r2-min", help="Use the linear estimator where its R^2 reaches this."),
    loss: str = typer.Option("kl", "--loss", help="Training loss: kl (KL divergence from the artifact at its stored "
                                                   "maximum) or ce (next-token cross-entropy, as DP-LLM)."),
    mix: str = typer.Option("select", "--mix", help="Training mixture: soft (r W_l x + (1 - r) W_h x, as DP-LLM) or "
                                                  "select (the tokens with the largest error at the high width, "
                                                  "as decoding does; docs/dynamic.md)."),
    init: str = typer.Option("auto", "--init", help="Start every p_i at the target ('target', as DP-LLM), at the "
                                                    "static plan's width for the target ('plan', needs --profile), "
                                                    "or 'auto': plan with --profile, else target."),
    list_: bool = typer.Option(False, "--list", help="List the stored dynamic policies and exit."),
    delete: Optional[float] = typer.Option(None, "--delete", help="Delete the policy of this target and exit."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads (default: all cores)."),
    seed: int = typer.Option(0, "--seed", help="Seed (random projections)."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
) -> None:
    """Learn dynamic per-token precision policies for target average bits and store them in the artifact.

    Then run them with `generate/chat/eval --dynamic TARGET`.
    """
    from bitdial.policies import delete_policy, stored_policies
    from bitdial.runtime.engine import set_threads

    m = _main()
    try:
        if list_:
            return _list(artifact, stored_policies(artifact), json_out)
        if delete is not None:
            delete_policy(artifact, delete)
            m.err.print(f"deleted the {delete:g}-bit policy from {artifact.name}")
            return
        if calib is None:
            raise BitdialError("--calib FILE is required: calibration text, e.g. a public-domain book")
        from bitdial.policies.calibrate import CalibSettings, calibrate, parse_targets

        set_threads(threads)
        s = CalibSettings(memory_bits=memory_bits, calib_tokens=calib_tokens, window=window, steps=steps, lr=lr,
                          alpha=alpha, estimator=estimator, proj_dim=proj_dim, r2_min=r2_min, seed=seed, init=init,
                          loss=loss, mix=mix)
        prof = None
        if profile is not None:
            from bitdial.artifact import open_artifact
            from bitdial.planning import load_profile

            prof = load_profile(profile, open_artifact(artifact))
        pols = calibrate(artifact, parse_targets(targets), calib, s, profile=prof, progress=not json_out)
    except (BitdialError, ValueError) as e:
        m._fail(e)
    _list(artifact, {p.name: p.to_json() for p in pols}, json_out, title=f"stored in {artifact.name}")


def _list(artifact: Path, pols: dict, json_out: bool, title: str | None = None) -> None:
    m = _main()
    rows = []
    for name, d in sorted(pols.items(), key=lambda kv: kv[1]["target"]):
        mods = d["modules"].values()
        fit = [r["fit"] for r in mods if r.get("fit")]
        held = [f["rate_high_heldout"] - f["rate_high_target"] for f in fit if "rate_high_heldout" in f]
        sp = sorted(f["spearman_heldout"] for f in fit if f.get("spearman_heldout") == f.get("spearman_heldout"))
        est = {}
        for r in mods:
            est[r["estimator"]] = est.get(r["estimator"], 0) + 1
        rows.append({"name": name, "target": d["target"], "memory_bits": d.get("memory_bits"), "estimators": est,
                     "heldout_rate_error_mean_abs": sum(abs(h) for h in held) / len(held) if held else None,
                     "heldout_spearman_median": sp[len(sp) // 2] if sp else None,
                     "train": d.get("info", {}).get("train")})
    if json_out:
        m._emit_json(rows)
        return
    t = Table(title=title or f"dynamic policies in {artifact.name}")
    for c in ("name", "target", "memory bits", "estimators", "held-out |rate err|", "held-out Spearman"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], f"{r['target']:g}", f"{r['memory_bits']:g}" if r["memory_bits"] else "-",
                  ", ".join(f"{k} {v}" for k, v in sorted(r["estimators"].items())),
                  f"{r['heldout_rate_error_mean_abs']:.3f}" if r["heldout_rate_error_mean_abs"] is not None else "-",
                  f"{r['heldout_spearman_median']:.3f}" if r["heldout_spearman_median"] is not None else "-")
    m.out.print(t)


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the ``bitdial`` app."""
    app.command("calibrate")(calibrate_cmd)
