"""Telemetry providers (fake sysfs/procfs trees), trace replay and recording, and the precision controller
on scripted latency traces. Pure Python, no model: every test runs in well under a second."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

from bitdial.control import (Battery, CgroupCPU, ControlConfig, Controller, DeviceState, Memory, PsutilCPU,
                             ReplayProvider, RequestConstraints, Telemetry, Thermal, record)
from bitdial.control import telemetry as tm


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


class FakeClock:
    """A clock tests move by hand; ``sleep`` advances it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


# ---------------------------------------------------------------------------------------------------------------------
# DeviceState


def test_state_dict_round_trip_and_extra():
    s = DeviceState(timestamp=1.0, cpu_util=0.5, per_cpu_util=[0.2, 0.8], thermal_zones={"acpitz": 50.0},
                    on_ac=False, extra={"note": "x"})
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert DeviceState.from_dict(d) == s
    s2 = DeviceState.from_dict({"temperature_c": 70, "competitor": True})
    assert s2.temperature_c == 70 and s2.extra == {"competitor": True}
    assert s2.discharging is False and DeviceState(battery_status="Discharging").discharging


def test_expected_slowdown_from_cpu_state():
    idle = DeviceState(per_cpu_util=[0.02, 0.01], cpu_count=2)
    assert idle.expected_slowdown() == pytest.approx(1.0, abs=0.02)
    # another process busy on one of the two cores: the model's two threads get one core -> ~2x
    assert DeviceState(per_cpu_util=[1.0, 0.05], cpu_count=2).expected_slowdown(2) == pytest.approx(2.0, rel=0.06)
    # while decoding: our own process uses 1.3 cores, the rest is somebody else's
    busy = DeviceState(per_cpu_util=[1.0, 1.0], cpu_count=2, self_cpu_cores=1.3)
    assert busy.other_cpu_cores == pytest.approx(0.7)
    assert busy.expected_slowdown(2) == pytest.approx(2 / 1.3)
    # all of our own load: no slowdown
    assert DeviceState(per_cpu_util=[1.0, 1.0], cpu_count=2, self_cpu_cores=2.0).expected_slowdown(2) == 1.0
    # one thread does not care about a busy second core
    assert DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2).expected_slowdown(1) == 1.0
    # a cgroup quota of one core for two threads
    assert DeviceState(per_cpu_util=[0.0, 0.0], cpu_count=2, cpu_quota_cores=1.0).expected_slowdown(2) == 2.0
    # affinity: load on CPUs we may not use does not count
    pinned = DeviceState(per_cpu_util=[0.0, 0.0, 1.0, 1.0], cpu_count=2, cpu_affinity=[0, 1])
    assert pinned.expected_slowdown(2) == 1.0
    # an explicit hint wins; the estimate is capped
    assert DeviceState(per_cpu_util=[0.0], cpu_count=1, slowdown_hint=3.0).expected_slowdown() == 3.0
    assert DeviceState(per_cpu_util=[1.0, 1.0], cpu_count=2).expected_slowdown(2, max_slowdown=4) == 4.0
    assert DeviceState().expected_slowdown(2) == 1.0  # nothing known


# ---------------------------------------------------------------------------------------------------------------------
# CPU


