"""``bitdial profile sensitivity|device`` and ``bitdial plan``: profiling and budgeted mixed-precision plans.

Wired into the main app with ``register(app)`` (see :mod:`bitdial.cli.main`). The work lives in
:mod:`bitdial.planning`; this module only parses options and renders results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from bitdial.errors import BitdialError

profile_app = typer.Typer(no_args_is_help=True, help="Measure sensitivity (quality per module and width) or this "
                                                     "machine's speed, for `bitdial plan`.")

THREADS_HELP = "Threads for compute (default: 1 for profiling, to keep timings and the machine quiet)."


def _main():
    from bitdial.cli import main  # lazy: main imports this module's register()

    return main


def _threads(n: Optional[int]) -> int:
    """Torch and native-kernel threads (default 1: quiet, reproducible profiles)."""
    from bitdial.planning.device import kernel_threads
    from bitdial.runtime.engine import set_threads

    n = set_threads(n or 1)
    kernel_threads(n)
    return n


# ------------------------------------------------------------------------------ profile sensitivity
@profile_app.command("sensitivity")
def profile_sensitivity_cmd(
    artifact: Path = typer.Argument(..., help="The .bitdial artifact to profile."),
    calib: Path = typer.Option(..., "--calib", help="Calibration text (UTF-8) for the Fisher and input statistics."),
    output: Path = typer.Option(..., "--output", "-o", help="Profile JSON to write (atomically)."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens (forward + backward each)."),
    window: int = typer.Option(256, "--window", help="Tokens per calibration sample (one gradient per window)."),
    gt_text: Optional[Path] = typer.Option(None, "--gt-text", help="Text for the measured KL (default: --calib, "
                                                                  "after the calibration tokens)."),
    gt_ctx: int = typer.Option(128, "--gt-ctx", help="Tokens per ground-truth window."),
    gt_windows: int = typer.Option(2, "--gt-windows", help="Ground-truth windows (0 = no ground truth)."),
    gt_bits: str = typer.Option("2,3,4", "--gt-bits", help="Widths the ground truth measures: '2,3,4', '2-5' or 'all'."),
    gt_modules: Optional[int] = typer.Option(None, "--gt-modules", help="Measure a random sample of N modules (default: all)."),
    proxies: str = typer.Option("fisher,hessian", "--proxies", help="Proxies to compute: fisher, hessian."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings",
                                            help="Also plan embed_tokens/lm_head (default: pinned at their maximum)."),
    min_bits: int = typer.Option(2, "--min-bits", help="Lowest width considered."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the ground-truth module sample."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Per-module, per-width quality costs: Fisher-weighted error, output-error proxy, measured KL."""
    from bitdial.artifact import open_artifact
    from bitdial.planning.common import parse_bits_list
    from bitdial.planning.sensitivity import profile_sensitivity, save_profile

    m = _main()
    try:
        _threads(threads)
        art = open_artifact(artifact)
        prof = profile_sensitivity(
            art, calib, calib_tokens=calib_tokens, window=window,
            proxies=tuple(p.strip() for p in proxies.split(",") if p.strip()), gt_text=gt_text, gt_ctx=gt_ctx,
            gt_windows=gt_windows, gt_bits=parse_bits_list(gt_bits), gt_modules=gt_modules,
            include_embeddings=include_embeddings, min_bits=min_bits, seed=seed or 0, progress=not json_out)
        save_profile(prof, output)
    except (BitdialError, ValueError, FileNotFoundError) as e:
        m._fail(e)
    summary = {"output": str(output), "modules": len(prof["modules"]), "chosen_proxy": prof["chosen_proxy"],
               "correlation": prof["correlation"], "ground_truth": prof["ground_truth"], "seconds": prof["seconds"]}
    if json_out:
        m._emit_json(summary)
        return
    t = Table(title=f"sensitivity profile of {Path(artifact).name} -> {output}")
    t.add_column("proxy")
    widths = sorted({k for r in prof["correlation"].values() for k in r if k != "pooled"}, key=int)
    for w in widths:
        t.add_column(f"ρ @{w} bits", justify="right")
    t.add_column("ρ pooled", justify="right")
    t.add_column("chosen")
    for p, r in prof["correlation"].items():
        cells = ["-" if r.get(w) is None else f"{r[w]:.3f}" for w in widths]
        t.add_row(p, *cells, "-" if r.get("pooled") is None else f"{r['pooled']:.3f}",
                  "✓" if p == prof["chosen_proxy"] else "")
    if not prof["correlation"]:
        t.add_row(prof["chosen_proxy"], "(no ground truth)", "", "✓")
    m.out.print(t)
    m.err.print(f"[dim]{len(prof['modules'])} modules, Spearman ρ vs measured KL; {prof['seconds']:.0f} s[/]")


