"""Precision per request and per step: which target a generation runs at, and who changes it.

Three layers:

* a **backend** knows how the loaded model changes precision: ``dynamic`` (an engine with per-token
  dynamic-precision policies, ``engine.targets`` / ``engine.set_target``), ``static`` (a ``.bitdial``
  artifact without them: every decoder linear at one integer width), or ``none`` (a float model);
* the **controller** (:mod:`bitdial.control`, optional) picks the target per request from the request's
  constraints and the device state, and per decode step from the measured step times;
* the **governor** turns a request's ``bitdial`` object into a validated :class:`PrecisionPlan` (on the
  event loop, so a bad value is a 400 before anything is queued) and runs it as a
  :class:`PrecisionSession` on the worker thread, restoring the server's default afterwards.

``bitdial.control`` is imported lazily: without it (or if it fails), adaptive policies degrade to
``fixed`` and every response says why.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bitdial.errors import BitdialError
from bitdial.runtime.generate import StepInfo, decode_threads
from bitdial.serving.errors import ApiError, bad_request
from bitdial.serving.schemas import BitdialOptions

log = logging.getLogger(__name__)

ADAPTIVE = ("rule", "bandit")
MIN_STATIC_BITS = 2  # a uniform artifact can read 1-bit views, but nothing usable runs at 1 bit


# ------------------------------------------------------------------------------------------ backends
class PrecisionBackend:
    """A model whose precision cannot be changed (a float model): no targets."""

    kind = "none"

    def __init__(self) -> None:
        self.targets: list[float] = []

    def apply(self, target: float | None) -> None:
        """Run the next steps at ``target`` (None: as loaded)."""

    def snap(self, target: float) -> float:
        """The available target closest to ``target`` (ties go to the higher one)."""
        return min(self.targets, key=lambda t: (abs(t - target), -t))


class DynamicBackend(PrecisionBackend):
    """An engine with dynamic-precision policies: ``engine.targets`` and ``engine.set_target(t | None)``."""

    kind = "dynamic"

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine
        self.targets = sorted({float(t) for t in engine.targets})

    def apply(self, target: float | None) -> None:
        self.engine.set_target(target)


class StaticBackend(PrecisionBackend):
    """A ``.bitdial`` artifact without dynamic policies: a target is one integer width (2 bits and up) for
    every decoder linear (``lm_head`` and the embedding stay as loaded). ``None`` restores the widths it was
    loaded with (``--bits``, a bits map or a plan)."""

    kind = "static"

    def __init__(self, model: torch.nn.Module, linears: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.linears = linears
        self.loaded = {n: m.bits for n, m in linears.items()}
        lo = max(MIN_STATIC_BITS, *(m.min_bits for m in linears.values()))
        hi = min(m.max_bits for m in linears.values())
        self.targets = [float(k) for k in range(lo, hi + 1)]
        self.current: float | None = None

    def apply(self, target: float | None) -> None:
        if target == self.current:
            return
        if target is None:
            for n, m in self.linears.items():
                m.bits = self.loaded[n]
        else:
            for m in self.linears.values():
                m.bits = round(target)
        self.current = target


def backend_for(engine: Any) -> PrecisionBackend:
    """The richest way this engine's precision can be changed."""
    targets = getattr(engine, "targets", None)
    if callable(getattr(engine, "set_target", None)) and targets:
        return DynamicBackend(engine)
    model = engine.model
    try:
        from bitdial.runtime.anyprec import AnyPrecisionLinear
    except ImportError:  # pragma: no cover - the runtime always ships it
        return PrecisionBackend()
    lin = {n: m for n, m in model.linears().items() if n != "lm_head" and isinstance(m, AnyPrecisionLinear)}
    return StaticBackend(model, lin) if lin else PrecisionBackend()


# ---------------------------------------------------------------------------------------- controller
def _field(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default) if obj is not None else default