STAT0 = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 50 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 400 0 0 0 0 0 0
intr 12345
"""
STAT1 = """cpu  300 0 200 900 0 0 0 0 0 0
cpu0 200 0 100 400 0 0 0 0 0 0
cpu1 50 0 50 450 50 0 0 0 0 0
"""


def test_cpu_from_proc_stat(tmp_path):
    write(tmp_path, "proc/stat", STAT0)
    write(tmp_path, "proc/self/stat", "42 (py thon) R 1 1 1 0 -1 0 0 0 0 0 100 50 0 0 20 0 3 0")
    for i, (cur, mx) in enumerate([(1200000, 2400000), (1800000, 2400000)]):
        write(tmp_path, f"sys/devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq", f"{cur}\n")
        write(tmp_path, f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq", f"{mx}\n")
    cpu = PsutilCPU(root=tmp_path)
    assert cpu._ps is None  # a fake root never goes through psutil
    write(tmp_path, "proc/stat", STAT1)
    d = cpu.read()
    # cpu0: busy +200 of +200 -> 1.0; cpu1: +0 busy of +100 (idle 50 + iowait 50) -> 0.0
    assert d["per_cpu_util"] == [1.0, 0.0]
    assert d["cpu_util"] == pytest.approx(0.5)
    assert d["cpu_count"] == 2
    assert d["cpu_freq_mhz"] == pytest.approx(1500.0) and d["cpu_freq_max_mhz"] == pytest.approx(2400.0)
    assert d["self_cpu_cores"] == 0.0  # utime/stime did not move
    # no time passed: utilization is unknown, not zero
    assert "cpu_util" not in cpu.read()


def test_cpu_freq_from_cpuinfo_and_missing_sources(tmp_path):
    write(tmp_path, "proc/cpuinfo", "processor : 0\ncpu MHz\t\t: 2000.000\nprocessor : 1\ncpu MHz : 3000.0\n")
    d = PsutilCPU(root=tmp_path).read()
    assert d["cpu_freq_mhz"] == pytest.approx(2500.0) and d["cpu_freq_max_mhz"] is None
    assert "cpu_util" not in d and "self_cpu_cores" not in d
    empty = PsutilCPU(root=tmp_path / "nowhere").read()
    assert empty == {"cpu_freq_mhz": None, "cpu_freq_max_mhz": None}


def test_cpu_garbage_never_raises(tmp_path):
    write(tmp_path, "proc/stat", "cpu0 abc def\ncpu1 1 2\n")
    write(tmp_path, "proc/self/stat", "garbage")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "n/a")
    d = PsutilCPU(root=tmp_path).read()
    assert d.get("cpu_util") is None and d["cpu_freq_mhz"] is None


def test_cpu_real_machine_with_and_without_psutil(monkeypatch):
    if not Path("/proc/stat").exists():
        pytest.skip("needs Linux /proc")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    cpu = PsutilCPU()
    assert cpu._ps is None
    sum(i * i for i in range(200000))  # let some CPU time pass
    d = cpu.read()
    assert d["cpu_count"] >= 1
    if "cpu_util" in d:
        assert 0.0 <= d["cpu_util"] <= 1.0 and len(d["per_cpu_util"]) >= 1
    monkeypatch.undo()
    pytest.importorskip("psutil")
    cpu = PsutilCPU()
    assert cpu._ps is not None
    sum(i * i for i in range(200000))
    d = cpu.read()
    assert d["cpu_count"] >= 1 and d.get("self_cpu_cores", 0.0) >= 0.0


# ---------------------------------------------------------------------------------------------------------------------
# cgroup


def test_cgroup_v2_quota(tmp_path):
    cg, proc = tmp_path / "cg", tmp_path / "proc"
    write(cg, "cgroup.controllers", "cpu memory\n")
    write(cg, "cpu.max", "max 100000\n")
    assert CgroupCPU(cg, proc).read() == {"cpu_quota_cores": None}  # unlimited, no /proc/self/cgroup
    write(cg, "cpu.max", "150000 100000\n")
    assert CgroupCPU(cg, proc).read()["cpu_quota_cores"] == pytest.approx(1.5)
    # nested: this process's own cgroup is tighter than its parent
    write(proc, "self/cgroup", "0::/app.slice/bitdial.scope\n")
    write(cg, "app.slice/cpu.max", "max 100000\n")
    write(cg, "app.slice/bitdial.scope/cpu.max", "50000 100000\n")
    assert CgroupCPU(cg, proc).read()["cpu_quota_cores"] == pytest.approx(0.5)
    write(cg, "app.slice/bitdial.scope/cpu.max", "lots 100000\n")  # garbage: ignored, the parent's quota holds
    assert CgroupCPU(cg, proc).read()["cpu_quota_cores"] == pytest.approx(1.5)


def test_cgroup_v1_quota_and_absent(tmp_path):
    cg = tmp_path / "cg"
    write(cg, "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(cg, "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert CgroupCPU(cg, tmp_path / "proc").read() == {"cpu_quota_cores": None}
    write(cg, "cpu,cpuacct/cpu.cfs_quota_us", "200000\n")
    assert CgroupCPU(cg, tmp_path / "proc").read()["cpu_quota_cores"] == pytest.approx(2.0)
    write(cg, "cpu,cpuacct/cpu.cfs_period_us", "zero\n")
    assert CgroupCPU(cg, tmp_path / "proc").read() == {"cpu_quota_cores": None}
    assert CgroupCPU(tmp_path / "missing", tmp_path / "missing").read() == {"cpu_quota_cores": None}


# ---------------------------------------------------------------------------------------------------------------------
# thermal


def test_thermal_zones(tmp_path):
    write(tmp_path, "thermal_zone0/type", "acpitz\n")
    write(tmp_path, "thermal_zone0/temp", "45000\n")
    write(tmp_path, "thermal_zone1/type", "x86_pkg_temp\n")
    write(tmp_path, "thermal_zone1/temp", "85500\n")
    write(tmp_path, "thermal_zone2/type", "acpitz\n")  # duplicate type
    write(tmp_path, "thermal_zone2/temp", "30000\n")
    write(tmp_path, "thermal_zone3/type", "broken\n")
    write(tmp_path, "thermal_zone3/temp", "not a number\n")
    write(tmp_path, "thermal_zone4/type", "bogus\n")
    write(tmp_path, "thermal_zone4/temp", "-273000\n")  # implausible
    write(tmp_path, "thermal_zone10/type", "no_temp_file\n")
    write(tmp_path, "cooling_device0/type", "Processor\n")
    d = Thermal(tmp_path).read()
    assert d["temperature_c"] == pytest.approx(85.5)
    assert d["thermal_zones"] == {"acpitz": 45.0, "x86_pkg_temp": 85.5, "acpitz:thermal_zone2": 30.0}
    assert Thermal(tmp_path, types=["acpitz"]).read()["temperature_c"] == pytest.approx(45.0)
    assert Thermal(tmp_path / "absent").read() == {"temperature_c": None, "thermal_zones": {}}


# ---------------------------------------------------------------------------------------------------------------------
# battery


def test_battery_discharging_with_mains(tmp_path):
    write(tmp_path, "BAT0/type", "Battery\n")
    write(tmp_path, "BAT0/capacity", "15\n")
    write(tmp_path, "BAT0/status", "Discharging\n")
    write(tmp_path, "BAT0/power_now", "7500000\n")  # µW
    write(tmp_path, "AC/type", "Mains\n")
    write(tmp_path, "AC/online", "0\n")
    write(tmp_path, "hid-mouse-battery/type", "Battery\n")  # a peripheral: ignored
    write(tmp_path, "hid-mouse-battery/scope", "Device\n")
    write(tmp_path, "hid-mouse-battery/capacity", "90\n")
    d = Battery(tmp_path).read()
    assert d == {"battery_percent": 15.0, "battery_status": "Discharging", "battery_power_w": pytest.approx(7.5),
                 "on_ac": False}
    write(tmp_path, "AC/online", "1\n")
    write(tmp_path, "BAT0/status", "Charging\n")
    d = Battery(tmp_path).read()
    assert d["on_ac"] is True and d["battery_status"] == "Charging"


def test_battery_fallbacks_and_garbage(tmp_path):
    # energy_now/energy_full instead of capacity, current × voltage instead of power, no mains supply
    write(tmp_path, "BAT1/type", "Battery\n")
    write(tmp_path, "BAT1/energy_now", "25000000\n")
    write(tmp_path, "BAT1/energy_full", "50000000\n")
    write(tmp_path, "BAT1/current_now", "1000000\n")  # 1 A
    write(tmp_path, "BAT1/voltage_now", "12000000\n")  # 12 V
    write(tmp_path, "BAT1/status", "Discharging\n")
    d = Battery(tmp_path).read()
    assert d["battery_percent"] == pytest.approx(50.0)
    assert d["battery_power_w"] == pytest.approx(12.0)
    assert d["on_ac"] is False  # inferred from the status
    write(tmp_path, "BAT1/status", "Full\n")
    assert Battery(tmp_path).read()["on_ac"] is True
    write(tmp_path, "BAT1/capacity", "lots\n")  # garbage capacity: falls back to energy_now/energy_full
    assert Battery(tmp_path).read()["battery_percent"] == pytest.approx(50.0)
    write(tmp_path, "BAT1/capacity", "250\n")  # out of range: dropped
    assert Battery(tmp_path).read()["battery_percent"] is None
    none = {"battery_percent": None, "battery_status": None, "battery_power_w": None, "on_ac": None}
    assert Battery(tmp_path / "absent").read() == none
    write(tmp_path / "desktop", "AC/type", "Mains\n")
    write(tmp_path / "desktop", "AC/online", "1\n")
    assert Battery(tmp_path / "desktop").read() == {**none, "on_ac": True}


# ---------------------------------------------------------------------------------------------------------------------
# memory


def test_memory_from_meminfo(tmp_path):
    write(tmp_path, "meminfo", "MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                               "MemAvailable:    8000000 kB\nBuffers: 10 kB\n")
    assert Memory(tmp_path).read() == {"mem_available_bytes": 8000000 * 1024, "mem_total_bytes": 16000000 * 1024}
    write(tmp_path, "meminfo", "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\nJunk: x\n")
    assert Memory(tmp_path).read() == {"mem_available_bytes": 400 * 1024, "mem_total_bytes": 1000 * 1024}
    assert Memory(tmp_path / "absent").read() == {"mem_available_bytes": None, "mem_total_bytes": None}


def test_memory_real_machine():
    if not Path("/proc/meminfo").exists():
        pytest.skip("needs Linux /proc")
    a = Memory(use_psutil=False).read()
    assert 0 < a["mem_available_bytes"] <= a["mem_total_bytes"]
    pytest.importorskip("psutil")
    b = Memory().read()
    assert b["mem_total_bytes"] == pytest.approx(a["mem_total_bytes"], rel=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Telemetry


class Static:
    def __init__(self, name, d):
        self.name, self.d, self.calls = name, d, 0

    def read(self):
        self.calls += 1
        return dict(self.d)


class Broken:
    name = "broken"

    def read(self):
        raise RuntimeError("provider bug")


def test_telemetry_merges_providers_and_survives_a_broken_one():
    clock = FakeClock()
    a = Static("a", {"temperature_c": 50.0, "battery_percent": None, "fan": 3})
    b = Static("b", {"temperature_c": None, "battery_percent": 80.0})
    t = Telemetry([a, Broken(), b], clock=clock, min_interval=0.5)
    s = t.read()
    assert s.temperature_c == 50.0 and s.battery_percent == 80.0  # None never overrides a value
    assert s.extra == {"fan": 3} and s.timestamp == clock.t
    assert t.read() is s and a.calls == 1  # cached within min_interval
    clock.sleep(0.6)
    assert t.read() is not s and a.calls == 2


def test_default_telemetry_on_this_machine():
    s = Telemetry().read()  # whatever exists here; never raises
    assert isinstance(s, DeviceState) and s.timestamp > 0
    assert s.expected_slowdown(2) >= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# replay and record


def test_replay_scripted_trace_step_hold(tmp_path):
    trace = [{"t": 60, "temperature_c": 85}, {"t": 0, "temperature_c": 45, "battery_percent": 90},
             {"t": 120, "battery_percent": 15, "battery_status": "Discharging", "competitor": True}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    clock = FakeClock(500.0)
    tel = Telemetry.replay(path, clock=clock)
    s = tel.read()
    assert (s.temperature_c, s.battery_percent, s.battery_status) == (45, 90, None)
    clock.sleep(59.9)
    assert tel.read().temperature_c == 45
    clock.sleep(0.1)
    s = tel.read()
    assert s.temperature_c == 85 and s.battery_percent == 90  # each field holds its last value
    clock.sleep(100)
    s = tel.read()
    assert (s.temperature_c, s.battery_percent, s.battery_status) == (85, 15, "Discharging")
    assert s.extra == {"competitor": True}
    rp = tel.providers[0]
    assert isinstance(rp, ReplayProvider) and rp.duration == 120 and rp.finished
    rp.reset()
    assert tel.read().temperature_c == 45


def test_replay_jsonl_speed_and_empty_start(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('# a scripted competitor\n{"t": 10, "slowdown_hint": 2.0}\n\n{"t": 20, "slowdown_hint": 1.0}\n')
    clock = FakeClock()
    rp = ReplayProvider(path, clock=clock, speed=10.0)
    assert rp.read() == {}  # before the first record
    clock.sleep(1.0)  # 10 trace seconds
    assert rp.read() == {"slowdown_hint": 2.0}
    clock.sleep(1.0)
    assert rp.read() == {"slowdown_hint": 1.0}
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"trace": [{"t": 0, "on_ac": False}]}))
    assert ReplayProvider(wrapped, clock=clock).read() == {"on_ac": False}


@pytest.mark.parametrize("text, match", [
    ('[{"temperature_c": 40}]', "needs a time"),
    ('[{"t": -1}]', "needs a time"),
    ('[{"t": "soon"}]', "needs a time"),
    ('[{"t": 0, "temperature_c": "hot"}]', "temperature_c must be a number"),
    ('[3]', "not an object"),
    ('{"t": 0}\n{"t": 1, oops}\n', ":2: not a JSON record"),
])
def test_replay_rejects_malformed_traces(tmp_path, text, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        ReplayProvider(p)


def test_record_round_trip(tmp_path):
    clock = FakeClock(0.0)
    temps = iter([40.0, 40.0, 55.5, 70.0, None, 65.0])
    mem = Static("m", {"mem_total_bytes": 1000})

    class Temp:
        name = "t"

        def read(self):
            return {"temperature_c": next(temps), "thermal_zones": {"acpitz": 1.0}}

    tel = Telemetry([Temp(), mem], clock=clock, min_interval=0.0)
    path = tmp_path / "rec.jsonl"
    n = record(tel, path, seconds=5.0, interval=1.0, clock=clock, sleep=clock.sleep)
    assert n == 6
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["t"] == 0 and lines[0]["temperature_c"] == 40.0 and lines[0]["mem_total_bytes"] == 1000
    assert lines[1] == {"t": 1.0}  # nothing changed
    assert lines[4] == {"t": 4.0, "temperature_c": None}  # a value that went away is recorded as null
    replay_clock = FakeClock(0.0)
    rp = ReplayProvider(path, clock=replay_clock)
    seen = []
    for _ in range(6):
        seen.append(DeviceState.from_dict(rp.read()).temperature_c)
        replay_clock.sleep(1.0)
    assert seen == [40.0, 40.0, 55.5, 70.0, None, 65.0]
    assert DeviceState.from_dict(rp.at(3.5)).thermal_zones == {"acpitz": 1.0}
    with pytest.raises(ValueError, match="interval"):
        record(tel, path, seconds=1.0, interval=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# controller: a simulated decoder


TARGETS = [2.5, 3.0, 3.5, 4.0]
PRED = {2.5: 6.0, 3.0: 8.0, 3.5: 10.0, 4.0: 12.0}  # ms/token on an idle machine


def simulate(ctl: Controller, constraints: RequestConstraints, steps: int, *, slowdown=lambda i: 1.0,
             true_ms=PRED, sigma=0.05, seed=0, state=lambda i: None):
    """Run ``steps`` decode steps; the true ms is true_ms[target] × slowdown(i) × lognormal noise."""
    rng = random.Random(seed)
    d = ctl.start_request(constraints, state(0))
    targets, ms_list = [], []
    for i in range(steps):
        t = d.target
        ms = true_ms[t] * slowdown(i) * math.exp(rng.gauss(0.0, sigma))
        targets.append(t)
        ms_list.append(ms)
        ctl.observe(t, ms, state(i))
        d = ctl.step(state(i))
    return targets, ms_list


def switches(targets):
    return sum(a != b for a, b in itertools.pairwise(targets))


def attainment(ms_list, limit):
    return sum(m <= limit for m in ms_list) / len(ms_list)


def test_no_latency_target_runs_the_highest_target():
    ctl = Controller(TARGETS, PRED)
    d = ctl.start_request(RequestConstraints(), DeviceState())
    assert (d.target, d.policy) == (4.0, "rule") and "no latency target" in d.reason
    targets, _ = simulate(ctl, RequestConstraints(), 50, slowdown=lambda i: 3.0)
    assert set(targets) == {4.0}


def test_rule_meets_the_latency_target_through_a_competitor():
    """Observed ms doubles for steps 200..399 (a competitor takes a core), then returns."""
    ctl = Controller(TARGETS, PRED)
    limit = 14.0
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=limit), 600,
                           slowdown=lambda i: 2.0 if 200 <= i < 400 else 1.0)
    assert targets[0] == 4.0 and targets[199] == 4.0  # 12 ms fits 14 with headroom
    assert set(targets[205:400]) == {2.5}  # 2.5: 12 ms under the competitor; 3.0 would be 16
    # back up once the competitor is gone and the quantile window (64 steps) holds no slow step
    assert targets[400 + 64 + 8:] == [4.0] * (600 - 472)
    assert sum(m > limit for m in ms[200:205]) <= 2  # the violation is confirmed on the 2nd late step
    assert attainment(ms, limit) >= 0.99
    assert switches(targets) <= 3
    # a fixed 4-bit setting would have missed a third of the tokens
    assert attainment([PRED[4.0] * (2.0 if 200 <= i < 400 else 1.0) for i in range(600)], limit) < 0.7
    hist = ctl.history
    assert any("violation" in d.reason and d.changed for d in hist)
    s = ctl.end_request()
    assert s["steps"] == 600 and s["switches"] == switches(targets) and s["attainment"] >= 0.99
    assert 3.0 < s["mean_target"] < 4.0


def bimodal_contention(seed=0, fast=1.0, slow=2.0):
    """A slowdown that jumps between two modes in runs of 2..24 steps: a decode thread that shares its core
    with a busy process is on or off the CPU for whole scheduler slices (on Sapphire Rapids fixed 2 bits under the
    competitor: p50 5.9 ms, p95 11.0 ms; docs/control.md, "Threads")."""
    rng = random.Random(seed)
    modes, m = [], fast
    while len(modes) < 100_000:
        modes += [m] * rng.randint(2, 24)
        m = slow if m == fast else fast
    return lambda i: modes[i]


def test_rule_keeps_the_quantile_under_a_bimodal_slowdown():
    """Under a competitor that is sometimes off the shared core, the fast steps must not lure the rule up:
    a target is taken (at a request's start or by a switch up) only if it would have met the latency target
    on ``up_quantile`` of the recent steps. Requests of 64 steps, as the experiment's."""
    limit = 14.0  # 2.5 bits: 6 / 12 ms in the two modes (in time but for noise); 4 bits: 12 / 24 ms (half late)

    def run(cfg):
        ctl = Controller(TARGETS, PRED, cfg)
        slow = bimodal_contention()
        ms_all, targets_all = [], []
        for r in range(40):
            targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=limit), 64,
                                   slowdown=lambda i, r=r: slow(64 * r + i), seed=r, sigma=0.1)
            ctl.end_request()
            ms_all += ms
            targets_all += targets
        return attainment(ms_all, limit), targets_all

    # every request starts afresh (carry_s=0, the default): the guard alone
    att, targets = run(ControlConfig(carry_s=0))
    assert att >= 0.96 and statistics.mean(targets) < 2.6
    old, old_targets = run(ControlConfig(up_quantile=0.0, carry_s=0))  # without the guard: it chases the fast mode
    assert att - old >= 0.01 and statistics.mean(old_targets) > statistics.mean(targets)
    assert run(ControlConfig(carry_s=5.0))[0] >= 0.96  # with the carry-over too
    # no competitor: the guard costs nothing once the window is clean
    ctl = Controller(TARGETS, PRED)
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=limit), 300)
    assert targets[-200:] == [4.0] * 200 and attainment(ms, limit) >= 0.99
    with pytest.raises(ValueError, match="up_quantile"):
        ControlConfig(up_quantile=1.0)
    with pytest.raises(ValueError, match="quantile_window"):
        ControlConfig(quantile_window=1)


