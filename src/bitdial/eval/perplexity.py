"""Perplexity of a language model over fixed-size windows of one tokenized text.

The text is tokenized once, without special tokens, into ``ids``. Evaluation walks a list of
:class:`Window` s; each window is an independent, fresh context (positions start at 0, nothing carries
over from the previous window). Inside a window the logits at window position ``j`` predict the token
at window position ``j + 1``; a window *scores* the target tokens ``ids[score_from:end]`` (absolute
indices), i.e. it uses logit rows ``score_from - begin - 1 .. end - begin - 2``.

Two window conventions (see :func:`plan_windows`):

* **sliding** (default) -- the Hugging Face "perplexity of fixed-length models" convention: windows of
  ``ctx`` tokens start every ``stride`` tokens (``stride = ctx`` by default); each window scores only
  the targets no earlier window scored, and the first window scores every token it can predict
  (targets ``1 .. end-1``). With ``stride == ctx`` the windows do not overlap and the first token of
  every window is never scored (it has no context inside its window).
* **second_half** -- llama.cpp's ``llama-perplexity``: non-overlapping chunks of exactly ``ctx`` tokens
  (a trailing partial chunk is dropped); in each chunk only the second half is scored, from the logits
  at chunk positions ``ctx//2 .. ctx-2``, i.e. the targets at chunk positions ``ctx//2 + 1 .. ctx-1``
  (``ctx - 1 - ctx//2`` tokens per chunk, 255 for ``ctx = 512``), exactly as ``perplexity.cpp`` does.
  llama.cpp additionally overwrites the first token of each chunk with BOS for models that add BOS;
  that is a property of the ids/logits function, not of the plan, and is not reproduced here.

Perplexity is ``exp`` of the mean negative log-likelihood over *every scored token* (not a mean of
per-window means).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

log = logging.getLogger(__name__)

SLIDING = "sliding"
SECOND_HALF = "second_half"

T = TypeVar("T")


@runtime_checkable
class LogitsFn(Protocol):
    """Anything that scores one fresh context.

    Called with a LongTensor of token ids ``[1, T]`` that starts at position 0 (no state from earlier
    calls may leak in), it returns fp32 logits ``[1, T, V]``: row ``j`` is the distribution of the token
    following ``ids[0, j]``.
    """

    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Adapt a :class:`bitdial.model.llama.Transformer` to :class:`LogitsFn`.

    Every call (re)sizes the KV cache with ``model.setup_cache(1, T)`` and runs ``model(ids, 0)`` under
    :func:`torch.inference_mode`; since the prefill starts at position 0 and is causally masked, the
    stale cache content of a previous window is overwritten before it could be read. The cache is
    allocated *outside* inference mode, so the model stays usable by code that runs it under
    ``torch.no_grad()`` afterwards (inference tensors reject in-place updates outside inference mode).
    """
    from bitdial.runtime.anyprec import prefill_dtype

    if not callable(model) or not hasattr(model, "setup_cache"):
        raise TypeError(f"model_logits_fn needs a bitdial Transformer (with setup_cache), got {type(model).__name__}")

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"expected token ids of shape [1, T], got {getattr(ids, 'shape', type(ids))}")
        model.setup_cache(1, int(ids.shape[1]))
        with torch.inference_mode(), prefill_dtype(model, torch.float32):  # exact k-bit weights, whatever is set
            return model(ids, 0).float()

    return logits_fn


@dataclass(frozen=True)
class Window:
    """One fresh context ``ids[begin:end]`` that scores the targets ``ids[score_from:end]``."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        """Number of tokens fed to the model."""
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        """Number of target tokens this window scores."""
        return self.end - self.score_from

    @property
    def rows(self) -> slice:
        """The logit rows (window positions) whose predictions are scored."""
        return slice(self.score_from - self.begin - 1, self.end - self.begin - 1)


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def plan_windows(n_tokens: int, ctx: int, stride: int | None = None, max_windows: int | None = None,
                 score_second_half: bool = False) -> list[Window]:
    """Plan the evaluation windows over a text of ``n_tokens`` tokens (pure function).

    Args:
        n_tokens: length of the tokenized text (>= 2).
        ctx: tokens per window (>= 2; >= 3 with ``score_second_half``).
        stride: tokens between window starts; default ``ctx``. ``stride < ctx`` overlaps windows (more
            context per scored token); ``stride > ctx`` skips text. Must be ``None`` or ``ctx`` with
            ``score_second_half``.
        max_windows: keep only the first ``max_windows`` windows (``None`` = all).
        score_second_half: llama-perplexity's convention instead of the sliding one (module docstring).

    Returns:
        The windows, in text order; every window scores at least one token. In the sliding convention
        a trailing one-token window (nothing to predict) is dropped.
    """
    n_tokens = _int_arg("n_tokens", n_tokens, 0)
    ctx = _int_arg("ctx", ctx, 2)
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if max_windows is not None:
        max_windows = _int_arg("max_windows", max_windows, 1)
    if stride is not None:
        stride = _int_arg("stride", stride, 1)

    if score_second_half:
        if ctx < 3:
            raise ValueError(f"score_second_half needs ctx >= 3 (ctx={ctx} leaves nothing to score)")
        if stride not in (None, ctx):
            raise ValueError(f"score_second_half uses non-overlapping chunks: stride must be None or ctx={ctx}, "
                             f"got {stride}")
        n_chunks = n_tokens // ctx
        if n_chunks == 0:
            raise ValueError(f"score_second_half needs at least one full chunk of ctx={ctx} tokens; "
                             f"the text has only {n_tokens}")
        if max_windows is not None:
            n_chunks = min(n_chunks, max_windows)
        first = ctx // 2
        return [Window(i * ctx, (i + 1) * ctx, i * ctx + first + 1) for i in range(n_chunks)]

    stride = ctx if stride is None else stride
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(windows) >= max_windows):
            break
    return windows


def as_token_ids(ids: Any) -> torch.Tensor:
    """Normalize token ids (list, numpy array, 1-D or ``[1, N]`` tensor) to a 1-D int64 CPU tensor."""
    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
    else:
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}") from e
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"token ids must be 1-D (or [1, N]), got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError("token ids must be non-negative")
    return t.contiguous()


def iter_progress(items: Sequence[T], description: str, enabled: bool) -> Iterator[T]:
    """Yield ``items``, showing a transient rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=len(items))
        for item in items:
            yield item
            prog.advance(task)