class ControlAdapter:
    """The server's one :class:`bitdial.control.Controller` and its telemetry, used from the worker thread.

    The controller's state (slowdown, bandit statistics, thermal/battery latches) carries over between
    requests; :class:`bitdial.control.Telemetry` caches device reads itself, so asking every step is cheap."""

    def __init__(self, controller: Any, telemetry: Any, constraints_type: Any) -> None:
        self.controller = controller
        self.telemetry = telemetry
        self._constraints = constraints_type

    @classmethod
    def create(cls, targets: Sequence[float], latency_ms: dict[float, float],
               thread_latency_ms: dict[int, dict[float, float]] | None = None,
               adapt_threads: bool = False) -> ControlAdapter | None:
        """The controller over ``targets``, or None (logged) when :mod:`bitdial.control` is missing or fails.
        ``latency_ms`` is the latency model at the current thread count, ``thread_latency_ms`` the same at
        other thread counts; with ``adapt_threads`` the controller runs a request on fewer threads when other
        processes hold cores."""
        try:
            from bitdial import control
        except ImportError as e:
            log.info("bitdial.control is not available (%s): adaptive policies fall back to fixed", e)
            return None
        try:
            config = control.ControlConfig(threads=torch.get_num_threads(), adapt_threads=adapt_threads)
            controller = control.Controller(list(targets), dict(latency_ms), config=config,
                                            thread_latency_ms=thread_latency_ms)
            telemetry = control.Telemetry()
            adapter = cls(controller, telemetry, control.RequestConstraints)
        except Exception:  # a broken optional component must not stop the server
            log.warning("could not start the precision controller: adaptive policies fall back to fixed",
                        exc_info=True)
            return None
        return adapter

    def state(self) -> Any:
        try:
            return self.telemetry.read()
        except Exception:  # telemetry is best effort
            log.debug("telemetry read failed", exc_info=True)
            return None

    def start_request(self, plan: PrecisionPlan) -> Any:
        constraints = self._constraints(max_ms_per_token=plan.max_ms_per_token, target_bits=None,
                                        min_bits=plan.min_bits, policy=plan.policy)
        return self.controller.start_request(constraints, self.state())

    def observe_and_step(self, target: float, ms: float) -> Any:
        state = self.state()
        self.controller.observe(target, ms, state)
        return self.controller.step(state)

    def end_request(self) -> dict[str, Any]:
        try:
            return dict(self.controller.end_request() or {})
        except Exception:
            log.debug("controller end_request failed", exc_info=True)
            return {}


def set_compute_threads(n: int) -> int:
    """Run torch (prefill) and the native kernels (decode) on ``n`` threads; returns torch's previous count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from bitdial import kernels

        if kernels.available():
            kernels.set_threads(n)
    except ImportError:  # pragma: no cover - the kernels package always ships
        pass
    return prev


def probe_thread_latency(model: torch.nn.Module, backend: PrecisionBackend, threads: Sequence[int], *,
                         steps: int = 6) -> dict[int, dict[float, float]]:
    """:func:`probe_latency` at each thread count in ``threads`` (the current count restored afterwards)."""
    before = torch.get_num_threads()
    try:
        out = {}
        for n in threads:
            set_compute_threads(n)
            out[int(n)] = probe_latency(model, backend, steps=steps)
        return out
    finally:
        set_compute_threads(before)


def probe_latency(model: torch.nn.Module, backend: PrecisionBackend, *, steps: int = 6,
                  prompt: int = 8) -> dict[float, float]:
    """Median decode-step time (ms) at every target, measured now: the controller's starting latency model."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt + steps + 1), generator=g)
    out: dict[float, float] = {}
    try:
        with torch.inference_mode(), decode_threads(model):  # threads as stream_generate decodes
            for t in backend.targets:
                backend.apply(t)
                model.setup_cache(1, prompt + steps + 2)
                model(ids[:, :prompt], 0, last_only=True)
                times = []
                for i in range(steps):
                    p = prompt + i
                    t0 = time.perf_counter()
                    model(ids[:, p:p + 1], p, last_only=True)
                    times.append(time.perf_counter() - t0)
                out[t] = statistics.median(times[1:] or times) * 1e3
    finally:
        backend.apply(None)
        meter = getattr(model, "bits_meter", None)
        if meter is not None:
            meter.take()  # the probe's steps are nobody's realized bits
    # a lower target reads fewer bytes and is never slower: smooth out timing noise (running max)
    run = 0.0
    for t in sorted(out):
        run = out[t] = max(out[t], run)
    log.info("decode step latency per target: %s",
             ", ".join(f"{t:g}: {ms:.2f} ms" for t, ms in out.items()))
    return out