def test_rule_continues_across_requests_with_its_backoff():
    """Back-to-back requests on a machine where 3.5 and 4 bits run 60% slower than the latency model says
    (on Sapphire Rapids under the competitor the model's ratios between targets were off, and a fresh pick at
    every request start climbed to 3.5 bits and fell at its first step: 581 switches in 300 s). The next
    request continues from the last one's target, dwell and backoff: a failed climb is not retried at every
    start."""
    true_ms = {2.5: 6.0, 3.0: 8.0, 3.5: 16.0, 4.0: 19.2}
    limit = 14.0

    def run(cfg, n=60):
        ctl = Controller(TARGETS, PRED, cfg)
        ms_all, t_all = [], []
        for r in range(n):
            targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=limit), 32, true_ms=true_ms, seed=r)
            ctl.end_request()
            ms_all += ms
            t_all += targets
        return attainment(ms_all, limit), switches(t_all), t_all

    att, sw, targets = run(ControlConfig(carry_s=5.0))
    att0, sw0, targets0 = run(ControlConfig())  # off by default
    assert att >= 0.98 and att > att0 and sw * 3 <= sw0
    assert statistics.mean(targets) >= 2.95  # it still runs the best target in time, 3 bits
    # each later request starts where the previous ended, and says so
    ctl = Controller(TARGETS, PRED, ControlConfig(carry_s=5.0))
    simulate(ctl, RequestConstraints(max_ms_per_token=limit), 40, true_ms=true_ms)
    last = ctl.history[-1].target
    ctl.end_request()
    d = ctl.start_request(RequestConstraints(max_ms_per_token=limit))
    assert d.target == last and "previous request" in d.reason and d.changed
    ctl.end_request()  # no step observed: nothing to carry
    assert "highest target predicted" in ctl.start_request(RequestConstraints(max_ms_per_token=limit)).reason
    # no carry-over to a request with another latency target, or after carry_s
    for cfg, c in ((ControlConfig(carry_s=5.0), RequestConstraints(max_ms_per_token=20.0)),
                   (ControlConfig(carry_s=1e-9), RequestConstraints(max_ms_per_token=limit))):
        ctl = Controller(TARGETS, PRED, cfg)
        simulate(ctl, RequestConstraints(max_ms_per_token=limit), 40, true_ms=true_ms)
        ctl.end_request()
        assert "previous request" not in ctl.start_request(c).reason
    with pytest.raises(ValueError, match="carry_s"):
        ControlConfig(carry_s=-1.0)


