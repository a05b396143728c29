"""Adaptive precision under a real CPU competitor: latency-target attainment and realized bits (issue 7).

    python benchmarks/adaptive_control.py --artifact A.bitdial [--duration 300] [--max-ms-per-token X]
        [--policies fixed4,best-fixed,rule,bandit] [--competitor-schedule middle] [--threads 2]
        [--thermal-trace F|demo] [--battery-trace F|demo]
        [--out benchmarks/results/adaptive_control.json] [--plot benchmarks/results/adaptive_control.png]

The artifact needs dynamic-precision policies (`bitdial calibrate A.bitdial --targets 2.5,3,3.5,4 ...`).
Every policy runs for ``--duration`` seconds of back-to-back chat requests (MT-Bench first turns, chat
template applied, ``--max-tokens`` greedy tokens, end-of-sequence ignored) while a **competitor** — a busy
process pinned to one core — starts and stops on a schedule (default: on for the middle half of the run).
Each run has the same timeline, so the policies see the same conditions:

* ``fixed4``: fixed target 4.0 bits (the highest stored target if 4.0 is not stored);
* ``best-fixed``: the highest fixed target that keeps ``--attain`` (95%) of tokens within the latency
  target *with the competitor on*: found by a short probe (``--best-fixed probe``, each target for
  ``--probe-seconds`` under the competitor, highest first), given (``--best-fixed 3.0``), or taken from
  full runs of every fixed target (``--best-fixed sweep``);
* ``rule``, ``bandit``: the precision controller (:mod:`bitdial.control`), wired to the engine exactly as
  ``bitdial serve`` wires it (:mod:`bitdial.serving.precision`: ``probe_latency`` for its idle latency model
  — here run with torch on the decode thread count, as ``stream_generate`` decodes —,
  ``ControlAdapter``/``PrecisionSession`` for start/observe/step/end per request), with device telemetry
  (real CPU state, merged with the optional scripted thermal/battery traces, read at most every
  ``--telemetry-interval`` s). A fresh controller per policy run.
* also ``fixed-<T>`` (one stored target) and ``fixed-all`` (every stored target).

Without ``--max-ms-per-token`` the latency target is calibrated: ``--calib-factor`` (1.15) × the median
idle ms/token of ``fixed4`` measured on this workload for ``--calib-seconds``, so fixed 4-bit meets it
idle and misses it under the competitor. The choice is printed.

With ``--adapt-threads`` the adaptive policies also choose each request's thread count (the cores the
competitor leaves free, see docs/control.md): their latency model is then probed at every thread count up to
``--threads``, as `bitdial serve --adapt-threads` does. Otherwise (the default) every policy keeps ``--threads``.
``--arrival-interval S`` makes the workload open loop (a request
arrives every S s; one that finds the previous still running starts when it ends), so that the competitor
period holds the same share of the requests for every policy; the default is back to back, where a slower
policy runs fewer requests while the competitor is on.

Per request it records the prefill time (time to first token) and the threads; per decode step it records the time in the run, ms/token, the target in effect, the realized bits, the
competitor state and the device state (CPU utilization, other processes' cores, the expected slowdown,
temperature and battery when known). Per policy: the fraction of tokens within the latency target (all,
competitor on, off), mean realized bits (all, on, off: the quality proxy; the stored policies hold no
expected KL), target switches, ms percentiles. The acceptance
reading (issue 7): the controller keeps >= 95% of tokens within the target while fixed 4-bit misses >= 30%,
at realized bits no lower than the best fixed target's. Writes JSON (summaries, the per-step series
— binned above ``--max-points`` steps per policy —, every target switch with its reason), prints a table
and draws a time-series plot (competitor periods shaded red, hot/low-battery periods orange/blue).

``--competitor-schedule``: ``middle`` (on from 25% to 75% of the run; ``middle:0.2:0.6`` other fractions),
``alternate`` (60 s off / 60 s on; ``alternate:30:90``), ``always``, ``none``, or intervals in seconds or
percent of the run (``60-120,200-260`` or ``25%-75%``). The competitor (``--competitor-kind``: ``python``
busy loop, ``numpy`` matmuls, ``memory`` streaming copies) is a separate process pinned with
``os.sched_setaffinity`` to ``--competitor-core`` (default: the last core this process may use). It is
killed at the end of its period, at the end of every run, on Ctrl-C/SIGTERM (atexit, try/finally) and —
should this process die without cleaning up — by the kernel (PR_SET_PDEATHSIG) or its own parent check.

``demo`` traces: the temperature is 55 °C, then 85 °C (over the controller's 80 °C thermal cap) for
min(60 s, 20% of the run) from 78% of the run (after the default competitor period), then 65 °C; the
battery discharges from 60% to 10% over the run (below the 20% cap from 80% of it). A trace file is a JSON
list or JSONL of ``{"t": s, field: value}`` records (docs/control.md); each run replays it from t = 0 over
the real telemetry (its known fields win). Fixed policies ignore caps by definition.

Smoke test (a tiny artifact, a few seconds per phase):

    python benchmarks/adaptive_control.py --artifact tiny.bitdial --duration 20 --calib-seconds 4 \\
        --probe-seconds 3 --out /tmp/ac.json --plot /tmp/ac.png
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

from bitdial.artifact import open_artifact
from bitdial.control import ControlConfig, Controller, ReplayProvider, RequestConstraints, Telemetry, default_providers
from bitdial.planning.device import kernel_threads
from bitdial.policies import stored_targets
from bitdial.runtime.engine import Engine
from bitdial.runtime.generate import GenerationResult, SamplingParams, StepInfo, stream_generate
from bitdial.serving.precision import (ControlAdapter, PrecisionPlan, PrecisionSession, backend_for, probe_latency,
                                       set_compute_threads)

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data"
DEFAULT_PROMPTS = DATA / "mt_bench" / "question.jsonl"
ADAPTIVE = ("rule", "bandit")
console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("adaptive_control")


# ------------------------------------------------------------------------------------------ competitor
# A busy process. It ignores the terminal's Ctrl-C (the parent kills it), asks the kernel to kill it when
# the parent dies (PR_SET_PDEATHSIG) and also exits by itself when its parent changes.
_BUSY = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
core, kind, ppid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if core >= 0:
    try:
        os.sched_setaffinity(0, {core})
    except OSError:
        pass
if kind == "numpy":
    import numpy as np
    a = np.random.rand(192, 192).astype(np.float32)
    b = np.random.rand(192, 192).astype(np.float32)
    while os.getppid() == ppid:
        for _ in range(200):
            c = a @ b
elif kind == "memory":
    import numpy as np
    a = np.ones(16 << 20, dtype=np.float32)  # 64 MiB: far beyond the caches
    b = np.empty_like(a)
    while os.getppid() == ppid:
        np.copyto(b, a)
else:
    while os.getppid() == ppid:
        for _ in range(200000):
            pass
"""