# ------------------------------------------------------------------------------------- plan, session
@dataclass
class PrecisionPlan:
    """A request's precision settings after validation (the server's defaults filled in)."""

    policy: str  # fixed | rule | bandit
    target_bits: float | None  # snapped to an available target; None = as loaded
    max_ms_per_token: float | None
    min_bits: float | None
    note: str = ""  # why the request's policy was changed, if it was


@dataclass
class PrecisionSession:
    """One generation's precision: started on the worker thread, fed every decode step."""

    plan: PrecisionPlan
    backend: PrecisionBackend
    control: ControlAdapter | None
    policy: str = "fixed"
    target: float | None = None  # the target the request started at
    current: float | None = None
    reason: str = ""
    predicted_ms: float | None = None
    targets_used: list[float | None] = field(default_factory=list)
    switches: int = 0
    misses: int = 0
    threads: int | None = None  # the controller's thread count for this request (None: unchanged)
    _threads_before: int | None = None

    def start(self) -> None:
        plan = self.plan
        self.policy, self.reason = plan.policy, plan.note or "fixed target"
        target = plan.target_bits
        if self.policy in ADAPTIVE and self.control is not None:
            try:
                d = self.control.start_request(plan)
                target = self._allowed(_field(d, "target", target))
                self.reason = str(_field(d, "reason", "controller decision"))
                self.policy = str(_field(d, "policy", self.policy))
                pm = _field(d, "predicted_ms")
                self.predicted_ms = float(pm) if pm is not None else None
                n = _field(d, "threads")
                if n is not None and int(n) != torch.get_num_threads():
                    self.threads = int(n)
                    self._threads_before = set_compute_threads(self.threads)
                elif n is not None:
                    self.threads = int(n)
            except Exception:  # the controller is optional; keep serving at the plan's target
                log.warning("the controller failed to start a request; running fixed", exc_info=True)
                self.policy, self.reason, self.control = "fixed", "controller error: fixed target", None
        self.target = target
        self._set(target)
        log.debug("request precision: policy=%s target=%s (%s)", self.policy, target, self.reason)

    def _allowed(self, target: float | None) -> float | None:
        if target is None or not self.backend.targets:
            return target
        t = self.backend.snap(float(target))
        if self.plan.min_bits is not None and t < self.plan.min_bits:
            t = min(x for x in self.backend.targets if x >= self.plan.min_bits)
        return t

    def _set(self, target: float | None) -> None:
        if not self.targets_used or target != self.current:
            if self.targets_used:
                self.switches += 1
            self.backend.apply(target)
            self.current = target
            if target not in self.targets_used:
                self.targets_used.append(target)

    def step_hook(self, info: StepInfo) -> None:
        ms = info.seconds * 1e3
        if self.plan.max_ms_per_token is not None and ms > self.plan.max_ms_per_token:
            self.misses += 1
        if self.policy not in ADAPTIVE or self.control is None or self.current is None or ms <= 0:
            return
        try:
            d = self.control.observe_and_step(self.current, ms)
        except Exception:
            log.warning("the controller failed during a step; holding the current target", exc_info=True)
            self.control, self.reason = None, "controller error: target held"
            return
        new = self._allowed(_field(d, "target", self.current))
        if new != self.current:
            log.debug("step %d: target %s -> %s (%s)", info.step, self.current, new, _field(d, "reason", ""))
            self.reason = str(_field(d, "reason", self.reason))
            self._set(new)

    def finish(self) -> None:
        """End the request at the controller (its learned state stays); restore the thread count."""
        if self._threads_before is not None:
            set_compute_threads(self._threads_before)
            self._threads_before = None
        if self.control is not None:
            summary = self.control.end_request()
            log.debug("controller summary: %s", summary)

    def report(self) -> dict[str, Any]:
        return {
            "precision": self.backend.kind,
            "policy": self.policy,
            "reason": self.reason,
            "target": self.target,
            "targets_used": list(self.targets_used),
            "target_switches": self.switches,
            "min_bits": self.plan.min_bits,
            "max_ms_per_token": self.plan.max_ms_per_token,
            "predicted_ms_per_token": self.predicted_ms,
            "latency_target_misses": self.misses,
            "threads": self.threads,
        }