def test_switch_up_waits_min_dwell_steps():
    cfg = ControlConfig(min_dwell=8, up_quantile=0.0)  # the dwell alone (the quantile window adds its length)
    ctl = Controller(TARGETS, PRED, cfg)
    targets, _ = simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 300,
                          slowdown=lambda i: 2.0 if 100 <= i < 200 else 1.0, sigma=0.0)
    back_up = next(i for i in range(200, 300) if targets[i] == 4.0)
    assert 200 + cfg.min_dwell <= back_up <= 200 + cfg.min_dwell + cfg.down_window + 2


def test_down_window_one_switches_at_the_first_late_step():
    ctl = Controller(TARGETS, PRED, ControlConfig(down_window=1))
    targets, _ = simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 60,
                          slowdown=lambda i: 2.0 if i >= 50 else 1.0, sigma=0.0)
    assert targets[50] == 4.0 and targets[51] == 2.5


def test_no_flapping_on_noise():
    # noise well inside the band: not a single switch
    ctl = Controller(TARGETS, PRED)
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 1000, sigma=0.05, seed=1)
    assert switches(targets) == 0 and set(targets) == {4.0}
    # isolated 3x spikes (a page fault, an interrupt storm) do not move the target either
    ctl = Controller(TARGETS, PRED)
    targets, _ = simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 1000, sigma=0.03,
                          slowdown=lambda i: 3.0 if i % 37 == 0 else 1.0)
    assert switches(targets) == 0
    # a borderline target (4.0 runs at ~0.93 of the limit, so ~7% of its tokens would be late): the
    # controller mostly runs 3.5 and retries 4.0 rarely (failed switches up back off), it does not flap
    ctl = Controller(TARGETS, PRED, ControlConfig(up_margin=0.05))
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=12.9), 3000, sigma=0.05, seed=1)
    assert switches(targets) <= 25  # fewer than one switch per 120 steps
    assert set(targets) == {3.5, 4.0}
    assert attainment(ms, 12.9) >= 0.95


