"""The precision controller: picks the dynamic-precision target per request and per decode step.

Inputs are the available targets, the latency model's predicted ms/token at each target on an idle
machine, the request's :class:`RequestConstraints` and the :class:`~bitdial.control.telemetry.DeviceState`.
Three policies (docs/control.md):

* ``rule``: the highest target whose predicted latency × estimated slowdown fits the latency target
  with headroom. The slowdown is the device-state prior (:meth:`DeviceState.expected_slowdown`) times a
  residual learned from the observed/predicted ms of the steps actually run (EWMA, reset on a detected
  change);
* ``bandit``: discounted Thompson sampling over targets; an arm's reward is its bits when a token meets
  the latency target and ``-bandit_penalty`` otherwise, with each arm's latency learned from its own steps
  and shrunk towards what the other arms show;
* ``fixed``: the request's ``target_bits``.

With ``adapt_threads`` (off by default) both adaptive policies also choose the request's **thread
count**: the cores other processes leave free (``DeviceState.other_cpu_cores``), with ``thread_margin`` cores
of hysteresis, decided at the start of a request so that its prefill runs on it too. It was built for a
prefill that stalled on a core shared with a busy process (torch's OpenMP threads spinning: 9.1 s to the
first token instead of 0.26 s); since ``import bitdial`` makes those threads sleep, two threads decode and
prefill faster than one next to a busy core on every machine measured (docs/control.md, "Threads"), so it
is opt-in. The latency model is kept per thread count (``thread_latency_ms``; without a measurement the
work is assumed to split evenly). Hysteresis keeps both adaptive policies from flapping: a switch up needs
the higher target to fit with headroom for ``min_dwell`` consecutive steps; a switch down happens as soon as
the median of the last ``down_window`` observed latencies violates the target; under the rule, a request
that follows another soon can continue its target, dwell and backoff (``carry_s``, opt-in). Thermal and
battery caps lower the highest allowed target, but never below the request's ``min_bits``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from bitdial.control.telemetry import DeviceState

log = logging.getLogger("bitdial.control")

POLICIES = ("rule", "bandit", "fixed")
_EPS = 1e-6


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------------------------------------------------
# configuration and requests


@dataclass
class ControlConfig:
    """Tuning of the controller. Every field has a usable default."""

    # hysteresis
    up_margin: float = 0.10  # a target fits if predicted ms <= max_ms * (1 - headroom), headroom >= up_margin
    quantile_z: float = 1.645  # ... and headroom >= 1 - exp(-z * observed log-noise): ~95% of tokens in time
    # ... and (rule) it would have met the latency target on this share of the last ``quantile_window`` steps
    # (their observed/predicted ratios applied to it): a bimodal slowdown (a thread on or off a shared core)
    # must not lure the rule up on its fast steps. 0 disables
    up_quantile: float = 0.95
    quantile_window: int = 64
    down_margin: float = 0.0  # a violation is observed ms > max_ms * (1 + down_margin)
    down_window: int = 3  # violation / change detection on the median of this many last steps
    min_dwell: int = 8  # steps a higher target must fit before switching up; bandit decision period
    # rule: a switch up that meets a violation within ``probation`` steps failed: the wait before the next
    # switch up to that target doubles (at most 2**max_backoff × min_dwell); each ``forgive_after`` steps
    # run at a target without a violation forgive one failure
    probation: int = 64
    forgive_after: int = 128
    max_backoff: int = 6
    # rule (opt-in): a request that starts within ``carry_s`` seconds of the previous one's end, with the same
    # latency target and thread count, continues where it left off (its target, dwell and backoff: a higher
    # target only after the same wait as within a request) instead of picking the highest fitting target
    # afresh, which under a bimodal slowdown climbed at every request start and fell at its first step.
    # Off (0) by default: on Sapphire Rapids it cut the switches 10x but stuck at 2 bits once its backoff
    # had maxed out (docs/control.md, "Stop 24")
    carry_s: float = 0.0
    # slowdown estimate
    ewma_alpha: float = 0.1
    change_ratio: float = 1.3  # a median this far (×/÷) from the estimate resets it: a competitor came or went
    threads: int | None = None  # the model's threads, for the device-state prior (None: every usable core)
    # thread policy (opt-in): run on the cores other processes leave free (decided per request, before its
    # prefill); off by default: two threads beat one next to a busy core since the passive OpenMP wait
    adapt_threads: bool = False
    thread_margin: float = 0.25  # hysteresis in cores: drop a thread when free cores < n - 0.5 - margin,
    #                              add one when free cores > n + 0.5 + margin
    use_state_prior: bool = True
    max_slowdown: float = 8.0
    # thermal policy
    hot_c: float | None = 80.0  # None disables
    hot_hysteresis_c: float = 5.0  # the cap lifts below hot_c - hot_hysteresis_c
    hot_max_target: float = 3.0
    # battery policy
    low_battery_pct: float | None = 20.0  # None disables; applies only while discharging
    battery_hysteresis_pct: float = 2.0
    battery_max_target: float = 3.0
    # bandit
    default_policy: str = "rule"  # for requests that name none and fix no target
    bandit_gamma: float = 0.99  # per-step discount of old observations (abrupt changes reset them instead)
    bandit_window: int = 256  # observations kept
    bandit_penalty: float = 3.0  # reward of a late token, in units of the highest target's bits
    bandit_sigma0: float = 0.1  # prior per-token log-latency noise
    bandit_tau: float = 0.1  # prior spread of an arm's log-latency around the latency model × slowdown
    bandit_switch_cost: float = 0.1  # value bonus of staying on the current arm (in units of the top bits)
    seed: int | None = None
    history: int = 1000  # decisions kept in Controller.history

    def __post_init__(self) -> None:
        if not 0.0 <= _number("up_quantile", self.up_quantile) < 1.0:
            raise ValueError(f"up_quantile must be in [0, 1), got {self.up_quantile}")
        if isinstance(self.quantile_window, bool) or not isinstance(self.quantile_window, int) \
                or self.quantile_window < 2:
            raise ValueError(f"quantile_window must be an integer >= 2, got {self.quantile_window!r}")
        if not 0.0 <= _number("thread_margin", self.thread_margin) < 0.5:
            raise ValueError(f"thread_margin must be in [0, 0.5), got {self.thread_margin}")
        for name in ("up_margin", "down_margin"):
            v = _number(name, getattr(self, name))
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        for name in ("quantile_z", "hot_hysteresis_c", "battery_hysteresis_pct", "bandit_penalty",
                     "bandit_switch_cost", "carry_s"):
            if _number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.max_backoff, bool) or not isinstance(self.max_backoff, int) or self.max_backoff < 0:
            raise ValueError(f"max_backoff must be an integer >= 0, got {self.max_backoff!r}")
        for name in ("down_window", "min_dwell", "probation", "forgive_after", "bandit_window", "history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < _number("ewma_alpha", self.ewma_alpha) <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")
        if not 0.0 < _number("bandit_gamma", self.bandit_gamma) <= 1.0:
            raise ValueError(f"bandit_gamma must be in (0, 1], got {self.bandit_gamma}")
        if _number("change_ratio", self.change_ratio) <= 1.0:
            raise ValueError(f"change_ratio must be > 1, got {self.change_ratio}")
        if _number("max_slowdown", self.max_slowdown) < 1.0:
            raise ValueError(f"max_slowdown must be >= 1, got {self.max_slowdown}")
        for name in ("bandit_sigma0", "bandit_tau", "hot_max_target", "battery_max_target"):
            if _number(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.default_policy not in ("rule", "bandit"):
            raise ValueError(f"default_policy must be 'rule' or 'bandit', got {self.default_policy!r}")


@dataclass(frozen=True)
class RequestConstraints:
    """What a request asks for.

    * ``max_ms_per_token``: the latency target per decoded token (None: no latency target);
    * ``target_bits``: a fixed target (policy ``fixed``; no cap, no latency adaptation applies);
    * ``min_bits``: the minimum quality: the controller never picks a lower target, whatever the latency
      target, heat or battery;
    * ``policy``: ``"rule"``, ``"bandit"`` or ``"fixed"``; None picks ``fixed`` when ``target_bits`` is
      given, else the controller's default policy.
    """

    max_ms_per_token: float | None = None
    target_bits: float | None = None
    min_bits: float | None = None
    policy: str | None = None

    def __post_init__(self) -> None:
        if self.max_ms_per_token is not None and _number("max_ms_per_token", self.max_ms_per_token) <= 0:
            raise ValueError(f"max_ms_per_token must be positive, got {self.max_ms_per_token}")
        if self.target_bits is not None and _number("target_bits", self.target_bits) <= 0:
            raise ValueError(f"target_bits must be positive, got {self.target_bits}")
        if self.min_bits is not None and _number("min_bits", self.min_bits) < 0:
            raise ValueError(f"min_bits must be >= 0, got {self.min_bits}")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.policy == "fixed" and self.target_bits is None:
            raise ValueError("policy 'fixed' needs target_bits")
        if self.target_bits is not None and self.policy not in (None, "fixed"):
            raise ValueError(f"target_bits fixes the target; it cannot be combined with policy {self.policy!r} "
                             "(use max_ms_per_token and min_bits to let the controller choose)")
        if self.target_bits is not None and self.min_bits is not None and self.target_bits < self.min_bits - _EPS:
            raise ValueError(f"target_bits {self.target_bits} is below min_bits {self.min_bits}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RequestConstraints:
        """From a request's JSON object; unknown keys are an error."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"request constraints must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown constraint(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
        return cls(**dict(d))