def window_rows(logits_fn: LogitsFn, ids: torch.Tensor, window: Window, index: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``logits_fn`` on one window; return the scored logit rows ``[n, V]`` (fp32) and targets ``[n]``."""
    x = ids[window.begin:window.end].unsqueeze(0)
    logits = logits_fn(x)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits_fn must return a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[1] != window.length or logits.shape[2] < 2:
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for window {index} of "
                         f"{window.length} tokens; expected [1, {window.length}, V]")
    if not logits.is_floating_point():
        raise TypeError(f"logits_fn returned dtype {logits.dtype}; expected floating point logits")
    rows = logits[0, window.rows].to("cpu", torch.float32)
    targets = ids[window.score_from:window.end]
    if int(targets.max()) >= rows.shape[-1]:
        raise ValueError(f"token id {int(targets.max())} is outside the model's vocabulary of {rows.shape[-1]}")
    return rows, targets


def token_nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (float64 ``[n]``) of each target under its row of logits ``[n, V]``.

    ``logsumexp(row) - row[target]``, evaluated in float64 so that e.g. uniform logits give exactly
    ``log V``; the cost is negligible next to the forward pass.
    """
    rows = rows.double()
    return torch.logsumexp(rows, dim=-1) - rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class PerplexityResult:
    """Perplexity over every scored token of a window plan."""

    ppl: float  # exp(nll_mean)
    nll_mean: float  # mean negative log-likelihood (nats) over every scored token
    nll_stderr: float  # standard error of nll_mean (0 with a single token)
    n_scored: int  # scored tokens
    n_windows: int
    n_tokens: int  # length of the tokenized text
    ctx: int
    stride: int
    max_windows: int | None
    convention: str  # "sliding" or "second_half"

    @property
    def ppl_stderr(self) -> float:
        """First-order (delta-method) standard error of ``ppl``, as llama-perplexity prints it."""
        return self.ppl * self.nll_stderr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (plus ``ppl_stderr``)."""
        d = asdict(self)
        d["ppl_stderr"] = self.ppl_stderr
        return d


def perplexity(logits_fn: LogitsFn, ids: Any, ctx: int = 512, stride: int | None = None,
               max_windows: int | None = None, score_second_half: bool = False,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``logits_fn`` on the token ids ``ids`` (the text tokenized once, no special tokens).

    Args:
        logits_fn: see :class:`LogitsFn`; :func:`model_logits_fn` adapts a ``Transformer``.
        ids: token ids (list, 1-D or ``[1, N]`` tensor).
        ctx, stride, max_windows, score_second_half: the window plan, see :func:`plan_windows`.
        progress: show a transient progress bar on stderr.
    """
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
    ids_t = as_token_ids(ids)
    windows = plan_windows(ids_t.numel(), ctx, stride, max_windows, score_second_half)
    total = 0.0
    total_sq = 0.0
    n = 0
    with torch.no_grad():  # not inference_mode: a logits_fn may allocate state the caller reuses later
        for i, w in enumerate(iter_progress(windows, "perplexity", progress)):
            rows, targets = window_rows(logits_fn, ids_t, w, i)
            nll = token_nll(rows, targets)
            if torch.isnan(nll).any():
                raise ValueError(f"logits_fn produced NaN logits in window {i} (tokens {w.begin}..{w.end - 1})")
            total += float(nll.sum())
            total_sq += float((nll * nll).sum())
            n += nll.numel()
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    stderr = math.sqrt(var / (n - 1)) if n > 1 else 0.0
    result = PerplexityResult(
        ppl=math.exp(mean) if mean < 709.0 else math.inf, nll_mean=mean, nll_stderr=stderr, n_scored=n,
        n_windows=len(windows), n_tokens=int(ids_t.numel()), ctx=int(ctx),
        stride=int(ctx if stride is None or score_second_half else stride), max_windows=max_windows,
        convention=SECOND_HALF if score_second_half else SLIDING)
    log.info("perplexity %.4f over %d tokens in %d windows (ctx %d, stride %d, %s)", result.ppl, n,
             len(windows), result.ctx, result.stride, result.convention)
    return result


def scored_targets(windows: Iterable[Window]) -> list[int]:
    """Absolute indices of every scored target, in evaluation order (for checks and per-token output)."""
    return [t for w in windows for t in range(w.score_from, w.end)]