def test_rule_backs_off_when_the_latency_model_is_wrong():
    """3.5 and 4.0 are much slower than predicted: each failed switch up doubles the wait for the next."""
    true_ms = {2.5: 6.0, 3.0: 8.0, 3.5: 16.0, 4.0: 17.0}
    ctl = Controller(TARGETS, PRED)
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 2000, true_ms=true_ms)
    assert switches(targets) <= 40 and switches(targets[1000:]) <= 4
    assert attainment(ms, 14.0) >= 0.97


def test_state_prior_lowers_the_first_target():
    ctl = Controller(TARGETS, PRED, ControlConfig(threads=2))
    competitor = DeviceState(per_cpu_util=[1.0, 0.02], cpu_count=2)
    d = ctl.start_request(RequestConstraints(max_ms_per_token=14.0), competitor)
    assert d.target == 2.5 and d.predicted_ms == pytest.approx(12.0, rel=0.05)
    ctl.end_request()
    d = ctl.start_request(RequestConstraints(max_ms_per_token=14.0), DeviceState(per_cpu_util=[0.0, 0.0], cpu_count=2))
    assert d.target == 4.0


def test_state_prior_that_overestimates_is_corrected_by_observations():
    """A niced competitor: the CPU state says 2x, decoding is only 1.1x slower."""
    ctl = Controller(TARGETS, PRED, ControlConfig(threads=2, adapt_threads=True))
    busy = DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2)
    targets, _ = simulate(ctl, RequestConstraints(max_ms_per_token=16.0), 100, slowdown=lambda i: 1.1,
                           state=lambda i: busy)
    assert targets[0] == 2.5 and targets[-1] == 4.0  # 12 × 1.1 = 13.2 fits 16 with headroom
    # the request runs on the free core (1 thread, modelled as 2 × the 2-thread latency): the prediction
    # at 4 bits converges to what the steps show
    assert ctl.stats()["threads"] == 1
    assert ctl.predicted_ms(4.0, busy) == pytest.approx(12.0 * 1.1, rel=0.05)