_LIVE: set[subprocess.Popen] = set()  # every competitor process this script started and has not reaped


def _kill(p: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # already gone, or not reapable
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)
    _LIVE.discard(p)


def kill_all_competitors() -> None:
    for p in list(_LIVE):
        _kill(p)


atexit.register(kill_all_competitors)


class Competitor:
    """``procs`` busy processes pinned to ``core`` (-1: not pinned), started and stopped on demand."""

    def __init__(self, core: int, kind: str = "python", procs: int = 1) -> None:
        self.core, self.kind, self.procs = core, kind, procs
        self._ps: list[subprocess.Popen] = []

    @property
    def running(self) -> bool:
        return bool(self._ps)

    def start(self) -> None:
        if self._ps:
            return
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for _ in range(self.procs):
            p = subprocess.Popen([sys.executable, "-c", _BUSY, str(self.core), self.kind, str(os.getpid())],
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            _LIVE.add(p)
            self._ps.append(p)
            if self.core >= 0:
                try:
                    os.sched_setaffinity(p.pid, {self.core})  # at once, not after the child's startup
                except OSError:
                    pass

    def stop(self) -> None:
        ps, self._ps = self._ps, []
        for p in ps:
            _kill(p)


def parse_schedule(spec: str, duration: float) -> list[tuple[float, float]]:
    """On-periods ``[(start, end), ...]`` in seconds from the start of a run."""
    s = spec.strip().lower()
    if s in ("none", "off", ""):
        return []
    if s in ("always", "on"):
        return [(0.0, math.inf)]
    if s.startswith("middle"):
        parts = s.split(":")
        a, b = (float(parts[1]), float(parts[2])) if len(parts) == 3 else (0.25, 0.75)
        if not 0 <= a < b:
            raise ValueError(f"competitor schedule {spec!r}: need 0 <= start < end fractions")
        return [(a * duration, b * duration)]
    if s.startswith("alternate"):
        parts = s.split(":")
        off, on = (float(parts[1]), float(parts[2])) if len(parts) == 3 else (60.0, 60.0)
        if off < 0 or on <= 0:
            raise ValueError(f"competitor schedule {spec!r}: need off >= 0 and on > 0 seconds")
        out, t = [], off
        while t < duration:
            out.append((t, t + on))
            t += on + off
        return out

    def point(x: str) -> float:
        x = x.strip()
        return float(x[:-1]) / 100 * duration if x.endswith("%") else float(x)

    out = []
    for part in s.split(","):
        try:
            a, b = part.split("-")
            iv = (point(a), point(b))
        except ValueError:
            raise ValueError(f"competitor schedule {spec!r}: expected middle, alternate[:OFF:ON], always, none or "
                             "intervals like 60-120,200-260 or 25%-75%") from None
        if not 0 <= iv[0] < iv[1]:
            raise ValueError(f"competitor schedule {spec!r}: interval {part!r} is empty or negative")
        out.append(iv)
    return sorted(out)


class Scheduler:
    """Turns the competitor on and off on the schedule, from a thread that sleeps between transitions;
    ``events`` holds the measured (seconds, on) transitions."""

    def __init__(self, competitor: Competitor | None, intervals: list[tuple[float, float]]) -> None:
        self.comp = competitor
        self.intervals = intervals if competitor is not None else []
        self.events: list[tuple[float, bool]] = []
        self.on = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def wanted(self, e: float) -> bool:
        return any(a <= e < b for a, b in self.intervals)

    def _next(self, e: float) -> float | None:
        ts = [x for a, b in self.intervals for x in (a, b) if x > e and math.isfinite(x)]
        return min(ts) if ts else None

    def _run(self) -> None:
        while not self._stop.is_set():
            e = time.monotonic() - self.t0
            want = self.wanted(e)
            if want != self.on:
                if want:
                    self.comp.start()
                else:
                    self.comp.stop()
                self.on = want
                self.events.append((round(time.monotonic() - self.t0, 3), want))
            nxt = self._next(e)
            self._stop.wait(None if nxt is None else max(0.0, nxt - (time.monotonic() - self.t0)) + 1e-3)

    def start(self, t0: float) -> None:
        self.t0 = t0
        if self.intervals:
            self._thread = threading.Thread(target=self._run, name="competitor-schedule", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.comp is not None:
            self.comp.stop()
        if self.on:
            self.events.append((round(time.monotonic() - self.t0, 3), False))
            self.on = False


# -------------------------------------------------------------------------------------------- traces
def demo_trace(kind: str, duration: float) -> list[dict[str, Any]]:
    if kind == "thermal":
        a = 0.78 * duration
        return [{"t": 0, "temperature_c": 55.0}, {"t": round(a, 3), "temperature_c": 85.0},
                {"t": round(a + min(60.0, 0.2 * duration), 3), "temperature_c": 65.0}]
    out = [{"t": 0, "battery_percent": 60.0, "battery_status": "Discharging", "on_ac": False}]
    for i in range(1, 21):  # 60% -> 10% in 20 steps over the run
        out.append({"t": round(i / 20 * duration, 3), "battery_percent": round(60.0 - 50.0 * i / 20, 2)})
    return out


def load_trace(spec: str | None, kind: str, duration: float) -> list[dict[str, Any]] | None:
    if not spec:
        return None
    recs = demo_trace(kind, duration) if spec == "demo" else spec
    return ReplayProvider(recs).records  # validates (ValueError naming the bad record)


def make_telemetry(traces: list[list[dict[str, Any]]], interval: float) -> tuple[Telemetry, list[ReplayProvider]]:
    """The real providers, then the traces (a later provider's known values win), primed: the first CPU
    reading covers the time since the providers were made, so it waits a moment and reads once (else the
    first request would start from a utilization measured over a millisecond)."""
    replays = [ReplayProvider(tr) for tr in traces]
    tel = Telemetry(default_providers() + replays, min_interval=interval)
    time.sleep(0.3)
    tel.read()
    return tel, replays


# ------------------------------------------------------------------------------------------ workload
def load_prompts(path: Path, tokenizer, max_tokens: int, ctx: int, limit: int) -> list[list[int]]:
    """Chat-templated prompt ids: MT-Bench (first turn), AlpacaEval (instruction), ``prompt``/``text`` JSONL, or
    one prompt per non-blank line of a text file. Prompts that leave no room for ``max_tokens`` are dropped."""
    texts = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            d = json.loads(line)
            t = (d.get("turns") or [None])[0] or d.get("instruction") or d.get("prompt") or d.get("text")
            if t:
                texts.append(str(t))
        else:
            texts.append(line)
    out = []
    for t in texts[:limit] if limit else texts:
        ids = tokenizer.encode_chat([{"role": "user", "content": t}])
        if len(ids) + max_tokens <= ctx:
            out.append(ids)
    if not out:
        raise SystemExit(f"no prompt in {path} fits the context ({ctx}) with max_tokens {max_tokens}")
    return out


# ---------------------------------------------------------------------------------------------- runs
COLS = ("t", "req", "step", "ms", "target", "bits", "head", "threads", "comp", "cpu", "other", "prior", "temp", "batt",
        "hook_ms")


class Run:
    """One policy for one timeline: back-to-back requests, per-step records."""

    def __init__(self, name: str, policy: str, target: float | None) -> None:
        self.name, self.policy, self.target = name, policy, target
        self.cols: dict[str, list] = {c: [] for c in COLS}
        self.events: list[dict[str, Any]] = []  # target switches, and requests that start at another target
        self.competitor_events: list[tuple[float, bool]] = []
        self.requests = 0
        self.mid_request_switches = 0
        self.wall_s = 0.0
        self.controller_stats: dict[str, Any] | None = None
        self.complete = False
        self.reqs: list[dict[str, Any]] = []  # per request: start, competitor, threads, prefill ms


def run_policy(name: str, policy: str, target: float | None, *, eng, backend, prompts: list[list[int]],
               params: SamplingParams, duration: float, intervals: list[tuple[float, float]],
               competitor: Competitor | None, max_ms: float | None, latency_ms: dict[float, float],
               traces: list[list[dict[str, Any]]], args, first_prompt: int = 0,
               thread_latency_ms: dict[int, dict[float, float]] | None = None,
               progress: Callable[[str], None] | None = None, sink: list[Run] | None = None) -> Run:
    """Run one policy for ``duration`` s; ``sink`` gets the run at once (so an interrupted run is kept)."""
    run = Run(name, policy, target)
    if sink is not None:
        sink.append(run)
    tel, replays = make_telemetry(traces, args.telemetry_interval)
    control = None
    if policy in ADAPTIVE:
        cfg = ControlConfig(threads=args.threads, seed=args.seed, adapt_threads=args.adapt_threads, carry_s=args.carry_s)
        control = ControlAdapter(Controller(backend.targets, latency_ms, config=cfg,
                                            thread_latency_ms=thread_latency_ms), tel, RequestConstraints)
    sched = Scheduler(competitor, intervals)
    cancel = threading.Event()
    t0 = time.monotonic()
    for r in replays:  # every run replays its traces from t = 0
        r.reset()
    sched.start(t0)
    c = run.cols
    threads = args.threads
    try:
        i = first_prompt
        last_report = 0.0
        while time.monotonic() - t0 < duration:
            if args.arrival_interval > 0:  # open loop: request i arrives at i x interval, whatever the speed
                wait = t0 + (i - first_prompt) * args.arrival_interval - time.monotonic()
                if wait > 0:
                    if cancel.wait(min(wait, duration - (time.monotonic() - t0))):
                        break
                    if time.monotonic() - t0 >= duration:
                        break
            ids = prompts[i % len(prompts)]
            plan = PrecisionPlan(policy, target if policy == "fixed" else None, max_ms, args.min_bits)
            session = PrecisionSession(plan, backend, control)
            req_t0, comp_at_start = time.monotonic(), sched.on
            session.start()
            req = run.requests
            prev = run.events[-1]["to"] if run.events else None
            if not run.events or session.current != prev:  # a request that starts at another target
                run.events.append({"t": round(time.monotonic() - t0, 3), "req": req, "step": -1, "from": prev,
                                   "to": session.current, "reason": session.reason})

            def hook(info: StepInfo, session=session, req=req) -> None:
                h0 = time.perf_counter()
                e = time.monotonic() - t0
                ran_at = session.current
                head_width = eng.head_width
                st = tel.read()
                session.step_hook(info)
                if session.current != ran_at:
                    run.events.append({"t": round(e, 3), "req": req, "step": info.step, "from": ran_at,
                                       "to": session.current, "reason": session.reason})
                c["t"].append(round(e, 4))
                c["req"].append(req)
                c["step"].append(info.step)
                c["ms"].append(round(info.seconds * 1e3, 3))
                c["target"].append(ran_at)
                c["bits"].append(round(info.bits, 4) if info.bits == info.bits else None)
                c["head"].append(head_width)  # the output head's width in this step (--head-bits)
                c["threads"].append(session.threads or threads)  # the kernel threads this step ran on
                c["comp"].append(int(sched.on))
                c["cpu"].append(None if st.cpu_util is None else round(st.cpu_util, 3))
                oc = st.other_cpu_cores
                c["other"].append(None if oc is None else round(oc, 3))
                c["prior"].append(round(st.expected_slowdown(threads), 3))
                c["temp"].append(st.temperature_c)
                c["batt"].append(st.battery_percent)
                if e >= duration:
                    cancel.set()
                c["hook_ms"].append(round((time.perf_counter() - h0) * 1e3, 4))

            res = GenerationResult()
            for _ in stream_generate(eng.model, eng.tokenizer, ids, params, res, step_hook=hook, cancel=cancel):
                pass
            session.finish()
            run.reqs.append({"t": round(req_t0 - t0, 3), "comp": int(comp_at_start), "threads": session.threads,
                             "prefill_ms": round(res.prefill_s * 1e3, 2), "tokens": res.completion_tokens})
            run.mid_request_switches += session.switches
            run.requests += 1
            i += 1
            e = time.monotonic() - t0
            if progress is not None and e - last_report >= 10:
                last_report = e
                progress(f"{name}: {e:.0f}/{duration:g} s, {len(c['ms'])} tokens, competitor "
                         f"{'on' if sched.on else 'off'}, target {_fmt_t(session.current)}")
    finally:
        sched.stop()
        run.wall_s = time.monotonic() - t0
        run.competitor_events = list(sched.events)
        if control is not None:
            run.controller_stats = control.controller.stats()
    run.complete = True
    return run


# ------------------------------------------------------------------------------------------- metrics
def _fmt_t(t: float | None) -> str:
    return "as loaded" if t is None else f"{t:g}"


def _mean(xs: list) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.fmean(v) if v else None


def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(run: Run, max_ms: float | None) -> dict[str, Any]:
    c = run.cols
    idx = list(range(len(c["t"])))
    groups = {"all": idx, "on": [k for k in idx if c["comp"][k]], "off": [k for k in idx if not c["comp"][k]]}
    out: dict[str, Any] = {"name": run.name, "policy": run.policy, "fixed_target": run.target,
                           "requests": run.requests, "tokens": len(idx), "wall_s": round(run.wall_s, 2)}
    for g, ks in groups.items():
        ms = [c["ms"][k] for k in ks]
        d: dict[str, Any] = {"tokens": len(ks)}
        if ks:
            d["within"] = sum(m <= max_ms for m in ms) / len(ms) if max_ms else None
            d["realized_bits"] = _mean([c["bits"][k] for k in ks])
            d["mean_target"] = _mean([c["target"][k] for k in ks])
            d["head_bits"] = _mean([c["head"][k] for k in ks])
            d["ms_p50"], d["ms_p95"], d["ms_p99"] = _q(ms, 0.5), _q(ms, 0.95), _q(ms, 0.99)
            d["tokens_per_s"] = 1e3 / statistics.fmean(ms)
            by: dict[str, Any] = {}  # per (threads, target): where the misses are
            for key in sorted({(c["threads"][k], c["target"][k]) for k in ks}, key=lambda x: (x[0] or 0, x[1] or 0)):
                sel = [c["ms"][k] for k in ks if (c["threads"][k], c["target"][k]) == key]
                by[f"{key[0]} thr @ {_fmt_t(key[1])}"] = {
                    "tokens": len(sel), "ms_p50": _q(sel, 0.5),
                    "within": sum(m <= max_ms for m in sel) / len(sel) if max_ms else None}
            d["by_threads_target"] = by
        out[g] = d
    tg = [c["target"][k] for k in idx]
    out["target_switches"] = sum(1 for a, b in itertools.pairwise(tg) if a != b)  # across requests too
    out["mid_request_switches"] = run.mid_request_switches
    out["target_share"] = {_fmt_t(t): tg.count(t) / len(tg) for t in sorted(set(tg), key=lambda x: x or 0.0)}
    out["hook_ms_mean"] = _mean(c["hook_ms"])
    for g, want in (("all", None), ("on", 1), ("off", 0)):  # time to first token: the prefill of each request
        pf = [r["prefill_ms"] for r in run.reqs if want is None or r["comp"] == want]
        out[g]["requests"] = len(pf)
        out[g]["prefill_ms_p50"], out[g]["prefill_ms_p95"] = _q(pf, 0.5), _q(pf, 0.95)
    th = [r["threads"] for r in run.reqs]
    out["threads_share"] = {str(n): th.count(n) / len(th) for n in sorted(set(th), key=lambda x: x or 0)} if th else {}
    out["competitor_events"] = run.competitor_events
    if run.controller_stats is not None:
        out["controller"] = run.controller_stats
    return out


def binned_series(run: Run, max_points: int) -> dict[str, Any]:
    """The per-step columns; above ``max_points`` steps, means over bins of k consecutive steps (``ms_max``
    and ``within`` keep what the means hide; ``target`` is the bin's mean)."""
    c = run.cols
    n = len(c["t"])
    if n <= max_points:
        return {"binned": 1, **{k: list(v) for k, v in c.items()}}
    k = math.ceil(n / max_points)
    out: dict[str, Any] = {"binned": k, **{col: [] for col in COLS}, "ms_max": []}
    for a in range(0, n, k):
        for col in COLS:
            v = [x for x in c[col][a:a + k] if x is not None]
            out[col].append(round(statistics.fmean(v), 4) if v else None)
        out["ms_max"].append(max(c["ms"][a:a + k]))
    return out


# ---------------------------------------------------------------------------------------------- plot
def _intervals(events: list[tuple[float, bool]], end: float) -> list[tuple[float, float]]:
    out, start = [], None
    for t, on in events:
        if on and start is None:
            start = t
        elif not on and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def _flag_intervals(ts: list[float], flags: list[bool]) -> list[tuple[float, float]]:
    out, start = [], None
    for t, f in zip(ts, flags):
        if f and start is None:
            start = t
        elif not f and start is not None:
            out.append((start, t))
            start = None
    if start is not None and ts:
        out.append((start, ts[-1]))
    return out


def _rolling(ts: list[float], ys: list[float], window_s: float, fn) -> tuple[list[float], list[float]]:
    """``fn`` over consecutive windows of ``window_s`` seconds (one point per window)."""
    xs, vs, cur, start = [], [], [], None
    for t, y in zip(ts, ys):
        if y is None:
            continue
        if start is None:
            start = t
        if t - start >= window_s and cur:
            xs.append(start + window_s / 2)
            vs.append(fn(cur))
            cur, start = [], t
        cur.append(y)
    if cur:
        xs.append(start + window_s / 2)
        vs.append(fn(cur))
    return xs, vs


def plot(runs: list[Run], summaries: dict[str, dict], max_ms: float | None, duration: float, path: Path,
         hot_c: float | None, low_batt: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.6 * len(runs) + 0.6), sharex=True, squeeze=False)
    win = max(0.5, duration / 300)
    ts = [t for r in runs for t in r.cols["target"] if t is not None]
    bs = [b for r in runs for b in r.cols["bits"] if b is not None]
    blim = (min(ts + bs, default=2.0) - 0.25, max(ts + bs, default=4.0) + 0.25)  # one bits scale for every row
    for ax, run in zip(axes[:, 0], runs):
        c, s = run.cols, summaries[run.name]
        for a, b in _intervals(run.competitor_events, run.wall_s):
            ax.axvspan(a, b, color="tab:red", alpha=0.10, lw=0)
        if hot_c is not None and any(x is not None for x in c["temp"]):
            for a, b in _flag_intervals(c["t"], [x is not None and x >= hot_c for x in c["temp"]]):
                ax.axvspan(a, b, color="tab:orange", alpha=0.15, lw=0)
        if low_batt is not None and any(x is not None for x in c["batt"]):
            for a, b in _flag_intervals(c["t"], [x is not None and x < low_batt for x in c["batt"]]):
                ax.axvspan(a, b, color="tab:blue", alpha=0.08, lw=0)
        ax.scatter(c["t"], c["ms"], s=1.5, color="tab:gray", alpha=0.35, lw=0, label="ms/token")
        xs, ys = _rolling(c["t"], c["ms"], win, statistics.median)
        ax.plot(xs, ys, color="black", lw=1.0, label=f"median over {win:g} s")
        if max_ms:
            ax.axhline(max_ms, color="tab:red", ls="--", lw=1.0, label=f"max {max_ms:.1f} ms")
            top = max(ys) if ys else max_ms
            ax.set_ylim(0, min(max(1.6 * max_ms, 1.1 * top), 4 * max_ms))
        ax.set_ylabel("ms / token")
        ax2 = ax.twinx()
        ax2.step(c["t"], c["target"], where="post", color="tab:blue", lw=1.2, label="target")
        xb, yb = _rolling(c["t"], c["bits"], win, statistics.fmean)
        ax2.plot(xb, yb, color="tab:green", lw=0.9, alpha=0.8, label="realized bits")
        ax2.set_ylabel("bits")
        ax2.set_ylim(*blim)
        w = s["all"].get("within")
        ax.set_title(f"{run.name}: {w:.1%} of tokens within target (on {s['on'].get('within') or 0:.1%}, "
                     f"off {s['off'].get('within') or 0:.1%}), realized {s['all'].get('realized_bits') or 0:.2f} "
                     f"bits, {s['target_switches']} switches" if w is not None else run.name, fontsize=9)
        if ax is axes[0, 0]:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7, ncol=5, markerscale=4)
    axes[-1, 0].set_xlabel("seconds into the run (red: competitor on; orange: hot; blue: low battery)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_policies(spec: str, targets: list[float]) -> list[tuple[str, str, float | None]]:
    """(name, policy, fixed target or None; best-fixed is resolved later) per requested policy."""
    out: list[tuple[str, str, float | None]] = []
    for p in (x.strip() for x in spec.split(",") if x.strip()):
        if p == "fixed4":
            out.append(("fixed4", "fixed", 4.0 if 4.0 in targets else targets[-1]))
        elif p == "best-fixed":
            out.append(("best-fixed", "fixed", None))
        elif p in ADAPTIVE:
            out.append((p, p, None))
        elif p == "fixed-all":
            out += [(f"fixed-{t:g}", "fixed", t) for t in targets]
        elif p.startswith("fixed"):
            try:
                t = float(p[5:].lstrip("-:"))
            except ValueError:
                raise SystemExit(f"--policies: unknown policy {p!r}") from None
            if t not in targets:
                have = ", ".join(f"{x:g}" for x in targets)
                raise SystemExit(f"--policies {p}: no stored target {t:g} (stored: {have})")
            out.append((f"fixed-{t:g}", "fixed", t))
        else:
            raise SystemExit(f"--policies: unknown policy {p!r} (fixed4, best-fixed, rule, bandit, fixed-T, fixed-all)")
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"--policies names a policy twice: {spec}")
    return out


