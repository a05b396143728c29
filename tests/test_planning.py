"""Sensitivity proxies against brute force, the planner against exhaustive search, budgets, pins, plan storage,
profile/device file validation, and the CLI — on a tiny random model (real tokenizer, full vocabulary)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from bitdial.artifact import open_artifact
from bitdial.errors import BudgetError
from bitdial.planning import (Budgets, PlanError, ProfileError, builtin_devices, delete_plan, load_device, load_plans,
                              load_profile, make_plan, plan_bits, plan_table, save_plan, save_profile)
from bitdial.planning.common import artifact_identity, parse_size, spearman
from bitdial.planning.planner import Problem, build_problem, solve, solve_exhaustive, solve_greedy, solve_milp
from bitdial.planning.sensitivity import (calibration_windows, collect_statistics, dense_model, profile_sensitivity,
                                          proxy_costs)
from bitdial.runtime.anyprec import build_model
from conftest import tiny_artifact



@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, smol):
    return tiny_artifact(tmp_path_factory.mktemp("plan") / "tiny.bitdial", smol.tokenizer)


@pytest.fixture(scope="module")
def tiny_profile(tiny_path, calib_text, tmp_path_factory):
    art = open_artifact(tiny_path)
    prof = profile_sensitivity(art, calib_text, calib_tokens=256, window=64, gt_ctx=40, gt_windows=1, gt_bits=[2, 3],
                               cache_dir=tmp_path_factory.mktemp("kld"))
    p = tmp_path_factory.mktemp("prof") / "tiny.profile.json"
    save_profile(prof, p)
    return p


# ---- proxies against brute force ------------------------------------------------------------------------
def _inputs(net, windows, module):
    """Every input row the module sees over the windows: [tokens, K]."""
    xs = []
    h = net.linears()[module].register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.no_grad():
        for w in windows:
            net.setup_cache(1, len(w))
            net(w[None], 0)
    h.remove()
    return torch.cat(xs)


def test_hessian_proxy_is_the_exact_output_error(tiny_path, calib_text):
    art = open_artifact(tiny_path)
    wins = calibration_windows(art.tokenizer, calib_text, 200, 64)
    mods = ["layers.0.self_attn.k_proj", "layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]
    stats = collect_statistics(dense_model(art), wins, mods, fisher=False, hessian=True)
    costs = proxy_costs(art, mods, stats, {m: [2, 3, 8] for m in mods})["hessian"]
    for m in mods:
        X = _inputs(dense_model(art), wins, m).double()  # [n, K]
        qt = art.qtensor(m)
        for b in (2, 3):
            dW = (qt.dequantize(b) - qt.dequantize(8)).double()  # [N, K]
            exact = float(((X @ dW.T) ** 2).sum(1).mean())  # mean over inputs of ||ΔW x||²
            assert costs[m][b] == pytest.approx(exact, rel=1e-4)
        assert costs[m][8] == 0.0


def test_fisher_matches_per_sample_gradients(tiny_path, calib_text):
    art = open_artifact(tiny_path)
    wins = calibration_windows(art.tokenizer, calib_text, 128, 64)
    mods = ["layers.0.self_attn.q_proj", "layers.1.mlp.gate_proj"]
    stats = collect_statistics(dense_model(art), wins, mods, fisher=True, hessian=False)
    for m in mods:
        net = dense_model(art)
        W = net.linears()[m].weight
        W.requires_grad_(True)
        F = torch.zeros_like(W)
        for w in wins:
            net.max_seq = net.max_batch = 0
            net.setup_cache(1, len(w))
            logits = net(w[None], 0)[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")
            (g,) = torch.autograd.grad(nll, W)
            F += g ** 2
        F /= len(wins)
        torch.testing.assert_close(stats["fisher"][m], F, rtol=1e-4, atol=1e-10)
    costs = proxy_costs(art, mods, stats, {m: [2, 8] for m in mods})["fisher"]
    m = mods[0]
    qt = art.qtensor(m)
    d = qt.dequantize(2) - qt.dequantize(8)
    want = 0.5 * float((stats["fisher"][m].double() * d.double() ** 2).sum()) / stats["tokens_per_window"]
    assert costs[m][2] == pytest.approx(want, rel=1e-9) and costs[m][8] == 0.0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_probe_with_cached_prefix_equals_full_evaluation(tiny_path, calib_text, tmp_path):
    from bitdial.eval import kl_divergence, model_logits_fn
    from bitdial.planning.probe import KLProbe
    from bitdial.planning.sensitivity import text_ids

    art = open_artifact(tiny_path)
    ids = text_ids(art.tokenizer, calib_text, 96)
    probe = KLProbe(art, ids, ctx=48, n_windows=2, cache_dir=tmp_path)
    for bits in ({"layers.1.mlp.down_proj": 2}, {"layers.0.self_attn.v_proj": 3, "layers.1.mlp.up_proj": 2},
                 {"embed_tokens": 4}):
        fast = probe.kl(bits)
        full = kl_divergence(model_logits_fn(build_model(art, bits)), probe.ids, probe.reference, progress=False)
        assert fast == pytest.approx(full.kl_mean, rel=1e-4, abs=1e-7)
    assert probe.kl({}) == pytest.approx(0.0, abs=1e-9)


# ---- the profile file -----------------------------------------------------------------------------------
def test_profile_contents(tiny_profile, tiny_path):
    art = open_artifact(tiny_path)
    prof = load_profile(tiny_profile, art)
    d = prof.data
    assert d["schema_version"] == 1 and d["artifact"]["header_sha256"] == artifact_identity(art)["header_sha256"]
    assert set(prof.modules) == set(art.config.linear_names()) and "embed_tokens" in prof.fixed
    assert d["chosen_proxy"] in ("fisher", "hessian")
    assert set(d["correlation"]["fisher"]) == {"2", "3", "pooled"}
    for n, m in prof.modules.items():
        assert m["bits"] == list(range(2, 9)) and set(m["kl"]) == {"2", "3"}
        assert m["bytes"]["2"] == art.qtensor(n).bytes_read(2)
        f = [m["fisher"][str(b)] for b in m["bits"]]
        assert f[-1] == 0.0 and f[0] > f[3] > 0  # error shrinks with bits
    # pooled correlation of the chosen proxy with the measured KL is strongly positive on this model
    assert d["correlation"][d["chosen_proxy"]]["pooled"] > 0.8


def _write(p: Path, obj) -> Path:
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_corrupt_profiles_are_rejected(tiny_profile, tmp_path, smol):
    good = json.loads(Path(tiny_profile).read_text())
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(_write(tmp_path / "a.json", Path(tiny_profile).read_text()[:500]))
    with pytest.raises(ProfileError, match="not a bitdial sensitivity profile"):
        load_profile(_write(tmp_path / "b.json", {"schema": "bitdial-device-profile"}))
    with pytest.raises(ProfileError, match="schema version 2.*upgrade"):
        load_profile(_write(tmp_path / "c.json", dict(good, schema_version=2)))
    bad = json.loads(json.dumps(good))
    del bad["modules"]["layers.0.mlp.up_proj"]["fisher"]["3"]
    with pytest.raises(ProfileError, match="layers.0.mlp.up_proj"):
        load_profile(_write(tmp_path / "d.json", bad))
    bad = json.loads(json.dumps(good))
    bad["modules"]["layers.1.mlp.up_proj"]["hessian"]["2"] = -1.0
    with pytest.raises(ProfileError, match="hessian cost at 2 bits"):
        load_profile(_write(tmp_path / "e.json", bad))
    with pytest.raises(ProfileError, match="chosen proxy"):
        load_profile(_write(tmp_path / "f.json", dict(good, chosen_proxy="magic")))
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.json")
    other = open_artifact(tiny_artifact(tmp_path / "other.bitdial", smol.tokenizer, seed=1))
    with pytest.raises(ProfileError, match="re-run `bitdial profile sensitivity` on this artifact"):
        load_profile(tiny_profile, other)


# ---- the solver -------------------------------------------------------------------------------------------
def _random_problem(seed: int, n_mod: int = 6, widths=(2, 3, 4), budgets=("avg_bits", "memory")) -> Problem:
    rng = random.Random(seed)
    mods = [f"m{i}" for i in range(n_mod)]
    opts = {m: list(widths) for m in mods}
    cost, res, n_w = {}, {"avg_bits": {}, "memory": {}, "latency_ms": {}}, {}
    for m in mods:
        n = n_w[m] = rng.randint(1, 9) * 100
        s = rng.uniform(0.1, 5.0)
        cost[m] = {b: s * 4.0 ** (-b) * rng.uniform(0.7, 1.3) for b in widths}
        res["avg_bits"][m] = {b: float(n * b) for b in widths}
        res["memory"][m] = {b: n * b / 8 + 16 for b in widths}
        res["latency_ms"][m] = {b: rng.uniform(0.5, 1.0) + 0.1 * b for b in widths}
    p = Problem(modules=mods, options=opts, cost=cost, res=res, fixed={"memory": 100.0, "latency_ms": 1.0},
                scale={"avg_bits": 1.0 / sum(n_w.values())})
    for j in budgets:
        lo, hi = p.min_usage(j), p.fixed.get(j, 0.0) + sum(max(res[j][m].values()) for m in mods)
        p.limits[j] = lo + rng.uniform(0.15, 0.85) * (hi - lo)
    return p


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_exhaustive_search(seed):
    budgets = [("avg_bits",), ("memory",), ("avg_bits", "latency_ms"), ("memory", "latency_ms")][seed % 4]
    p = _random_problem(seed, budgets=budgets)
    best = solve_exhaustive(p)
    got = solve_milp(p)
    assert best is not None and got is not None and p.feasible(got)
    assert p.total_cost(got) == pytest.approx(p.total_cost(best), rel=1e-9)
    greedy = solve_greedy(p)
    assert greedy is not None and p.feasible(greedy)
    assert p.total_cost(greedy) >= p.total_cost(best) * (1 - 1e-12)


def test_infeasible_budgets_name_the_smallest_feasible():
    p = _random_problem(3, budgets=("avg_bits",))
    p.limits["avg_bits"] = p.min_usage("avg_bits") * 0.9
    smallest = p.min_usage("avg_bits") * p.scale["avg_bits"]
    with pytest.raises(BudgetError, match=rf"smallest feasible --avg-bits is {smallest:.4f}"):
        solve(p)
    # jointly infeasible: each budget alone can be met, both together cannot
    p = _random_problem(4, budgets=())
    p.res["latency_ms"] = {m: {b: 10.0 - b for b in p.options[m]} for m in p.modules}  # here more bits = faster
    p.limits["memory"] = p.min_usage("memory") + 1e-6  # forces every module to 2 bits
    p.limits["latency_ms"] = p.fixed["latency_ms"] + 7.0 * len(p.modules)  # needs every module at >= 3 bits
    with pytest.raises(BudgetError, match="smallest feasible --latency-ms is .* given the other budgets"):
        solve(p)
    with pytest.raises(BudgetError, match="smallest feasible"):
        solve(p, solver="greedy")


def test_parse_size():
    assert parse_size("60MB") == 60_000_000 and parse_size("1MiB") == 2**20 and parse_size("2.5 GB") == 2_500_000_000
    with pytest.raises(Exception, match="cannot read the size"):
        parse_size("lots")


# ---- plans on a real artifact ---------------------------------------------------------------------------
def test_plan_budgets_pins_and_round_trip(tiny_path, tiny_profile, tmp_path):
    import shutil

    path = Path(shutil.copy(tiny_path, tmp_path / "plans.bitdial"))
    art = open_artifact(path)
    prof = load_profile(tiny_profile, art)
    plan = make_plan(art, prof, Budgets(avg_bits=4.5), name="small",
                     pins={"layers.0.*": 6, "embed_tokens": 6})
    assert plan.predicted["avg_bits"] <= 4.5 + 1e-9 and plan.solver == "milp"
    assert all(plan.bits[n] == 6 for n in plan.bits if n.startswith("layers.0."))
    assert plan.bits["embed_tokens"] == 6 and set(plan.bits) == set(art.modules)
    # the exact optimum: no single-module change that stays in budget lowers the cost
    prob, ctx = build_problem(art, prof, Budgets(avg_bits=4.5), pins={"layers.0.*": 6, "embed_tokens": 6})
    assign = {m: plan.bits[m] for m in prob.modules}
    greedy = solve_greedy(prob)
    assert prob.total_cost(assign) <= prob.total_cost(greedy) + 1e-12
    art.close()
    save_plan(path, plan)
    plan2 = make_plan(open_artifact(path), prof, Budgets(memory="3.575MB"), name="mem")
    save_plan(path, plan2)
    assert set(load_plans(path)) == {"small", "mem"}
    bits = plan_bits(path, "small")
    assert bits == plan.bits
    art = open_artifact(path)
    assert art.verify() == []  # the header rewrite kept every tensor intact
    load_profile(tiny_profile, art)  # adding plans does not change the artifact's identity
    model = build_model(art, bits)
    lin = model.linears()
    assert lin["layers.1.mlp.down_proj"].bits == bits["layers.1.mlp.down_proj"] and lin["lm_head"].bits == 6
    assert model.embed_tokens.bits == 6
    table = plan_table(art, "small")
    assert table.row_count == art.config.n_layers
    with pytest.raises(PlanError, match="no plan named 'nope'.*mem, small"):
        plan_bits(path, "nope")
    delete_plan(path, "mem")
    assert set(load_plans(path)) == {"small"}
    with pytest.raises(PlanError, match="matches no module"):
        make_plan(art, prof, Budgets(avg_bits=4), name="x", pins={"layers.9.*": 4})
    with pytest.raises(PlanError, match="cannot run at 9 bits"):
        make_plan(art, prof, Budgets(avg_bits=4), name="x", pins={"*.q_proj": 9})
    with pytest.raises(BudgetError, match=r"smallest feasible --avg-bits is 2\.0000"):
        make_plan(art, prof, Budgets(avg_bits=1.9), name="x")
    with pytest.raises(BudgetError, match=r"smallest feasible --avg-bits is 4\.0000"):  # layer 0 pinned at 6
        make_plan(art, prof, Budgets(avg_bits=2.5), name="x", pins={"layers.0.*": 6})
    with pytest.raises(PlanError, match="need a device profile"):
        make_plan(art, prof, Budgets(latency_ms=5), name="x")


def test_latency_budget_with_a_device(tiny_path, tiny_profile):
    art = open_artifact(tiny_path)
    prof = load_profile(tiny_profile, art)
    dev = load_device("rpi5")
    assert dev.estimate
    fast = make_plan(art, prof, Budgets(), name="all", device=dev)
    t_max = fast.predicted["latency_ms"]
    lo = make_plan(art, prof, Budgets(avg_bits=2.0), name="lo", device=dev).predicted["latency_ms"]
    budget = (t_max + lo) / 2
    plan = make_plan(art, prof, Budgets(latency_ms=budget), name="lat", device=dev)
    assert plan.predicted["latency_ms"] <= budget * (1 + 1e-9) and "energy_mj" in plan.predicted
    with pytest.raises(BudgetError, match="smallest feasible --latency-ms"):
        make_plan(art, prof, Budgets(latency_ms=lo * 0.9), name="x", device=dev)
    e_hi, e_lo = fast.predicted["energy_mj"], make_plan(art, prof, Budgets(avg_bits=2.0), name="e", device=dev).predicted["energy_mj"]
    plan = make_plan(art, prof, Budgets(energy_mj=(e_hi + e_lo) / 2, avg_bits=4), name="en", device=dev)
    assert plan.predicted["energy_mj"] <= (e_hi + e_lo) / 2 * (1 + 1e-9) and plan.predicted["avg_bits"] <= 4 + 1e-9


# ---- device profiles ------------------------------------------------------------------------------------
def test_builtin_devices_are_labelled_estimates():
    names = builtin_devices()
    assert {"rpi5", "jetson-orin-nano", "snapdragon-8-gen-3", "apple-m2"} <= set(names)
    from bitdial.planning.device import ModuleSpec

    for n in names:
        d = load_device(n)
        assert d.estimate and d.data["sources"] and d.data["energy"]["sources"] and d.data["energy"]["estimate"]
        t = [d.module_ms(ModuleSpec((1536, 576), b, 1536 * (72 * b + 36))) for b in (2, 4, 8)]
        assert t[0] < t[1] < t[2]


def test_corrupt_device_files_are_rejected(tmp_path):
    d = json.loads(Path(builtin_devices()["rpi5"]).read_text())
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_device(_write(tmp_path / "a.json", "{"))
    with pytest.raises(ProfileError, match="not a bitdial device profile"):
        load_device(_write(tmp_path / "b.json", {"schema": "bitdial-sensitivity-profile"}))
    bad = json.loads(json.dumps(d))
    bad["latency"]["linear"]["ms_per_mb"] = -1
    with pytest.raises(ProfileError, match="ms_per_mb"):
        load_device(_write(tmp_path / "c.json", bad))
    with pytest.raises(ProfileError, match="built-in estimates: .*rpi5"):
        load_device("no-such-device")


def test_step_table_keeps_tiny_costs_positive(tiny_path):
    """A tiny model's in-step deltas and isolated fit are lost in the noise (both 0): every module still
    costs more than nothing, more at more bits, and no cost is rounded away."""
    from bitdial.planning.device import _step_table, shape_key

    lin = build_model(open_artifact(tiny_path)).linears()
    groups: dict[str, list[str]] = {}
    for n, m in lin.items():
        groups.setdefault(shape_key(m.qt.shape), []).append(n)
    designed = [(key, 2) for key in groups]
    st = _step_table(lin, groups, 8, 1.0, designed, [1.0] * len(designed), {"ms_per_mb": 0.0}, bw_gbs=30.0)
    for key, row in st["table"].items():
        bytes2, bytes8 = (lin[groups[key][0]].qt.bytes_read(b) / 1e6 for b in (2, 8))
        assert row["2"] == pytest.approx(0.1 / 30.0 * bytes2, rel=1e-5) and 0 < row["2"] < row["8"]
    # a base step faster than those floors (a noisy fast round on a tiny model): the rest of the step would be
    # negative; the modules shrink to fill the base step instead and the rest is 0, never below
    per8 = sum(len(groups[k]) * row["8"] for k, row in st["table"].items())
    fast = _step_table(lin, groups, 8, per8 / 3, designed, [per8 / 3] * len(designed), {"ms_per_mb": 0.0},
                       bw_gbs=30.0)
    assert fast["c0_ms"] == 0.0
    assert sum(len(groups[k]) * row["8"] for k, row in fast["table"].items()) == pytest.approx(per8 / 3, rel=1e-4)
    assert all(0 < row["2"] < row["8"] for row in fast["table"].values())


def test_device_profile_measures_this_machine(tiny_path):
    from bitdial.planning.device import DeviceModel, ModuleSpec, profile_device

    art = open_artifact(tiny_path)
    data = profile_device(art, bits=[2, 8], random_plans=2, min_time=0.002, decode_steps=3, rounds=1)
    dev = DeviceModel(data)
    assert data["backend"].startswith(("native", "torch-reference")) and data["bandwidth_gbs"] > 0
    assert set(data["latency"]["table"]) == {"64x64", "32x64", "96x64", "64x96", f"{art.config.vocab_size}x64"}
    assert dev.module_ms(ModuleSpec((64, 64), 2, 100)) > 0 and dev.c0_ms(2) >= 0
    assert data["energy"]["rapl"]["available"] in (True, False)
    # the in-step form: every shape at every width, never cheaper at fewer bits... and exact on its base step
    st = data["latency"]["step"]
    assert st["base_bits"] == 8 and set(st["table"]) == set(data["latency"]["table"])
    assert all(set(row) == {"2", "8"} and 0 < row["2"] < row["8"] for row in st["table"].values())
    assert set(data["latency"]["validation"]["median_abs_rel_error"]) == {"table", "linear", "step"}
    step = DeviceModel(dict(data, latency=dict(data["latency"], model="step")))
    specs = [ModuleSpec(m.qt.shape, 8, m.qt.bytes_read(8)) for m in build_model(art).linears().values()]
    assert step.token_ms(specs, art.config.n_layers) == pytest.approx(data["latency"]["uniform_decode_ms"]["8"], rel=1e-3)
    bad = json.loads(json.dumps(data))
    bad["latency"]["model"] = "step"
    bad["latency"]["step"]["table"]["64x64"]["2"] = float("nan")
    with pytest.raises(ProfileError, match=r"step.table\[64x64\]\[2\]"):
        DeviceModel(bad)


# ---- CLI --------------------------------------------------------------------------------------------------
def test_cli_plan_commands(tiny_path, tiny_profile, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("BITDIAL_CACHE", str(tmp_path / "cache"))  # no device profile of this machine

    import typer
    from typer.testing import CliRunner

    from bitdial.cli.plan_cmds import register

    app = typer.Typer()
    register(app)
    path = shutil.copy(tiny_path, tmp_path / "cli.bitdial")
    r = CliRunner().invoke(app, ["plan", str(path), "--profile", str(tiny_profile), "--avg-bits", "3.5",
                                 "--pin", "*.down_proj=5", "--name", "p35", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["name"] == "p35" and d["bits"]["layers.1.mlp.down_proj"] == 5
    assert plan_bits(path, "p35") == d["bits"]
    r = CliRunner().invoke(app, ["plan", str(path), "--profile", str(tiny_profile), "--avg-bits", "1", "--name", "x"])
    assert r.exit_code == 2 and "smallest feasible --avg-bits is 2.0000" in r.output
    r = CliRunner().invoke(app, ["plan", str(path), "--list", "--json"])
    assert r.exit_code == 0 and list(json.loads(r.stdout)) == ["p35"]
    r = CliRunner().invoke(app, ["plan", str(path), "--show", "p35"])
    assert r.exit_code == 0 and "down" in r.stdout
    # the same view from `bitdial info --plan` (issue 5's "views for people")
    from bitdial.cli.main import app as main_app

    r = CliRunner().invoke(main_app, ["info", str(path), "--plan", "p35", "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert (shown.get("bits") or shown)["layers.1.mlp.down_proj"] == 5
    r = CliRunner().invoke(main_app, ["info", str(path), "--plan", "p35"])
    assert r.exit_code == 0 and "down" in r.stdout
    r = CliRunner().invoke(main_app, ["info", str(path), "--plan", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    r = CliRunner().invoke(main_app, ["info", str(path), "--heatmap", str(tmp_path / "h.png")])
    assert r.exit_code == 2 and "give --plan NAME" in r.output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        r = CliRunner().invoke(main_app, ["info", str(path), "--plan", "p35", "--heatmap", str(tmp_path / "h.png")])
        assert r.exit_code == 0 and (tmp_path / "h.png").stat().st_size > 1000
    bad = _write(tmp_path / "bad.json", "{}")
    r = CliRunner().invoke(app, ["plan", str(path), "--profile", str(bad), "--avg-bits", "3", "--name", "x"])
    assert r.exit_code == 2 and "not a bitdial sensitivity profile" in r.output


def test_cli_profile_sensitivity(tiny_path, calib_text, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from bitdial.cli.plan_cmds import register

    monkeypatch.setenv("BITDIAL_CACHE", str(tmp_path / "cache"))
    app = typer.Typer()
    register(app)
    out = tmp_path / "p.json"
    r = CliRunner().invoke(app, ["profile", "sensitivity", str(tiny_path), "--calib", str(calib_text), "-o", str(out),
                                 "--calib-tokens", "128", "--window", "64", "--gt-ctx", "32", "--gt-windows", "1",
                                 "--gt-bits", "2", "--gt-modules", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["modules"] == 14 and d["ground_truth"]["n_modules"] == 5 and set(d["correlation"]) == {"fisher", "hessian"}
    prof = load_profile(out, open_artifact(tiny_path))
    assert sum("kl" in m for m in prof.modules.values()) == 5


def test_pareto_and_plots(tiny_path, tiny_profile, tmp_path, monkeypatch):
    import shutil
    import sys

    from bitdial.errors import BitdialError
    from bitdial.planning import plan_heatmap
    from bitdial.planning.pareto import pareto_sweep, probe_from_profile, write_pareto_plot

    art = open_artifact(tiny_path)
    prof = load_profile(tiny_profile, art)
    probe = probe_from_profile(art, prof, cache_dir=tmp_path)
    res = pareto_sweep(art, prof, [2.5, 4.0, 1.0], probe=probe, uniform_bits=[2, 4])
    kinds = [(p["kind"], p["budget_avg_bits"]) for p in res["points"]]
    assert kinds == [("plan", 2.5), ("plan", 4.0), ("uniform", 2), ("uniform", 4)]  # 1.0 is infeasible: skipped
    pts = {k: p for k, p in zip(kinds, res["points"])}
    assert pts[("plan", 2.5)]["avg_bits"] <= 2.5 + 1e-9
    # more bits, less KL (whether a mix beats uniform is measured on the real model: benchmarks/plan_quality.py)
    assert pts[("plan", 4.0)]["kl_mean"] < pts[("plan", 2.5)]["kl_mean"] < pts[("uniform", 2)]["kl_mean"]
    assert pts[("uniform", 4)]["memory_bytes"] > pts[("plan", 2.5)]["memory_bytes"] > pts[("uniform", 2)]["memory_bytes"]
    path = Path(shutil.copy(tiny_path, tmp_path / "h.bitdial"))
    save_plan(path, make_plan(open_artifact(path), prof, Budgets(avg_bits=3), name="h"))
    before = sys.modules.get("matplotlib")  # an earlier test may have imported it: put that module back
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were missing
    with pytest.raises(BitdialError, match=r"pip install 'bitdial\[plot\]'"):
        write_pareto_plot(res, tmp_path / "f.png")
    with pytest.raises(BitdialError, match="matplotlib"):
        plan_heatmap(path, "h", tmp_path / "h.png")
    if before is None:
        monkeypatch.delitem(sys.modules, "matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", before)
    pytest.importorskip("matplotlib")
    assert write_pareto_plot(res, tmp_path / "f.png").stat().st_size > 1000
    assert plan_heatmap(path, "h", tmp_path / "h.png").stat().st_size > 1000