@dataclass
class Decision:
    """One choice of target, with why."""

    target: float
    reason: str
    policy: str
    predicted_ms: float | None = None  # the latency model × estimated slowdown at ``target``
    step: int = 0  # decode steps of the request so far (0 at the start)
    changed: bool = False  # the target differs from the previous decision of this request
    threads: int | None = None  # compute threads for the request (None: leave them as they are)


@dataclass
class _Request:
    constraints: RequestConstraints
    policy: str
    target: float = 0.0
    steps: int = 0
    since_switch: int = 0
    since_epoch: int = 0
    up_streak: int = 0
    last_up: bool = False  # the last switch went up
    switches: int = 0
    misses: int = 0
    observed: int = 0
    bits_sum: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# the slowdown estimate


class _Slowdown:
    """Residual log-slowdown over the device-state prior: y = log(ms / (predicted_ms × prior)).

    ``c`` is a winsorized EWMA of y, reset to the median of the last ``down_window`` values when that
    median moves more than ``log(change_ratio)`` away (a competitor came or went); ``var`` tracks the
    per-token noise from the residuals that are not changes. ``window`` keeps the last ``quantile_window``
    values of y whatever they are, for :meth:`quantile`.
    """

    def __init__(self, cfg: ControlConfig) -> None:
        self.cfg = cfg
        self.thr = math.log(cfg.change_ratio)
        self.c = 0.0
        self.var = 0.0
        self.n = 0
        self.recent_y: deque[float] = deque(maxlen=cfg.down_window)
        self.recent_ratio: deque[float] = deque(maxlen=cfg.down_window)  # raw ms / predicted ms
        self.window: deque[float] = deque(maxlen=cfg.quantile_window)

    def add(self, y: float, ratio: float) -> bool:
        """Add one step; True when a change was detected (the estimate jumped)."""
        a = self.cfg.ewma_alpha
        self.recent_y.append(y)
        self.window.append(y)
        self.recent_ratio.append(ratio)
        if self.n == 0:
            self.c, self.n = y, 1
            return False
        self.n += 1
        r = y - self.c
        if abs(r) <= self.thr:
            self.var = (1 - a) * self.var + a * r * r
        self.c += a * max(-self.thr, min(self.thr, r))
        if len(self.recent_y) == self.recent_y.maxlen:
            med = statistics.median(self.recent_y)
            if abs(med - self.c) > self.thr:
                log.debug("control: slowdown change detected: residual %.2fx -> %.2fx", math.exp(self.c),
                          math.exp(med))
                self.c = med
                return True
        return False

    @property
    def sigma(self) -> float:
        return math.sqrt(self.var)

    def quantile(self, q: float) -> float | None:
        """The q-quantile of y over the window (None until it holds a quarter of its length)."""
        if len(self.window) < max(2, self.window.maxlen // 4):
            return None
        ys = sorted(self.window)
        return ys[min(len(ys) - 1, int(math.ceil(q * len(ys))) - 1)]

    def observed_ratio(self) -> float | None:
        """Median observed/predicted ms of the last steps (None before any)."""
        return statistics.median(self.recent_ratio) if self.recent_ratio else None


# ---------------------------------------------------------------------------------------------------------------------
# the bandit


class _Bandit:
    """Discounted Thompson sampling over targets, constrained by the latency target.

    Observations are ``(step, arm, y)`` with y the residual log-slowdown (as in :class:`_Slowdown`),
    discounted by ``gamma`` per step. Arm a's log-latency is ``log(pred_a × prior) + mu + delta_a``:
    ``mu`` the pooled residual (what all arms show), ``delta_a`` the arm's own deviation with a
    N(0, tau²) prior, learned from its own steps. A draw of (mu, delta) gives each arm the probability
    p_a that a token meets the target (per-token log-noise sigma, from residuals clipped at the change
    threshold so rare spikes do not count as noise); the arm with the highest
    p_a × bits_a / bits_max − (1 − p_a) × penalty (+ switch_cost for the current arm) is played.
    When the last ``down_window`` steps of one arm move away from that arm's own history by more than
    ``log(change_ratio)``, conditions changed: everything older is forgotten.
    """

    def __init__(self, cfg: ControlConfig, n_arms: int) -> None:
        self.cfg = cfg
        self.n_arms = n_arms
        self.thr = math.log(cfg.change_ratio)
        self.obs: deque[tuple[int, int, float]] = deque(maxlen=cfg.bandit_window)
        self.rng = random.Random(cfg.seed)
        self.clock = 0

    def add(self, arm: int, y: float) -> bool:
        """Add one step; True when a change was detected (older observations were dropped)."""
        self.clock += 1
        self.obs.append((self.clock, arm, y))
        k = self.cfg.down_window
        if len(self.obs) <= k:
            return False
        recent = list(self.obs)[-k:]
        if any(a != arm for _, a, _ in recent):
            return False
        g = self.cfg.bandit_gamma
        w = sw = 0.0
        for i, (step, a, yy) in enumerate(self.obs):
            if i >= len(self.obs) - k:
                break
            if a == arm:
                wi = g ** (self.clock - step)
                w += wi
                sw += wi * yy
        if w < 2.0:
            return False
        old = sw / w
        med = statistics.median(yy for _, _, yy in recent)
        if abs(med - old) <= self.thr:
            return False
        log.debug("control: bandit: change at arm %d (%.2fx -> %.2fx); forgetting older steps", arm,
                  math.exp(old), math.exp(med))
        self.forget(k)
        return True

    def forget(self, keep: int) -> None:
        """Drop all but the last ``keep`` observations."""
        while len(self.obs) > keep:
            self.obs.popleft()

    def posterior(self) -> tuple[float, float, float, list[tuple[float, float]]]:
        """(mu, var_mu, sigma, [(delta mean, delta var)] per arm)."""
        cfg = self.cfg
        g = cfg.bandit_gamma
        w_arm = [0.0] * self.n_arms
        s_arm = [0.0] * self.n_arms
        for step, arm, y in self.obs:
            w = g ** (self.clock - step)
            w_arm[arm] += w
            s_arm[arm] += w * y
        W = sum(w_arm)
        mu = sum(s_arm) / W if W > 0 else 0.0
        m_arm = [s_arm[a] / w_arm[a] if w_arm[a] > 0 else mu for a in range(self.n_arms)]
        ss = 0.0
        for step, arm, y in self.obs:
            r = min(abs(y - m_arm[arm]), self.thr)
            ss += g ** (self.clock - step) * r * r
        var = max((cfg.bandit_sigma0 ** 2 + ss) / (1.0 + W), 1e-6)  # one pseudo-observation of sigma0
        deltas = []
        for a in range(self.n_arms):
            prec = 1.0 / cfg.bandit_tau ** 2 + w_arm[a] / var
            deltas.append(((w_arm[a] / var) * (m_arm[a] - mu) / prec, 1.0 / prec))
        return mu, var / (W + 1.0), math.sqrt(var), deltas

    def choose(self, allowed: Sequence[int], log_pred: Sequence[float], log_max: float, bits: Sequence[float],
               current: int | None = None) -> tuple[int, float]:
        """The arm to play among ``allowed`` and its sampled probability of a token in time."""
        mu, var_mu, sigma, deltas = self.posterior()
        mu_s = self.rng.gauss(mu, math.sqrt(var_mu))
        top = max(bits)
        best, best_val, best_p = allowed[0], -math.inf, 0.0
        for a in allowed:
            d_mean, d_var = deltas[a]
            lat = log_pred[a] + mu_s + self.rng.gauss(d_mean, math.sqrt(d_var))
            p = 0.5 * math.erfc((lat - log_max) / (sigma * math.sqrt(2.0)))
            val = p * bits[a] / top - (1.0 - p) * self.cfg.bandit_penalty
            if a == current:
                val += self.cfg.bandit_switch_cost
            if val > best_val:
                best, best_val, best_p = a, val, p
        return best, best_p


# ---------------------------------------------------------------------------------------------------------------------
# the controller


class Controller:
    """Chooses the dynamic-precision target of one request at a time.

    ``start_request`` → (decode a step → ``observe`` → ``step``)* → ``end_request``. What is learned about
    the machine (slowdown, noise, bandit statistics, thermal/battery latches) carries over between
    requests. Thread-safe (one lock); meant for one active request at a time.
    """

    def __init__(self, targets: Sequence[float], latency_ms: Mapping[float, float],
                 config: ControlConfig | None = None,
                 thread_latency_ms: Mapping[int, Mapping[float, float]] | None = None) -> None:
        if not targets:
            raise ValueError("targets is empty: the controller needs at least one precision target")
        ts = sorted({_number("target", t) for t in targets})
        if ts[0] <= 0:
            raise ValueError(f"targets must be positive, got {ts[0]}")
        self.targets: tuple[float, ...] = tuple(ts)
        lat: dict[float, float] = {}
        for k, v in latency_ms.items():
            try:
                kf = float(k)
            except (TypeError, ValueError):
                raise ValueError(f"latency_ms key {k!r} is not a target") from None
            lat[kf] = _number(f"latency_ms[{k}]", v)
        self.latency_ms: dict[float, float] = {}
        for t in self.targets:
            match = [v for k, v in lat.items() if abs(k - t) < _EPS]
            if not match:
                raise ValueError(f"latency_ms has no prediction for target {t} (has {sorted(lat)})")
            if match[0] <= 0:
                raise ValueError(f"latency_ms[{t}] must be positive, got {match[0]}")
            self.latency_ms[t] = match[0]
        preds = [self.latency_ms[t] for t in self.targets]
        if any(b < a for a, b in itertools.pairwise(preds)):
            log.warning("control: latency_ms is not increasing with the target: %s", self.latency_ms)
        self.config = config if config is not None else ControlConfig()
        # the latency model per thread count: ``latency_ms`` is the one at ``config.threads``
        self._base_threads = self.config.threads
        self._thread_lat: dict[int, dict[float, float]] = {}
        for n, table in (thread_latency_ms or {}).items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"thread_latency_ms key {n!r} is not a thread count")
            lt = {float(k): _number(f"thread_latency_ms[{n}][{k}]", v) for k, v in table.items()}
            missing = [t for t in self.targets if not any(abs(k - t) < _EPS and v > 0 for k, v in lt.items())]
            if missing:
                raise ValueError(f"thread_latency_ms[{n}] has no positive prediction for target(s) "
                                 f"{', '.join(f'{t:g}' for t in missing)}")
            self._thread_lat[n] = {t: next(v for k, v in lt.items() if abs(k - t) < _EPS) for t in self.targets}
        self._threads: int | None = None  # the thread count of the active request (None: the base)
        self._lock = threading.RLock()
        self._slow = _Slowdown(self.config)
        self._bandit = _Bandit(self.config, len(self.targets))
        self._history: deque[Decision] = deque(maxlen=self.config.history)
        self._req: _Request | None = None
        self._hot = False
        self._low_battery = False
        self._prior = 1.0
        self._fails = dict.fromkeys(self.targets, 0)  # rule: failed switches up to each target (backoff)
        # rule: the last request, its thread count and when it ended (config.carry_s)
        self._carry: tuple[_Request, int | None, float] | None = None

    # -- public helpers
    @property
    def history(self) -> list[Decision]:
        """The last ``config.history`` decisions, oldest first."""
        with self._lock:
            return list(self._history)

    @property
    def current(self) -> float | None:
        """The active request's target (None between requests)."""
        with self._lock:
            return self._req.target if self._req is not None else None

    def slowdown(self, state: DeviceState | None = None) -> float:
        """Estimated slowdown vs the latency model: the device-state prior × the learned residual."""
        with self._lock:
            return self._state_prior(state) * math.exp(self._slow.c)

    def predicted_ms(self, target: float, state: DeviceState | None = None) -> float:
        """Predicted ms/token at ``target`` under the current estimate."""
        return self._lat(self._target(target, "target")) * self.slowdown(state)

    def validate(self, constraints: RequestConstraints) -> str:
        """Check ``constraints`` against the available targets; return the policy that applies."""
        c = constraints
        if c.target_bits is not None:
            self._target(c.target_bits, "target_bits")
        if c.min_bits is not None and c.min_bits > self.targets[-1] + _EPS:
            raise ValueError(f"min_bits {c.min_bits} is above the highest available target {self.targets[-1]}")
        return c.policy or ("fixed" if c.target_bits is not None else self.config.default_policy)

    # -- the loop
    def start_request(self, constraints: RequestConstraints | None = None,
                      state: DeviceState | None = None) -> Decision:
        """Begin a request and decide its first target."""
        c = constraints if constraints is not None else RequestConstraints()
        with self._lock:
            policy = self.validate(c)
            if self._req is not None:
                log.debug("control: request started before the previous one ended; ending it")
            self._req = _Request(c, policy)
            return self._decide(state, start=True)

    def observe(self, target: float, ms_per_token: float, state: DeviceState | None = None) -> None:
        """Report one decode step: the target it ran at and its wall time in ms."""
        t = self._target(target, "target")
        ms = _number("ms_per_token", ms_per_token)
        if ms <= 0:
            raise ValueError(f"ms_per_token must be positive, got {ms}")
        with self._lock:
            prior = self._state_prior(state)
            pred = self._lat(t)
            y = math.log(ms / (pred * prior))
            self._slow.add(y, ms / pred)
            self._bandit.add(self.targets.index(t), y)
            r = self._req
            if r is not None:
                r.steps += 1
                r.since_switch += 1
                r.since_epoch += 1
                r.observed += 1
                r.bits_sum += t
                if r.since_switch % self.config.forgive_after == 0 and self._fails[r.target] > 0:
                    self._fails[r.target] -= 1  # the target has held for a while: forgive one failed switch up
                lim = r.constraints.max_ms_per_token
                if lim is not None and ms > lim:
                    r.misses += 1

    def step(self, state: DeviceState | None = None) -> Decision:
        """Re-decide after a decode step (usually keeps the target)."""
        with self._lock:
            if self._req is None:
                raise RuntimeError("no active request: call start_request first")
            return self._decide(state, start=False)

    def end_request(self) -> dict[str, Any]:
        """End the active request; return its summary (steps, misses, attainment, mean target, switches)."""
        with self._lock:
            r, self._req = self._req, None
            if r is None:
                return {}
            self._carry = (r, self._threads, time.monotonic()) if r.observed else None
            return {"policy": r.policy, "steps": r.observed, "misses": r.misses, "switches": r.switches,
                    "attainment": 1.0 - r.misses / r.observed if r.observed else None,
                    "mean_target": r.bits_sum / r.observed if r.observed else None,
                    "constraints": asdict(r.constraints)}

    def stats(self) -> dict[str, Any]:
        """The learned state, for metrics and debugging."""
        with self._lock:
            return {"residual_slowdown": math.exp(self._slow.c), "state_prior": self._prior,
                    "noise_sigma": self._slow.sigma, "hot": self._hot, "low_battery": self._low_battery,
                    "current": self.current, "threads": self._threads}

    # -- internals
    def _lat(self, t: float) -> float:
        """The idle latency model at target ``t`` and the current thread count."""
        n = self._threads
        if n is None or n == self._base_threads:
            return self.latency_ms[t]
        table = self._thread_lat.get(n)
        if table is not None:
            return table[t]
        if self._base_threads:  # no measurement at n threads: assume the work splits evenly
            return self.latency_ms[t] * self._base_threads / n
        return self.latency_ms[t]

    def _choose_threads(self, state: DeviceState | None) -> tuple[int | None, str]:
        """The request's thread count: the cores other processes leave free, with hysteresis (None: as is)."""
        cfg = self.config
        if not cfg.adapt_threads or state is None or state.other_cpu_cores is None:
            return None, ""
        n_cpu = len(state.cpu_affinity) if state.cpu_affinity else state.cpu_count
        if not n_cpu:
            return None, ""
        cores = float(n_cpu) if state.cpu_quota_cores is None else min(float(n_cpu), state.cpu_quota_cores)
        top = max(1, min(cfg.threads or int(cores), int(cores + _EPS) or 1))
        free = cores - state.other_cpu_cores
        cur = self._threads if self._threads is not None else top
        n = cur
        if free < cur - 0.5 - cfg.thread_margin or free > cur + 0.5 + cfg.thread_margin:
            n = int(math.floor(free + 0.5))
        n = max(1, min(top, n))
        why = f"{n} thread{'s' if n > 1 else ''} ({free:.1f} of {cores:g} cores free)"
        return n, why

    def _target(self, t: Any, name: str) -> float:
        v = _number(name, t)
        for x in self.targets:
            if abs(x - v) < _EPS:
                return x
        raise ValueError(f"{name} {v} is not an available target: {', '.join(f'{x:g}' for x in self.targets)}")

    def _state_prior(self, state: DeviceState | None) -> float:
        if state is not None and self.config.use_state_prior:
            self._prior = state.expected_slowdown(self._threads or self.config.threads, self.config.max_slowdown)
        elif not self.config.use_state_prior:
            self._prior = 1.0
        return self._prior

    def _caps(self, state: DeviceState | None) -> tuple[float | None, list[str]]:
        """The device cap on the target (None: none) and why; updates the thermal/battery latches."""
        cfg = self.config
        notes: list[str] = []
        caps: list[float] = []
        if state is not None and cfg.hot_c is not None and state.temperature_c is not None:
            temp = state.temperature_c
            if temp >= cfg.hot_c:
                self._hot = True
            elif temp < cfg.hot_c - cfg.hot_hysteresis_c:
                self._hot = False
        if cfg.hot_c is not None and self._hot:
            caps.append(cfg.hot_max_target)
            temp = state.temperature_c if state is not None else None
            notes.append(f"thermal cap {cfg.hot_max_target:g} ({_fmt(temp)} °C, hot >= {cfg.hot_c:g})")
        if state is not None and cfg.low_battery_pct is not None:
            pct = state.battery_percent
            if not state.discharging and (state.on_ac or state.battery_status in ("Charging", "Full",
                                                                                    "Not charging")):
                self._low_battery = False
            elif pct is not None:
                if pct < cfg.low_battery_pct and state.discharging:
                    self._low_battery = True
                elif pct >= cfg.low_battery_pct + cfg.battery_hysteresis_pct:
                    self._low_battery = False
        if cfg.low_battery_pct is not None and self._low_battery:
            caps.append(cfg.battery_max_target)
            pct = state.battery_percent if state is not None else None
            notes.append(f"battery cap {cfg.battery_max_target:g} ({_fmt(pct)}% on battery, "
                         f"low < {cfg.low_battery_pct:g}%)")
        return (min(caps) if caps else None), notes

    def _allowed(self, state: DeviceState | None, c: RequestConstraints) -> tuple[list[float], str]:
        """Targets the request may use now (never empty, ascending) and a note on caps."""
        floor = [t for t in self.targets if c.min_bits is None or t >= c.min_bits - _EPS]
        cap, notes = self._caps(state)
        if cap is None:
            return floor, ""
        capped = [t for t in floor if t <= cap + _EPS]
        if capped:
            return capped, "; ".join(notes)
        if c.min_bits is not None and floor[0] > cap + _EPS:
            return [floor[0]], "; ".join(notes) + f", overridden by min_bits {c.min_bits:g}"
        return [floor[0]], "; ".join(notes) + " (below the lowest target)"

    def _headroom(self) -> float:
        return max(self.config.up_margin, 1.0 - math.exp(-self.config.quantile_z * self._slow.sigma))

    def _best_fit(self, allowed: list[float], max_ms: float, s: float, prior: float | None = None) -> float | None:
        """The highest allowed target predicted to fit with headroom under slowdown ``s``; with the state
        ``prior`` (rule) also within ``max_ms`` on ``up_quantile`` of the recent steps."""
        lim = max_ms * (1.0 - self._headroom())
        fit = [t for t in allowed if self._lat(t) * s <= lim]
        q = self._slow.quantile(self.config.up_quantile) if prior is not None and self.config.up_quantile else None
        if q is not None:
            fit = [t for t in fit if self._lat(t) * prior * math.exp(q) <= max_ms]
        return fit[-1] if fit else None

    def _bandit_choice(self, allowed: list[float], max_ms: float, prior: float,
                       current: float | None = None) -> tuple[float, float]:
        idx = [self.targets.index(t) for t in allowed]
        log_pred = [math.log(self._lat(t) * prior) for t in self.targets]
        cur = self.targets.index(current) if current in self.targets else None
        arm, p = self._bandit.choose(idx, log_pred, math.log(max_ms), self.targets, cur)
        return self.targets[arm], p

    def _decide(self, state: DeviceState | None, start: bool) -> Decision:
        r = self._req
        assert r is not None
        c = r.constraints
        cur = r.target
        threads_note, n_threads = "", None
        if start:
            n_threads, threads_note = self._choose_threads(state)
            self._threads = n_threads  # None: the request runs on the server's threads, as the base model
        prior = self._state_prior(state)
        s = prior * math.exp(self._slow.c)
        max_ms = c.max_ms_per_token
        resumed = False
        if r.policy == "fixed":
            target, reason = float(c.target_bits), "fixed target_bits"  # type: ignore[arg-type]
        else:
            allowed, cap_note = self._allowed(state, c)
            notes = [cap_note] if cap_note else []
            if c.min_bits is not None and allowed[0] > self.targets[0] and "min_bits" not in cap_note:
                notes.append(f"min_bits {c.min_bits:g}")
            note = "".join(f"; {n}" for n in notes)
            if max_ms is None:
                target, reason = allowed[-1], "no latency target: highest allowed" + note
            elif start and self._resume(r, allowed, max_ms, n_threads):
                resumed = True  # the request goes on from the previous one's target, dwell and backoff
                target, reason = self._continue(r, allowed, max_ms, s, prior)
                reason += note
            elif start:
                target, reason = self._initial(r.policy, allowed, max_ms, s, prior)
                reason += note
            elif cur > allowed[-1] + _EPS or cur < allowed[0] - _EPS:
                fit = self._best_fit(allowed, max_ms, s)
                target = fit if fit is not None else allowed[0]
                reason = "device cap" + note
            else:
                target, reason = self._adapt(r, allowed, max_ms, s, prior)
                reason += note
        fresh = start and not resumed  # a fresh start restarts the counters; a resumed one switches as a step does
        if not fresh and target != cur:
            r.switches += 1
            r.last_up = target > cur
        if fresh or target != cur:
            r.since_switch = r.since_epoch = r.up_streak = 0
        changed = start or target != cur  # a request's first decision is always news to its caller
        r.target = target
        pred = self._lat(target) * s
        if threads_note:
            reason += f"; {threads_note}"
        d = Decision(target, reason, r.policy, pred, r.steps, changed, n_threads)
        self._history.append(d)
        lvl = logging.INFO if changed else logging.DEBUG
        log.log(lvl, "control: step %d %s -> %g (%s; predicted %.1f ms/token, slowdown %.2f)", r.steps, r.policy,
                target, reason, pred, s)
        return d

    def _initial(self, policy: str, allowed: list[float], max_ms: float, s: float,
                 prior: float) -> tuple[float, str]:
        if policy == "bandit":
            t, p = self._bandit_choice(allowed, max_ms, prior)
            return t, f"bandit: sampled P(in time) {p:.2f} at {t:g}"
        fit = self._best_fit(allowed, max_ms, s, prior)
        if fit is None:
            return allowed[0], f"latency target {max_ms:g} ms unattainable: lowest allowed"
        return fit, f"highest target predicted within {max_ms:g} ms with {self._headroom():.0%} headroom"

    def _resume(self, r: _Request, allowed: list[float], max_ms: float, n_threads: int | None) -> bool:
        """Rule, at a request's start: continue from where the previous request ended (``carry_s``)?"""
        cy, self._carry = self._carry, None
        if r.policy != "rule" or cy is None or not self.config.carry_s:
            return False
        last, threads, ended = cy
        last_ms = last.constraints.max_ms_per_token
        if (last.policy != "rule" or last_ms is None or abs(last_ms - max_ms) > _EPS * max(1.0, max_ms)
                or threads != n_threads or time.monotonic() - ended > self.config.carry_s
                or not allowed[0] - _EPS <= last.target <= allowed[-1] + _EPS):
            return False
        r.target, r.since_switch, r.up_streak, r.last_up = last.target, last.since_switch, last.up_streak, last.last_up
        return True

    def _continue(self, r: _Request, allowed: list[float], max_ms: float, s: float,
                  prior: float) -> tuple[float, str]:
        """Rule: the first decision of a request that continues the previous one (no step observed yet, so
        no violation check; a target that no longer fits is left at once, a higher one waits as in _adapt)."""
        cur = r.target
        fit = self._best_fit(allowed, max_ms, s, prior)
        if fit is None:
            return allowed[0], f"latency target {max_ms:g} ms unattainable: lowest allowed"
        if fit < cur:
            return fit, f"continues below the previous request's {cur:g}: {fit:g} fits {max_ms:g} ms"
        if fit == cur:
            return cur, f"continues at {cur:g} from the previous request"
        t, why = self._up(r, allowed, max_ms, fit)
        return t, f"{why} (continued from the previous request)"

    def _adapt(self, r: _Request, allowed: list[float], max_ms: float, s: float,
               prior: float) -> tuple[float, str]:
        """A step's decision (rule, bandit): down on a violation, up after the dwell and backoff, else hold."""
        cfg = self.config
        cur = r.target
        ratio = self._slow.observed_ratio()
        observed = ratio * self._lat(cur) if ratio is not None else None
        if (observed is not None and len(self._slow.recent_ratio) == cfg.down_window
                and observed > max_ms * (1.0 + cfg.down_margin)):
            if r.policy == "rule" and r.last_up and r.since_switch <= cfg.probation:
                self._fails[cur] = min(self._fails[cur] + 1, cfg.max_backoff)  # a failed switch up: back off
            below = [t for t in allowed if t < cur]
            if not below:
                return cur, f"violation ({observed:.1f} > {max_ms:g} ms) at the lowest allowed target"
            guard = prior if r.policy == "rule" else None
            fit = self._best_fit(below, max_ms, max(s, ratio), guard)  # type: ignore[arg-type]
            t = fit if fit is not None else below[0]
            return t, f"violation: observed {observed:.1f} ms/token > {max_ms:g} at {cur:g}"
        if r.policy == "bandit":
            if r.since_epoch < cfg.min_dwell:
                return cur, "hold (bandit dwell)"
            r.since_epoch = 0
            t, p = self._bandit_choice(allowed, max_ms, prior, cur)
            return t, f"bandit: sampled P(in time) {p:.2f} at {t:g}"
        fit = self._best_fit(allowed, max_ms, s, prior)
        if fit is None or fit <= cur:
            r.up_streak = 0
            return cur, "hold"
        return self._up(r, allowed, max_ms, fit)

    def _up(self, r: _Request, allowed: list[float], max_ms: float, fit: float) -> tuple[float, str]:
        """Rule: a higher target ``fit`` fits now: switch up once its wait has passed, else hold."""
        cfg = self.config
        cur = r.target
        r.up_streak += 1
        # the highest target above cur whose wait (min_dwell, doubled per recent failed switch up to it or
        # to a target between) has passed
        best, level, need_next = cur, 0, None
        for t in (t for t in allowed if cur < t <= fit):
            level = max(level, self._fails[t])
            need = cfg.min_dwell * 2 ** level
            if r.up_streak >= need and r.since_switch >= cfg.min_dwell:
                best = t
            elif need_next is None:
                need_next = need
        if best > cur:
            return best, f"{best:g} fits {max_ms:g} ms with headroom for {r.up_streak} steps"
        return cur, f"hold ({fit:g} fits for {r.up_streak}/{need_next} steps)"