class PrecisionGovernor:
    """Validates each request's ``bitdial`` object against what the model can do, and runs sessions."""

    def __init__(self, backend: PrecisionBackend, *, default_target: float | None = None,
                 default_policy: str = "fixed", default_max_ms: float | None = None,
                 control: ControlAdapter | None = None) -> None:
        self.backend = backend
        self.control = control
        self.default_policy = default_policy
        self.default_max_ms = default_max_ms
        self.default_target: float | None = None
        if default_target is not None:
            try:
                self.default_target = self._check_target(default_target, "default target")
            except ApiError as e:
                raise BitdialError(e.message) from None
        backend.apply(self.default_target)

    @property
    def adaptive(self) -> bool:
        return self.control is not None and len(self.backend.targets) > 1

    def describe(self) -> dict[str, Any]:
        return {"precision": self.backend.kind, "targets": list(self.backend.targets),
                "default_target": self.default_target, "default_policy": self.default_policy,
                "controller": self.adaptive}

    def _check_target(self, value: float, param: str) -> float:
        b = self.backend
        if not b.targets:
            raise bad_request(f"{param}: this model's precision cannot be chosen (it is not a .bitdial "
                              "artifact); leave target_bits out", param=param)
        lo, hi = b.targets[0], b.targets[-1]
        if not lo - 0.25 <= value <= hi + 0.25:
            raise bad_request(f"{param} = {value:g} is outside what this model can run: {b.kind} targets "
                              f"{', '.join(f'{t:g}' for t in b.targets)}", param=param)
        return b.snap(value)

    def plan(self, opts: BitdialOptions | None) -> PrecisionPlan:
        """Validate a request's ``bitdial`` object (raises a 400 :class:`ApiError`)."""
        o = opts or BitdialOptions()
        target = self._check_target(o.target_bits, "bitdial.target_bits") if o.target_bits is not None \
            else self.default_target
        max_ms = o.max_ms_per_token if o.max_ms_per_token is not None else self.default_max_ms
        min_bits = o.min_bits
        if min_bits is not None:
            if not self.backend.targets:
                raise bad_request("bitdial.min_bits: this model's precision cannot be chosen (it is not a "
                                  ".bitdial artifact)", param="bitdial.min_bits")
            if min_bits > self.backend.targets[-1]:
                raise bad_request(f"bitdial.min_bits = {min_bits:g} is above the highest target this model "
                                  f"can run ({self.backend.targets[-1]:g})", param="bitdial.min_bits")
            if o.target_bits is not None and o.target_bits < min_bits:
                raise bad_request(f"bitdial.target_bits ({o.target_bits:g}) is below bitdial.min_bits "
                                  f"({min_bits:g})", param="bitdial.target_bits")
            if target is not None and target < min_bits:
                target = min(t for t in self.backend.targets if t >= min_bits)
        if o.target_bits is not None and o.policy in ADAPTIVE:
            raise bad_request(f"bitdial.target_bits fixes the target, so it cannot be combined with policy "
                              f"{o.policy!r}; give max_ms_per_token (and min_bits) to let the controller choose",
                              param="bitdial.policy")
        if o.policy == "fixed" or o.target_bits is not None:
            policy = "fixed"
        elif o.policy is not None:
            policy = o.policy
        elif o.max_ms_per_token is not None and self.default_policy == "fixed":
            policy = "rule"  # a latency target without a policy asks the server to meet it
        else:
            policy = self.default_policy
        note = ""
        if policy in ADAPTIVE and not self.adaptive:
            why = ("the controller (bitdial.control) is not available" if self.control is None
                   else "this model has a single precision target")
            note = f"policy {policy!r} requested but {why}: fixed target"
            policy = "fixed"
        return PrecisionPlan(policy, target, max_ms, min_bits, note)

    def session(self, plan: PrecisionPlan) -> PrecisionSession:
        return PrecisionSession(plan, self.backend, self.control if plan.policy in ADAPTIVE else None)

    def restore(self) -> None:
        self.backend.apply(self.default_target)