def measure_latency(model, backend, rounds: int, steps: int) -> dict[float, float]:
    """``probe_latency`` (what `bitdial serve` measures at startup) repeated; the median per target, made
    monotone in the target again (``probe_latency`` runs with the decode thread setting, as ``stream_generate``
    decodes)."""
    runs = [probe_latency(model, backend, steps=steps) for _ in range(rounds)]
    out = {t: statistics.median(r[t] for r in runs) for t in backend.targets}
    m = 0.0
    for t in sorted(out):
        m = out[t] = max(out[t], m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="a .bitdial artifact with dynamic policies")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds per policy run")
    ap.add_argument("--max-ms-per-token", type=float, default=None, help="latency target (default: calibrated)")
    ap.add_argument("--calib-factor", type=float, default=1.15, help="max ms = factor x idle median ms at fixed4")
    ap.add_argument("--calib-seconds", type=float, default=20.0)
    ap.add_argument("--policies", default="fixed4,best-fixed,rule,bandit")
    ap.add_argument("--carry-s", type=float, default=0.0,
                    help="rule: continue a request from the previous one's target, dwell and backoff when it starts "
                         "within this many seconds (ControlConfig.carry_s; 0: fresh start, the default)")
    ap.add_argument("--best-fixed", default="probe", help="probe | sweep | a stored target")
    ap.add_argument("--probe-seconds", type=float, default=15.0, help="per target, competitor on (best-fixed probe)")
    ap.add_argument("--attain", type=float, default=0.95,
                    help="fraction of tokens within the latency target that counts as meeting it")
    ap.add_argument("--competitor-schedule", default="middle")
    ap.add_argument("--competitor-kind", choices=("python", "numpy", "memory"), default="python")
    ap.add_argument("--competitor-core", type=int, default=None, help="default: the last usable core; -1: unpinned")
    ap.add_argument("--competitor-procs", type=int, default=1)
    ap.add_argument("--thermal-trace", default=None, help="a trace file, or 'demo'")
    ap.add_argument("--battery-trace", default=None, help="a trace file, or 'demo'")
    ap.add_argument("--telemetry-interval", type=float, default=0.5, help="seconds between real telemetry reads")
    ap.add_argument("--min-bits", type=float, default=None, help="the controller requests' min_bits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapt-threads", action=argparse.BooleanOptionalAction, default=False,
                    help="let the adaptive policies leave busy cores alone (fewer threads; default off, as in "
                         "bitdial serve)")
    ap.add_argument("--head-bits", default=None,
                    help="output head width per target, e.g. 2=4,2.5=5 (as `bitdial serve --head-bits`; every "
                         "policy runs the same targets, so a fixed target gets its head width too)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                    help="JSONL (MT-Bench, AlpacaEval, prompt/text) or a text file with one prompt per line")
    ap.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--latency-probe-rounds", type=int, default=3)
    ap.add_argument("--latency-probe-steps", type=int, default=12)
    ap.add_argument("--gap", type=float, default=3.0, help="idle seconds between runs")
    ap.add_argument("--arrival-interval", type=float, default=0.0,
                    help="open loop: a request arrives every this many seconds (0: back to back)")
    ap.add_argument("--seed", type=int, default=0, help="the bandit's seed")
    ap.add_argument("--max-points", type=int, default=6000, help="per-step series kept per policy before binning")
    ap.add_argument("--out", default=str(ROOT / "results" / "adaptive_control.json"))
    ap.add_argument("--plot", default=None, help="time-series plot (default: --out with .png; 'none' for no plot)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every controller switch (bitdial.control)")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def on_signal(sig, _frame):  # SIGTERM/SIGHUP as Ctrl-C: unwind (competitor killed), write what finished
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # keep nohup's SIGHUP ignored
            signal.signal(sig, on_signal)

    art = open_artifact(args.artifact)
    stored = stored_targets(art)
    art.close()
    if len(stored) < 2:
        raise SystemExit(f"{args.artifact} holds {len(stored)} dynamic polic{'y' if len(stored) == 1 else 'ies'}; "
                         "the controller needs at least two targets: `bitdial calibrate ART --targets 2.5,3,3.5,4 ...`")
    policies = parse_policies(args.policies, stored)
    sweep = args.best_fixed == "sweep"
    if sweep and any(n == "best-fixed" for n, _, _ in policies):  # a full run of every fixed target instead
        have = {t for _, p, t in policies if p == "fixed" and t is not None}
        policies = [x for x in policies if x[0] != "best-fixed"] + \
                   [(f"fixed-{t:g}", "fixed", t) for t in stored if t not in have]
    intervals = parse_schedule(args.competitor_schedule, args.duration)
    traces = [tr for tr in (load_trace(args.thermal_trace, "thermal", args.duration),
                            load_trace(args.battery_trace, "battery", args.duration)) if tr]

    eng = Engine.load(args.artifact, threads=args.threads, dynamic=stored[-1], head_bits=args.head_bits)
    kernel_threads(args.threads)
    backend = backend_for(eng)
    if backend.kind != "dynamic":
        raise SystemExit(f"{args.artifact}: expected dynamic precision, got {backend.kind}")
    targets = backend.targets
    ctx = eng.model.config.max_seq_len
    prompts = load_prompts(Path(args.prompts), eng.tokenizer, args.max_tokens, ctx, args.max_prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_ids=[])
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    core = aff[-1] if args.competitor_core is None else args.competitor_core
    competitor = Competitor(core, args.competitor_kind, args.competitor_procs)
    top = 4.0 if 4.0 in targets else targets[-1]
    if top != 4.0:
        console.print(f"[yellow]no 4.0-bit policy stored: fixed4 runs the highest target, {top:g}[/]")
    console.print(f"[bold]adaptive control[/]: {Path(args.artifact).name}, targets "
                  f"{', '.join(f'{t:g}' for t in targets)}, {args.threads} threads, {len(prompts)} prompts, "
                  f"{args.max_tokens} tokens each; competitor "
                  f"{args.competitor_kind} x{args.competitor_procs} on core {core}, on {intervals or 'never'}")

    common: dict[str, Any] = {"eng": eng, "backend": backend, "prompts": prompts, "params": params,
                              "traces": traces, "args": args, "progress": lambda m: console.print(f"  {m}")}
    result: dict[str, Any] = {"benchmark": "adaptive_control", "artifact": str(args.artifact),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args),
                              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                          "affinity": aff, "torch": torch.__version__},
                              "targets": targets, "competitor": {"core": core, "kind": args.competitor_kind,
                                                                 "procs": args.competitor_procs,
                                                                 "schedule": args.competitor_schedule,
                                                                 "intervals": intervals},
                              "traces": traces, "policies": {}, "series": {}, "switches": {}}
    with contextlib.suppress(ImportError):
        from bitdial import kernels

        result["machine"]["kernel_variant"] = kernels.variant()
    runs: list[Run] = []
    summaries: dict[str, dict] = {}
    interrupted = False
    max_ms = args.max_ms_per_token
    try:
        # -- warm up (page in the weights, every target once), then the controller's latency model
        if args.warmup_seconds > 0:
            for t in targets:
                run_policy("warmup", "fixed", t, duration=args.warmup_seconds / len(targets), intervals=[],
                           competitor=None, max_ms=None, latency_ms={}, **dict(common, traces=[], progress=None))
        latency_ms = measure_latency(eng.model, backend, args.latency_probe_rounds, args.latency_probe_steps)
        result["latency_ms"] = {f"{t:g}": round(v, 3) for t, v in latency_ms.items()}
        thread_latency: dict[int, dict[float, float]] = {}
        for n in range(1, args.threads if args.adapt_threads else 1):  # as `bitdial serve --adapt-threads`
            set_compute_threads(n)
            try:
                thread_latency[n] = measure_latency(eng.model, backend, args.latency_probe_rounds,
                                                    args.latency_probe_steps)
            finally:
                set_compute_threads(args.threads)
        result["thread_latency_ms"] = {str(n): {f"{t:g}": round(v, 3) for t, v in d.items()}
                                       for n, d in thread_latency.items()}
        if thread_latency:
            console.print("... on fewer threads: " + "; ".join(
                f"{n}: " + ", ".join(f"{t:g}: {v:.2f} ms" for t, v in d.items()) for n, d in thread_latency.items()))
        console.print("idle decode-step latency model (probe_latency): "
                      + ", ".join(f"{t:g}: {v:.2f} ms" for t, v in latency_ms.items()))

        # -- the latency target
        if max_ms is None:
            r = run_policy("calibration", "fixed", top, duration=args.calib_seconds, intervals=[], competitor=None,
                           max_ms=None, latency_ms=latency_ms, **dict(common, traces=[], progress=None))
            ms = r.cols["ms"]
            if not ms:
                raise SystemExit("calibration produced no decode steps; raise --calib-seconds")
            med = statistics.median(ms)
            max_ms = round(args.calib_factor * med, 2)
            within = sum(m <= max_ms for m in ms) / len(ms)
            result["calibration"] = {"target": top, "seconds": args.calib_seconds, "tokens": len(ms),
                                     "idle_ms_p50": med, "idle_ms_p95": _q(ms, 0.95), "factor": args.calib_factor,
                                     "max_ms_per_token": max_ms, "fixed_top_within_idle": within}
            console.print(f"[bold]max_ms_per_token = {max_ms:.2f} ms[/] = {args.calib_factor:g} x {med:.2f} ms (idle "
                          f"median at {top:g} bits over {len(ms)} tokens; idle p95 {_q(ms, 0.95):.2f} ms; fixed "
                          f"{top:g} within it idle: {within:.1%})")
            if within < args.attain:
                console.print(f"[yellow]fixed {top:g} already misses more than {1 - args.attain:.0%} of tokens idle "
                              "(noisy machine?): consider a larger --calib-factor[/]")
        else:
            console.print(f"[bold]max_ms_per_token = {max_ms:.2f} ms[/] (given)")
        result["max_ms_per_token"] = max_ms

        # -- best fixed target under the competitor
        best = None
        if any(n == "best-fixed" for n, _, _ in policies) and not sweep:
            if args.best_fixed == "probe":
                probe = {}
                for t in sorted(targets, reverse=True):
                    r = run_policy(f"probe-{t:g}", "fixed", t, duration=args.probe_seconds,
                                   intervals=[(0.0, math.inf)], competitor=competitor, max_ms=max_ms,
                                   latency_ms=latency_ms, **dict(common, traces=[], progress=None))
                    skip = min(1.0, args.probe_seconds / 4)  # the competitor's start-up
                    ms = [m for m, tt in zip(r.cols["ms"], r.cols["t"]) if tt >= skip]
                    w = sum(m <= max_ms for m in ms) / len(ms) if ms else 0.0
                    probe[f"{t:g}"] = {"tokens": len(ms), "within": w, "ms_p50": _q(ms, 0.5), "ms_p95": _q(ms, 0.95)}
                    console.print(f"  probe under the competitor: fixed {t:g}: {w:.1%} within {max_ms:.2f} ms "
                                  f"(p50 {_q(ms, 0.5) or 0:.2f}, p95 {_q(ms, 0.95) or 0:.2f} ms, {len(ms)} tokens)")
                    time.sleep(min(args.gap, 1.0))
                    if w >= args.attain:
                        best = t
                        break
                result["best_fixed_probe"] = probe
                if best is None:
                    best = targets[0]
                    console.print(f"[yellow]no fixed target keeps {args.attain:.0%} within {max_ms:.2f} ms under the "
                                  f"competitor: best-fixed runs the lowest, {best:g} (raise --calib-factor or "
                                  "--max-ms-per-token)[/]")
                elif best == top:
                    console.print(f"[yellow]fixed {top:g} meets the target even under the competitor: the latency "
                                  "target is too loose for this experiment (lower --calib-factor)[/]")
            else:
                try:
                    best = backend.snap(float(args.best_fixed))
                except ValueError:
                    raise SystemExit(f"--best-fixed: probe, sweep or a target, got {args.best_fixed!r}") from None
            console.print(f"best-fixed = {best:g} bits")
            policies = [(n, p, best if n == "best-fixed" else t) for n, p, t in policies]
        result["best_fixed"] = best

        # -- the runs
        for k, (name, policy, target) in enumerate(policies):
            time.sleep(args.gap)
            console.print(f"[bold]run {k + 1}/{len(policies)}: {name}[/]"
                          + (f" (fixed {target:g})" if target is not None else ""))
            run_policy(name, policy, target, duration=args.duration, intervals=intervals, competitor=competitor,
                       max_ms=max_ms, latency_ms=latency_ms, sink=runs, thread_latency_ms=thread_latency,
                       **common)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: the competitor is stopped; writing what was measured[/]")
    finally:
        kill_all_competitors()
    runs = [r for r in runs if r.cols["ms"]]
    for run in runs:
        summaries[run.name] = summarize(run, max_ms)
        if not run.complete:
            summaries[run.name]["partial"] = True  # interrupted: fewer seconds than --duration

    if sweep:  # best-fixed from full runs of every fixed target: the highest in time with the competitor on
        fixed = [(s["fixed_target"], s) for s in summaries.values() if s["policy"] == "fixed"]
        ok = [(t, s) for t, s in fixed
              if ((s["on"] if s["on"]["tokens"] else s["all"]).get("within") or 0) >= args.attain]
        if fixed:
            t, s = max(ok, key=lambda x: x[0]) if ok else min(fixed, key=lambda x: x[0])
            result["best_fixed"] = t
            summaries["best-fixed"] = dict(s, name="best-fixed", chosen_from=s["name"])

    if not summaries:
        console.print("no policy run has started: nothing to write")
        sys.exit(130 if interrupted else 1)
    result["interrupted"] = interrupted
    result["policies"] = summaries
    for run in runs:
        result["series"][run.name] = binned_series(run, args.max_points)
        result["switches"][run.name] = run.events
    result["acceptance"] = acceptance(summaries, result.get("best_fixed"), args.attain)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=1, default=str, allow_nan=False))
    print_table(summaries, result)
    if args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))
    if args.plot.lower() != "none" and runs:
        cfg = ControlConfig()
        plot(runs, summaries, max_ms, args.duration, Path(args.plot), cfg.hot_c if traces else None,
             cfg.low_battery_pct if traces else None)
        console.print(f"wrote {args.plot}")
    console.print(f"wrote {out}")
    if interrupted:
        sys.exit(130)


