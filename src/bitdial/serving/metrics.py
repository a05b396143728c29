"""The server's counters and gauges, rendered in the Prometheus text exposition format (version 0.0.4).

A few dozen series do not need a client library: :class:`Metrics` keeps them under one lock (the event
loop and the worker thread both write) and :meth:`Metrics.render` writes the text.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# request latency buckets (seconds): a tiny model answers in milliseconds, a long reply takes a minute
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(d: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in d.items()) + "}" if d else ""


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class Metrics:
    def __init__(self, model: str, info: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.info = {"model": model, **(info or {})}
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (endpoint, status) -> count
        self.cancelled = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.prefill_seconds = 0.0
        self.misses = 0
        self.latency_steps = 0  # decode steps of requests that had a latency target
        self.target_switches = 0
        self.last_tps: float | None = None
        self.last_bits: float | None = None
        self.last_threads: int | None = None
        self.bits_weighted = 0.0  # sum of realized bits x decode steps
        self.bits_steps = 0
        self.hist = [0] * (len(LATENCY_BUCKETS) + 1)
        self.hist_sum = 0.0
        self.hist_count = 0
        self.gauges: dict[str, tuple[str, Callable[[], float | int | None]]] = {}

    def gauge(self, name: str, help_: str, fn: Callable[[], float | int | None]) -> None:
        """A gauge read at render time (queue depth, busy, current target)."""
        self.gauges[name] = (help_, fn)

    def request(self, endpoint: str, status: int | str) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def generation(self, *, prompt_tokens: int, completion_tokens: int, decode_steps: int, decode_s: float,
                   prefill_s: float, realized_bits: float | None, misses: int, had_target: bool,
                   switches: int, seconds: float, threads: int | None = None) -> None:
        with self._lock:
            if threads is not None:
                self.last_threads = threads
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += completion_tokens
            self.decode_steps += decode_steps
            self.decode_seconds += decode_s
            self.prefill_seconds += prefill_s
            self.misses += misses
            self.target_switches += switches
            if had_target:
                self.latency_steps += decode_steps
            if decode_steps and decode_s > 0:
                self.last_tps = decode_steps / decode_s
            if realized_bits is not None and decode_steps:
                self.last_bits = realized_bits
                self.bits_weighted += realized_bits * decode_steps
                self.bits_steps += decode_steps
            i = next((j for j, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.hist[i] += 1
            self.hist_sum += seconds
            self.hist_count += 1

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], Any]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(labels)} {_num(value)}")

        with self._lock:
            metric("bitdial_info", "gauge", "The model served (value 1).", [(self.info, 1)])
            metric("bitdial_start_time_seconds", "gauge", "Server start, Unix time.", [({}, self.started)])
            metric("bitdial_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
            metric("bitdial_requests_cancelled_total", "counter",
                   "Generations cancelled (or dropped from the queue) because the client went away.",
                   [({}, self.cancelled)])
            metric("bitdial_prompt_tokens_total", "counter", "Prompt tokens processed.", [({}, self.prompt_tokens)])
            metric("bitdial_generated_tokens_total", "counter", "Completion tokens generated.",
                   [({}, self.generated_tokens)])
            metric("bitdial_decode_steps_total", "counter", "Decode steps (forward passes of one token).",
                   [({}, self.decode_steps)])
            metric("bitdial_decode_seconds_total", "counter", "Time spent in decode steps.",
                   [({}, self.decode_seconds)])
            metric("bitdial_prefill_seconds_total", "counter", "Time spent in prefill.",
                   [({}, self.prefill_seconds)])
            avg_tps = self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else None
            metric("bitdial_decode_tokens_per_second", "gauge",
                   "Decode speed: of the last finished request (window=last) and over all requests (window=all).",
                   [({"window": "last"}, self.last_tps), ({"window": "all"}, avg_tps)])
            avg_bits = self.bits_weighted / self.bits_steps if self.bits_steps else None
            metric("bitdial_realized_bits", "gauge",
                   "Realized size-weighted bits per weight of the decoder linears: last request / all requests.",
                   [({"window": "last"}, self.last_bits), ({"window": "all"}, avg_bits)])
            metric("bitdial_latency_target_misses_total", "counter",
                   "Decode steps slower than their request's max_ms_per_token.", [({}, self.misses)])
            metric("bitdial_latency_target_steps_total", "counter",
                   "Decode steps of requests that had a max_ms_per_token.", [({}, self.latency_steps)])
            metric("bitdial_request_threads", "gauge", "Compute threads the last finished request ran on (the "
                   "controller leaves cores that other processes hold).", [({}, self.last_threads)])
            metric("bitdial_target_switches_total", "counter", "Precision target changes made by the controller "
                   "during generations.", [({}, self.target_switches)])
            lines.append("# HELP bitdial_request_duration_seconds Generation time per request, queue wait included.")
            lines.append("# TYPE bitdial_request_duration_seconds histogram")
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, self.hist):
                cum += n
                lines.append(f'bitdial_request_duration_seconds_bucket{{le="{b}"}} {cum}')
            lines.append(f'bitdial_request_duration_seconds_bucket{{le="+Inf"}} {self.hist_count}')
            lines.append(f"bitdial_request_duration_seconds_sum {_num(self.hist_sum)}")
            lines.append(f"bitdial_request_duration_seconds_count {self.hist_count}")
        for name, (help_, fn) in self.gauges.items():
            metric(name, "gauge", help_, [({}, fn())])
        return "\n".join(lines) + "\n"