# ----------------------------------------------------------------------------------- profile device
@profile_app.command("device")
def profile_device_cmd(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Device JSON to write (default: this machine's "
                                                                       "profile, $BITDIAL_CACHE/device.json)."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Time this artifact's modules and model "
                                                                     "(default: the default model's shapes, random weights)."),
    bits: str = typer.Option("2-8", "--bits", help="Widths to time."),
    prefill_m: int = typer.Option(64, "--prefill-m", help="Tokens per prefill timing."),
    random_plans: int = typer.Option(10, "--random-plans", help="Random assignments to validate the latency model on."),
    name: str = typer.Option("this-machine", "--name", help="Name recorded in the profile."),
    force: bool = typer.Option(False, "--force", help="Measure even if the machine looks busy (load > 1.5)."),
    list_builtin: bool = typer.Option(False, "--list", help="List the shipped device estimates and exit."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the profile's summary as JSON on stdout."),
) -> None:
    """Time every module shape at every width on this machine and fit the per-token latency model."""
    import os

    from bitdial.planning.common import parse_bits_list
    from bitdial.planning.device import builtin_devices, default_device_path, load_device, profile_device, save_device

    m = _main()
    if list_builtin:
        rows = []
        for n, p in builtin_devices().items():
            d = load_device(p)
            rows.append({"name": n, "description": d.data.get("description"), "estimate": d.estimate,
                         "bandwidth_gbs": d.data.get("bandwidth_gbs")})
        if json_out:
            m._emit_json(rows)
        else:
            t = Table(title="shipped device profiles (estimates from published figures)")
            for c in ("name", "effective GB/s", "description"):
                t.add_column(c)
            for r in rows:
                t.add_row(r["name"], f"{r['bandwidth_gbs']}", r["description"])
            m.out.print(t)
        return
    try:
        n = _threads(threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > 1.5 and not force:
            raise BitdialError(f"the machine is busy (1-minute load {load:.2f} > 1.5): timings would be wrong. "
                               "Retry when it is idle, or pass --force")
        art = None
        if artifact is not None:
            from bitdial.artifact import open_artifact

            art = open_artifact(artifact)
        data = profile_device(art, bits=parse_bits_list(bits) or None, prefill_m=prefill_m,
                              random_plans=random_plans, name=name, progress=not json_out)
        data["load_average_at_start"] = round(load, 2)
        out_path = output or default_device_path()
        save_device(data, out_path)
    except (BitdialError, ValueError, FileNotFoundError) as e:
        m._fail(e)
    lat = data["latency"]
    summary = {"output": str(out_path), "backend": data["backend"], "threads": n, "bandwidth_gbs": data["bandwidth_gbs"],
               "latency_model": lat["model"], "c0_ms": lat["c0_ms"],
               "validation_median_abs_rel_error": lat["validation"]["median_abs_rel_error"],
               "uniform_decode_ms": lat["uniform_decode_ms"], "rapl": data["energy"]["rapl"]}
    if json_out:
        m._emit_json(summary)
        return
    t = Table(title=f"device profile -> {out_path} ({data['backend']} backend, {n} threads)")
    t.add_column("shape")
    bs = sorted({int(b) for r in lat["table"].values() for b in r})
    for b in bs:
        t.add_column(f"{b} bits", justify="right")
    for key, row in lat["table"].items():
        t.add_row(key, *[f"{row.get(str(b), float('nan')) * 1e3:.0f} µs" for b in bs])
    t.add_row("decode step", *[f"{lat['uniform_decode_ms'].get(str(b), float('nan')):.2f} ms" for b in bs])
    m.out.print(t)
    err = lat["validation"]["median_abs_rel_error"]
    m.err.print(f"[dim]read bandwidth {data['bandwidth_gbs']:.1f} GB/s; latency model '{lat['model']}' "
                f"(median abs error on random plans: table {_pct(err.get('table'))}, linear {_pct(err.get('linear'))}, "
                f"in-step {_pct(err.get('step'))}); "
                f"RAPL: {'yes' if data['energy']['rapl'].get('available') else data['energy']['rapl'].get('reason')}[/]")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------------------------- plan
def plan_cmd(
    artifact: Path = typer.Argument(..., help="The .bitdial artifact (plans are stored in it)."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Sensitivity profile (`bitdial profile sensitivity`)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Device profile file or built-in name (rpi5, "
                                         "jetson-orin-nano, snapdragon-8-gen-3, apple-m2); default: this machine's."),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="Budget: bits per weight over the planned modules (size-weighted)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Budget: weight bytes read per token, e.g. 60MB, 57MiB."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Budget: predicted decode ms per token (needs a device)."),
    energy_mj: Optional[float] = typer.Option(None, "--energy-mj", help="Budget: predicted mJ per token (needs a device)."),
    pin: list[str] = typer.Option([], "--pin", help="PATTERN=BITS: fix matching modules (repeatable; first match wins)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Store the plan in the artifact under this name."),
    proxy: Optional[str] = typer.Option(None, "--proxy", help="Cost to minimize: fisher, hessian or kl (default: the profile's choice)."),
    solver: str = typer.Option("auto", "--solver", help="auto (MILP when scipy is installed), milp, greedy."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Solve and show, do not store."),
    show: Optional[str] = typer.Option(None, "--show", help="Show a stored plan's per-layer table and exit."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="With --show or --name: write a bits heatmap image (needs the \\[plot] extra)."),
    list_plans: bool = typer.Option(False, "--list", help="List the artifact's stored plans and exit."),
    delete: Optional[str] = typer.Option(None, "--delete", help="Delete a stored plan and exit."),
    pareto: bool = typer.Option(False, "--pareto", help="Sweep --sweep average-bit budgets and write the frontier."),
    sweep: str = typer.Option("2,2.25,2.5,2.75,3,3.25,3.5,3.75,4,4.5,5,6", "--sweep", help="Average bits for --pareto."),
    pareto_out: Path = typer.Option(Path("pareto.json"), "--out", help="--pareto: frontier JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="--pareto: also plot the frontier (needs the \\[plot] extra)."),
    kl_text: Optional[Path] = typer.Option(None, "--kl-text", help="--pareto: text for the measured KL (default: the profile's sample)."),
    no_kl: bool = typer.Option(False, "--no-kl", help="--pareto: skip the KL measurements."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
) -> None:
    """Choose one width per module minimizing total sensitivity under every budget; store it by name."""
    from bitdial.artifact import open_artifact
    from bitdial.planning import planner as P

    m = _main()
    try:
        if list_plans:
            plans = P.load_plans(artifact)
            if json_out:
                m._emit_json({k: {kk: v[kk] for kk in ("budgets", "predicted", "created", "solver") if kk in v}
                              for k, v in plans.items()})
            else:
                t = Table(title=f"plans in {artifact.name}")
                for c in ("name", "budgets", "bits/weight", "MB/token", "pred. ms/token", "created"):
                    t.add_column(c)
                for k, v in plans.items():
                    pr = v.get("predicted", {})
                    t.add_row(k, ", ".join(f"{a}={b}" for a, b in (v.get("budgets") or {}).items()) or "-",
                              f"{pr.get('avg_bits', float('nan')):.3f}", f"{pr.get('memory_bytes', 0) / 1e6:.1f}",
                              "-" if pr.get("latency_ms") is None else f"{pr['latency_ms']:.2f}", str(v.get("created")))
                m.out.print(t)
            return
        if delete:
            P.delete_plan(artifact, delete)
            m.err.print(f"deleted plan {delete!r} from {artifact}")
            return
        if show:
            m.show_plan(artifact, show, heatmap, json_out)
            return
        if profile is None:
            raise BitdialError("--profile is required to make a plan (create one with `bitdial profile sensitivity`)")
        _threads(threads)
        from bitdial.planning.device import load_device
        from bitdial.planning.sensitivity import load_profile

        art = open_artifact(artifact)
        prof = load_profile(profile, art)
        budgets = P.Budgets.parse(avg_bits, memory, latency_ms, energy_mj)
        pins = P.parse_pins(pin)
        dev = None
        if device is not None or latency_ms is not None or energy_mj is not None:
            dev = load_device(device)
        else:
            from bitdial.planning.device import default_device_path

            if default_device_path().is_file():  # for predictions only; optional without latency/energy budgets
                try:
                    dev = load_device(None)
                except BitdialError as e:
                    m.err.print(f"[yellow]warning:[/] ignoring this machine's device profile: {e}")
        if pareto:
            return _pareto(m, art, prof, dev, pins, proxy, solver, sweep, pareto_out, plot, kl_text, no_kl, json_out)
        if not name and not dry_run:
            raise BitdialError("give --name NAME to store the plan (or --dry-run to only show it)")
        plan = P.make_plan(art, prof, budgets, name=name or "dry-run", device=dev, pins=pins, proxy=proxy,
                           solver=solver)
        art.close()
        if not dry_run:
            P.save_plan(artifact, plan)
    except (BitdialError, ValueError, FileNotFoundError) as e:
        m._fail(e)
    if json_out:
        m._emit_json(plan.to_json())
        return
    pr = plan.predicted
    if dry_run:
        m.out.print(_bits_summary(plan))
    else:
        from bitdial.planning.views import plan_table

        m.out.print(plan_table(artifact, plan.name))
        if heatmap:
            from bitdial.planning.views import plan_heatmap

            plan_heatmap(artifact, plan.name, heatmap)
    lat = f", {pr['latency_ms']:.2f} ms/token predicted on {pr['device']}" if pr.get("latency_ms") is not None else ""
    m.err.print(f"[dim]{'planned' if dry_run else 'stored plan ' + repr(plan.name)}: {pr['avg_bits']:.3f} bits/weight "
                f"({pr['bits_read_per_weight']:.3f} read with scales), {pr['memory_bytes'] / 1e6:.2f} MB/token{lat}; "
                f"{pr['proxy']} cost {pr['cost']:.4g} ({plan.solver})[/]")


def _bits_summary(plan) -> Table:
    from collections import Counter

    c = Counter(plan.bits.values())
    t = Table(title=f"plan {plan.name!r}: modules per width")
    for b in sorted(c):
        t.add_column(f"{b} bits", justify="right")
    t.add_row(*[str(c[b]) for b in sorted(c)])
    return t


def _pareto(m, art, prof, dev, pins, proxy, solver, sweep, out_path, plot, kl_text, no_kl, json_out) -> None:
    from bitdial.planning.pareto import pareto_sweep, probe_from_profile, write_pareto, write_pareto_plot

    if plot is not None:
        from bitdial.planning.views import require_matplotlib

        require_matplotlib()  # fail before the sweep, not after
    budgets = [float(x) for x in sweep.split(",") if x.strip()]
    probe = None if no_kl else probe_from_profile(art, prof, text=kl_text, progress=not json_out)
    maxb = max(int(v["max_bits"]) for v in prof.modules.values())
    res = pareto_sweep(art, prof, budgets, device=dev, pins=pins, proxy=proxy, solver=solver, probe=probe,
                       uniform_bits=list(range(2, maxb + 1)), progress=not json_out)
    write_pareto(res, out_path)
    if plot is not None:
        write_pareto_plot(res, plot)
    if json_out:
        m._emit_json({k: v for k, v in res.items() if k != "points"} | {
            "points": [{k: v for k, v in p.items() if k != "bits"} for p in res["points"]], "output": str(out_path)})
        return
    t = Table(title=f"frontier -> {out_path}" + (f", {plot}" if plot else ""))
    for c in ("kind", "bits/weight", "MB/token", "pred. ms/token", "KL (nats/token)", ""):
        t.add_column(c, justify="right")
    for p in res["points"]:
        t.add_row(p["kind"], f"{p['avg_bits']:.3f}", f"{p['memory_bytes'] / 1e6:.1f}",
                  "-" if p.get("predicted_latency_ms") is None else f"{p['predicted_latency_ms']:.2f}",
                  "-" if "kl_mean" not in p else f"{p['kl_mean']:.5f}", "dominated" if p.get("dominated") else "")
    m.out.print(t)


def register(app: typer.Typer) -> None:
    """Add ``profile`` (sensitivity, device) and ``plan`` to the ``bitdial`` app."""
    app.add_typer(profile_app, name="profile")
    app.command("plan")(plan_cmd)
