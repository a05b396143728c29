"""One model, one generation at a time: a bounded queue in front of a single worker thread.

torch already spreads one decode step over every core, so generations run one after another on one
thread; requests wait in a bounded FIFO (a full queue is refused, see :class:`QueueFull`). Each job
reports back through its ``sink`` callback, called on the worker thread with ``(kind, payload)``:

* ``("start", None)`` when the generation starts,
* ``("text", piece)`` for every piece of text,
* ``("done", report)`` at the end (``job.result`` holds the totals; ``report`` the ``bitdial`` timings),
* ``("error", exception)`` if the generation failed,
* ``("dropped", None)`` if the job was cancelled before it started.

Setting ``job.cancel`` (see :meth:`GenerationWorker.cancel`) stops a running generation before its next
decode step and drops a queued one at once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from bitdial.runtime.generate import GenerationResult, SamplingParams, stream_generate
from bitdial.serving.metrics import Metrics
from bitdial.serving.precision import PrecisionGovernor, PrecisionPlan

log = logging.getLogger(__name__)

Sink = Callable[[str, Any], None]


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests already."""


class ShuttingDown(Exception):
    """The worker is stopping and takes no new jobs."""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    plan: PrecisionPlan
    sink: Sink
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancel: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult = field(default_factory=GenerationResult)
    report: dict[str, Any] = field(default_factory=dict)
    state: str = "new"  # new, queued, running, done, failed, dropped
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.sink(kind, payload)
        except Exception:  # a listener that went away must not kill the worker
            log.debug("job %s: sink failed on %s; cancelling", self.id, kind, exc_info=True)
            self.cancel.set()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class GenerationWorker:
    def __init__(self, engine: Any, governor: PrecisionGovernor, metrics: Metrics, *, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.governor = governor
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._holds = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_job: Job | None = None  # the most recent finished job (for tests and debugging)
        self.jobs_done = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="bitdial-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything queued and running, and wait for the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        for job in dropped:
            job.cancel.set()
            job.state = "dropped"
            job.emit("dropped")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation thread did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._running is not None

    # ---- jobs --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job, or raise :class:`QueueFull` / :class:`ShuttingDown`."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue})")
            job.state, job.enqueued_at = "queued", time.monotonic()
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it is still queued, else stop it before its next step."""
        job.cancel.set()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return
            job.state = "dropped"
        log.info("job %s dropped from the queue: client disconnected", job.id)
        self.metrics.cancel()
        job.emit("dropped")

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Start no new job while held (the running one finishes); queued jobs wait. For draining and tests."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    # ---- the thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._holds):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                self._run(job)
            except Exception:  # keep the worker alive whatever one job does
                log.exception("job %s: unexpected failure", job.id)
            finally:
                with self._cond:
                    self._running = None
                    self.last_job = job
                    self.jobs_done += 1

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            job.state = "dropped"
            job.emit("dropped")
            return
        job.state, job.started_at = "running", time.monotonic()
        job.emit("start")
        res = job.result
        session = self.governor.session(job.plan)
        try:
            session.start()
            for piece in stream_generate(self.engine.model, self.engine.tokenizer, job.prompt_ids, job.params,
                                         res, step_hook=session.step_hook, cancel=job.cancel):
                job.emit("text", piece)
        except Exception as e:  # reported to the client
            job.state, job.finished_at = "failed", time.monotonic()
            if isinstance(e, ValueError):
                log.info("job %s: %s", job.id, e)
            else:
                log.exception("job %s: generation failed", job.id)
            job.emit("error", e)
            return
        finally:
            session.finish()
            self.governor.restore()
        job.state, job.finished_at = "done", time.monotonic()
        job.report = self._report(job, session.report())
        self.metrics.generation(
            prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
            decode_steps=res.decode_steps, decode_s=res.decode_s, prefill_s=res.prefill_s,
            realized_bits=res.realized_bits, misses=session.misses,
            had_target=job.plan.max_ms_per_token is not None, switches=session.switches,
            threads=session.threads if session.threads is not None else torch.get_num_threads(),
            seconds=job.finished_at - job.enqueued_at)
        if res.cancelled:
            self.metrics.cancel()
            log.info("job %s cancelled after %d tokens: client disconnected", job.id, res.completion_tokens)
        else:
            log.debug("job %s: %d + %d tokens, %.1f tok/s, %s", job.id, res.prompt_tokens,
                      res.completion_tokens, res.decode_tps, res.finish_reason)
        job.emit("done", job.report)

    @staticmethod
    def _report(job: Job, precision: dict[str, Any]) -> dict[str, Any]:
        res = job.result
        ms = res.step_ms
        return {
            "realized_bits": res.realized_bits,
            **precision,
            "queue_ms": ((job.started_at or job.enqueued_at) - job.enqueued_at) * 1e3,
            "prefill_ms": res.prefill_s * 1e3,
            "prefill_tokens_per_s": res.prefill_tps,
            "decode_steps": res.decode_steps,
            "decode_tokens_per_s": res.decode_tps,
            "ms_per_token_p50": percentile(ms, 50),
            "ms_per_token_p95": percentile(ms, 95),
        }