def test_threads_follow_the_free_cores_with_hysteresis():
    ctl = Controller(TARGETS, PRED, ControlConfig(threads=2, adapt_threads=True))
    lim = RequestConstraints(max_ms_per_token=100.0)

    def first(util):
        d = ctl.start_request(lim, DeviceState(per_cpu_util=util, cpu_count=2, self_cpu_cores=0.0))
        ctl.end_request()
        return d.threads, d.reason

    assert first([0.02, 0.01])[0] == 2
    n, why = first([1.0, 0.02])  # a competitor holds one core: run on the other
    assert n == 1 and "1 thread (1.0 of 2 cores free)" in why
    assert first([0.7, 0.0])[0] == 1  # 1.3 free: not enough to add a thread (needs > 1.75)
    assert first([0.2, 0.0])[0] == 2  # 1.8 free
    assert first([0.7, 0.0])[0] == 2  # from 2 threads, 1.3 free is not enough to drop one (< 1.25)
    assert first([1.0, 1.0])[0] == 1  # never below one
    q = DeviceState(per_cpu_util=[0.0, 0.0, 0.0, 0.0], cpu_count=4, cpu_quota_cores=2.0)
    assert ctl.start_request(lim, q).threads == 2  # never above the model's threads or the quota
    ctl.end_request()
    assert first([1.0, 0.02])[0] == 1
    d = ctl.start_request(lim, None)  # no device state: leave the threads alone (the model at the base count)
    assert d.threads is None and ctl.stats()["threads"] is None and d.predicted_ms == pytest.approx(PRED[4.0], rel=0.05)
    ctl.end_request()
    off = Controller(TARGETS, PRED, ControlConfig(threads=2, adapt_threads=False))
    assert off.start_request(lim, DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2)).threads is None
    d = ctl.start_request(lim, DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2))
    assert d.threads == 1 and ctl.step(DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2)).threads is None


def test_thread_latency_model_picks_the_target_at_the_chosen_threads():
    one = {2.5: 7.0, 3.0: 9.0, 3.5: 11.0, 4.0: 13.0}  # measured at 1 thread: better than 2 x PRED
    ctl = Controller(TARGETS, PRED, ControlConfig(threads=2, adapt_threads=True), thread_latency_ms={1: one})
    busy = DeviceState(per_cpu_util=[1.0, 0.0], cpu_count=2)
    d = ctl.start_request(RequestConstraints(max_ms_per_token=11.0), busy)  # 9.9 with headroom
    assert d.threads == 1 and d.target == 3.0 and d.predicted_ms == pytest.approx(9.0)
    ctl.end_request()
    # without the measurement: 2 x PRED at 1 thread, so only 2.5 (12 ms) fits
    plain = Controller(TARGETS, PRED, ControlConfig(threads=2, adapt_threads=True))
    d = plain.start_request(RequestConstraints(max_ms_per_token=12.5 / 0.9), busy)
    assert d.threads == 1 and d.target == 2.5
    with pytest.raises(ValueError, match="thread count"):
        Controller(TARGETS, PRED, thread_latency_ms={0: one})
    with pytest.raises(ValueError, match="no positive prediction for target"):
        Controller(TARGETS, PRED, thread_latency_ms={1: {2.5: 1.0}})
    with pytest.raises(ValueError, match="thread_margin"):
        ControlConfig(thread_margin=0.5)