def _finite(o: Any) -> Any:
    """``o`` with every non-finite float as None (strict JSON; an open-ended competitor period ends at null)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def acceptance(s: dict[str, dict], best: float | None, attain: float) -> dict[str, Any]:
    acc: dict[str, Any] = {}
    f4 = s.get("fixed4")
    if f4 and f4["all"].get("within") is not None:
        miss = 1 - f4["all"]["within"]
        acc["fixed4_miss_fraction"] = miss
        acc["fixed4_misses_ge_30pct"] = miss >= 0.30
    bf = s.get("best-fixed")
    for p in ADAPTIVE:
        if p not in s or s[p]["all"].get("within") is None:
            continue
        d = {"within": s[p]["all"]["within"], "within_ge_target": s[p]["all"]["within"] >= attain,
             "realized_bits": s[p]["all"].get("realized_bits")}
        if bf and bf["all"].get("realized_bits") is not None and d["realized_bits"] is not None:
            d["best_fixed"] = best
            d["best_fixed_realized_bits"] = bf["all"]["realized_bits"]
            d["best_fixed_within"] = bf["all"].get("within")
            d["bits_minus_best_fixed"] = d["realized_bits"] - bf["all"]["realized_bits"]
            d["bits_not_below_best_fixed"] = d["bits_minus_best_fixed"] >= -1e-3
        if "fixed4_misses_ge_30pct" in acc:
            d["pass"] = bool(d["within_ge_target"] and acc["fixed4_misses_ge_30pct"]
                             and d.get("bits_not_below_best_fixed", True))
        acc[p] = d
    return acc


def print_table(s: dict[str, dict], result: dict) -> None:
    max_ms = result["max_ms_per_token"]
    tab = Table(title=f"Latency target {max_ms:.2f} ms/token; competitor {result['competitor']['schedule']} "
                      f"({result['competitor']['kind']} on core {result['competitor']['core']})")
    for col in ("policy", "tokens", "within all", "within on", "within off", "bits all", "bits on", "bits off",
                "head bits", "p95 ms on", "p95 ms off", "prefill ms on", "prefill ms off", "switches", "tok/s"):
        tab.add_column(col, justify="right")

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    def num(x, f="{:.2f}"):
        return "-" if x is None else f.format(x)

    for name, d in s.items():
        ft = d.get("fixed_target")
        label = name + (f" ({ft:g})" if ft is not None and name != f"fixed-{ft:g}" else "")
        label += " (partial)" if d.get("partial") else ""
        tab.add_row(label, str(d["tokens"]), pct(d["all"].get("within")), pct(d["on"].get("within")),
                    pct(d["off"].get("within")), num(d["all"].get("realized_bits"), "{:.3f}"),
                    num(d["on"].get("realized_bits"), "{:.3f}"), num(d["off"].get("realized_bits"), "{:.3f}"),
                    num(d["all"].get("head_bits"), "{:.2f}"), num(d["on"].get("ms_p95")), num(d["off"].get("ms_p95")), num(d["on"].get("prefill_ms_p50"), "{:.0f}"),
                    num(d["off"].get("prefill_ms_p50"), "{:.0f}"), str(d["target_switches"]),
                    num(d["all"].get("tokens_per_s"), "{:.1f}"))
    out = Console(width=None if sys.stdout.isatty() else 150, soft_wrap=True)  # not 80 columns in a pipe
    out.print(tab)
    acc = result["acceptance"]
    if "fixed4_miss_fraction" in acc:
        ok = acc["fixed4_misses_ge_30pct"]
        out.print(f"fixed4 misses {acc['fixed4_miss_fraction']:.1%} of tokens (need >= 30%): "
                  f"{'[green]yes[/]' if ok else '[red]no[/]'}")
    for p in ADAPTIVE:
        if p not in acc:
            continue
        d = acc[p]
        line = (f"{p}: {d['within']:.1%} of tokens within {max_ms:.2f} ms (need >= 95%): "
                f"{'[green]yes[/]' if d['within_ge_target'] else '[red]no[/]'}; realized {d['realized_bits']:.3f} bits")
        if "best_fixed_realized_bits" in d:
            line += (f" vs best fixed ({d['best_fixed']:g}) {d['best_fixed_realized_bits']:.3f} bits "
                     f"({d['bits_minus_best_fixed']:+.3f}; best fixed within {d['best_fixed_within']:.1%})")
        if "pass" in d:
            line += f" -> {'[green]PASS[/]' if d['pass'] else '[red]FAIL[/]'}"
        out.print(line)


if __name__ == "__main__":
    main()