def test_replayed_slowdown_hint_drives_the_prior():
    clock = FakeClock()
    tel = Telemetry.replay([{"t": 0, "slowdown_hint": 1.0}, {"t": 10, "slowdown_hint": 2.0}], clock=clock)
    ctl = Controller(TARGETS, PRED)
    assert ctl.start_request(RequestConstraints(max_ms_per_token=14.0), tel.read()).target == 4.0
    ctl.end_request()
    clock.sleep(10)
    assert ctl.start_request(RequestConstraints(max_ms_per_token=14.0), tel.read()).target == 2.5


# ---------------------------------------------------------------------------------------------------------------------
# controller: thermal and battery policies


def test_thermal_cap_with_hysteresis_from_a_scripted_trace():
    clock = FakeClock()
    tel = Telemetry.replay([{"t": 0, "temperature_c": 45}, {"t": 60, "temperature_c": 85},
                            {"t": 120, "temperature_c": 77}, {"t": 180, "temperature_c": 70}], clock=clock)
    ctl = Controller(TARGETS, PRED)  # hot_c 80, cap 3.0, lifted below 75
    seen = []
    d = ctl.start_request(RequestConstraints(), tel.read())
    for _ in range(240):
        clock.sleep(1.0)
        st = tel.read()
        ctl.observe(d.target, PRED[d.target], st)
        d = ctl.step(st)
        seen.append(d.target)
    assert set(seen[:58]) == {4.0}
    assert set(seen[60:178]) == {3.0}  # 77 °C is inside the hysteresis band: still capped
    assert set(seen[180:]) == {4.0}
    capped = [d for d in ctl.history if d.changed and d.target == 3.0]
    assert capped and "thermal cap 3" in capped[0].reason


def test_battery_cap_only_while_discharging():
    ctl = Controller(TARGETS, PRED)
    low = DeviceState(battery_percent=15.0, battery_status="Discharging", on_ac=False)
    d = ctl.start_request(RequestConstraints(), low)
    assert d.target == 3.0 and "battery cap" in d.reason
    charging = DeviceState(battery_percent=15.0, battery_status="Charging", on_ac=True)
    assert ctl.step(charging).target == 4.0
    assert ctl.step(low).target == 3.0
    assert ctl.step(DeviceState(battery_percent=21.0, battery_status="Discharging")).target == 3.0  # hysteresis
    assert ctl.step(DeviceState(battery_percent=23.0, battery_status="Discharging")).target == 4.0
    cfg = ControlConfig(low_battery_pct=None)
    assert Controller(TARGETS, PRED, cfg).start_request(RequestConstraints(), low).target == 4.0


def test_caps_respect_min_bits_and_latency():
    hot = DeviceState(temperature_c=90.0, battery_percent=10.0, battery_status="Discharging")
    cfg = ControlConfig(hot_max_target=3.0, battery_max_target=2.5)
    ctl = Controller(TARGETS, PRED, cfg)
    assert ctl.start_request(RequestConstraints(), hot).target == 2.5  # the tighter cap wins
    d = ctl.start_request(RequestConstraints(min_bits=3.5), hot)
    assert d.target == 3.5 and "overridden by min_bits" in d.reason
    # min_bits between targets rounds up: never below
    cool = DeviceState(temperature_c=40.0, battery_percent=90.0, battery_status="Discharging")
    assert ctl.start_request(RequestConstraints(min_bits=3.2), cool).target == 4.0
    # min_bits beats the latency target too
    targets, _ = simulate(ctl, RequestConstraints(max_ms_per_token=14.0, min_bits=3.5), 100,
                          slowdown=lambda i: 2.0)
    assert min(targets) == 3.5
    assert "lowest allowed" in ctl.history[-1].reason or ctl.history[-1].target == 3.5
    # a fixed target is subject to nothing else
    d = ctl.start_request(RequestConstraints(target_bits=4.0), hot)
    assert (d.target, d.policy, d.reason) == (4.0, "fixed", "fixed target_bits")
    targets, _ = simulate(ctl, RequestConstraints(target_bits=4.0, max_ms_per_token=5.0), 30, slowdown=lambda i: 3.0)
    assert set(targets) == {4.0}


def test_cap_lowers_the_target_immediately_mid_request():
    ctl = Controller(TARGETS, PRED)
    d = ctl.start_request(RequestConstraints(max_ms_per_token=14.0), DeviceState(temperature_c=50.0))
    assert d.target == 4.0
    ctl.observe(4.0, 12.0)
    d = ctl.step(DeviceState(temperature_c=95.0))
    assert d.target == 3.0 and d.changed and "thermal cap" in d.reason


# ---------------------------------------------------------------------------------------------------------------------
# controller: bandit


def test_bandit_converges_to_the_best_feasible_target():
    """The latency model is wrong about 3.5 and 4.0 (really 16 and 17 ms against a 14 ms target): the bandit
    learns that 3.0 is the best target that keeps tokens in time."""
    true_ms = {2.5: 6.0, 3.0: 8.0, 3.5: 16.0, 4.0: 17.0}
    ctl = Controller(TARGETS, PRED, ControlConfig(seed=0))
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=14.0, policy="bandit"), 1500, true_ms=true_ms,
                           seed=3)
    tail = targets[-500:]
    assert tail.count(3.0) / len(tail) >= 0.9
    assert attainment(ms, 14.0) >= 0.95
    assert all(d.policy == "bandit" for d in ctl.history)


def test_bandit_adapts_when_a_competitor_starts_and_stops():
    ctl = Controller(TARGETS, PRED, ControlConfig(seed=1))
    targets, ms = simulate(ctl, RequestConstraints(max_ms_per_token=14.0, policy="bandit"), 1200,
                           slowdown=lambda i: 2.0 if 400 <= i < 800 else 1.0, seed=2)
    assert targets[350:400].count(4.0) >= 40
    assert targets[450:800].count(2.5) / 350 >= 0.9
    assert targets[1100:].count(4.0) >= 80
    assert attainment(ms, 14.0) >= 0.97


def test_bandit_is_reproducible_with_a_seed():
    runs = []
    for _ in range(2):
        ctl = Controller(TARGETS, PRED, ControlConfig(seed=7))
        runs.append(simulate(ctl, RequestConstraints(max_ms_per_token=13.0, policy="bandit"), 300, sigma=0.1)[0])
    assert runs[0] == runs[1]


def test_default_policy_bandit_from_config():
    ctl = Controller(TARGETS, PRED, ControlConfig(default_policy="bandit", seed=0))
    assert ctl.start_request(RequestConstraints(max_ms_per_token=20.0)).policy == "bandit"


# ---------------------------------------------------------------------------------------------------------------------
# controller: logging, history, errors


def test_every_decision_is_logged_with_its_reason(caplog):
    ctl = Controller(TARGETS, PRED, ControlConfig(history=5))
    with caplog.at_level(logging.DEBUG, logger="bitdial.control"):
        simulate(ctl, RequestConstraints(max_ms_per_token=14.0), 20)
    msgs = [r.getMessage() for r in caplog.records if r.name == "bitdial.control" and "control: step" in r.getMessage()]
    assert len(msgs) == 21  # the start and one per step
    assert "highest target predicted within 14 ms" in msgs[0] and "hold" in msgs[-1]
    assert len(ctl.history) == 5 and ctl.history[-1].step == 20


def test_constraint_errors():
    with pytest.raises(ValueError, match="max_ms_per_token must be positive"):
        RequestConstraints(max_ms_per_token=-5)
    with pytest.raises(ValueError, match="max_ms_per_token must be a finite number"):
        RequestConstraints(max_ms_per_token=float("nan"))
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        RequestConstraints(policy="greedy")
    with pytest.raises(ValueError, match="policy 'fixed' needs target_bits"):
        RequestConstraints(policy="fixed")
    with pytest.raises(ValueError, match="cannot be combined with policy 'bandit'"):
        RequestConstraints(target_bits=3.0, policy="bandit")
    with pytest.raises(ValueError, match="below min_bits"):
        RequestConstraints(target_bits=3.0, min_bits=3.5)
    with pytest.raises(ValueError, match="min_bits must be >= 0"):
        RequestConstraints(min_bits=-1)
    with pytest.raises(ValueError, match="target_bits must be a finite number"):
        RequestConstraints(target_bits="4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown constraint.*max_ms"):
        RequestConstraints.from_dict({"max_ms": 20})
    assert RequestConstraints.from_dict({"max_ms_per_token": 20, "policy": "bandit"}).policy == "bandit"
    ctl = Controller(TARGETS, PRED)
    with pytest.raises(ValueError, match=r"target_bits 3.25 is not an available target: 2.5, 3, 3.5, 4"):
        ctl.start_request(RequestConstraints(target_bits=3.25))
    with pytest.raises(ValueError, match="min_bits 5.0 is above the highest available target 4.0"):
        ctl.start_request(RequestConstraints(min_bits=5.0))
    with pytest.raises(RuntimeError, match="start_request"):
        ctl.step()
    ctl.start_request(RequestConstraints())
    with pytest.raises(ValueError, match="ms_per_token must be positive"):
        ctl.observe(4.0, 0.0)
    with pytest.raises(ValueError, match="target 5.0 is not an available target"):
        ctl.observe(5.0, 10.0)


def test_controller_and_config_errors():
    with pytest.raises(ValueError, match="targets is empty"):
        Controller([], {})
    with pytest.raises(ValueError, match="no prediction for target 4.0"):
        Controller(TARGETS, {2.5: 6.0, 3.0: 8.0, 3.5: 10.0})
    with pytest.raises(ValueError, match=r"latency_ms\[2.5\] must be positive"):
        Controller(TARGETS, {**PRED, 2.5: 0.0})
    assert Controller(TARGETS, {str(k): v for k, v in PRED.items()}).latency_ms == PRED  # JSON keys
    with pytest.raises(ValueError, match="up_margin must be in"):
        ControlConfig(up_margin=1.5)
    with pytest.raises(ValueError, match="min_dwell must be a positive integer"):
        ControlConfig(min_dwell=0)
    with pytest.raises(ValueError, match="default_policy"):
        ControlConfig(default_policy="fixed")
    with pytest.raises(ValueError, match="bandit_gamma"):
        ControlConfig(bandit_gamma=0.0)


def test_replay_speed_must_be_positive():
    with pytest.raises(ValueError, match="speed must be positive"):
        ReplayProvider([{"t": 0}], speed=0)


def test_module_logger_name():
    assert tm.log.name == "bitdial.control"
