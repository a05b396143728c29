"""Text generation: prefill in one batched pass, then token-by-token decode with sampling and streaming."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from bitdial.loading.tokenizer import Tokenizer
from bitdial.model.llama import Transformer


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (as in CTRL / transformers: divide positive logits)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_ids: list[int] | None = None  # None = the tokenizer's end-of-sequence ids
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = ""  # "stop" (eos or stop string) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # forward passes of one token
    step_ms: list[float] = field(default_factory=list)  # wall time of each decode step
    step_bits: list[float] = field(default_factory=list)  # realized size-weighted bits of each decode step
    cancelled: bool = False

    @property
    def realized_bits(self) -> float | None:
        """Mean size-weighted bits of the linears over the decode steps (None for a float model)."""
        b = [x for x in self.step_bits if x == x]
        return sum(b) / len(b) if b else None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(completion_tokens=self.completion_tokens, prefill_tokens_per_s=self.prefill_tps,
                 decode_tokens_per_s=self.decode_tps, realized_bits=self.realized_bits)
        return d


#: Candidates of the top-p head in ``sample_next``; a distribution too flat for them is sorted whole.
_TOP_P_FIRST = 64


def sample_next(logits: torch.Tensor, p: SamplingParams, history: torch.Tensor | None,
                gen: torch.Generator | None) -> int:
    """Pick one token from logits [V]. ``history`` holds the ids seen so far (for the penalty).

    Top-k keeps exactly ``top_k`` tokens (ties at the k-th logit broken by ``torch.topk``). Top-k and top-p
    work on a sorted ``topk`` of the candidates (top-p on the 64 most likely tokens, and on a numpy sort of
    the whole vocabulary only when those hold less than ``top_p``), and the draw is one uniform number mapped
    through the kept tokens' cumulative probabilities (in float64, so rare tokens keep their chance). A full
    torch sort and ``torch.multinomial`` over 49152 logits took ~6.5 ms per token on one core, more than a
    decode step (docs/serving.md). Logits that give no distribution (NaN, all -inf) raise ValueError.
    """
    logits = logits.detach().float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.unique(history)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0:  # numpy's argmax: 8 us for 49152 logits against torch's 120 us (one thread)
        return int(np.argmax(logits.numpy()))
    z = (logits - logits.max()) / p.temperature  # shifted first: a tiny temperature gives -inf, never inf - inf
    V = z.numel()
    if p.top_k and p.top_k < V:  # the k largest logits, sorted; probabilities renormalized over them
        vals, idx = torch.topk(z, p.top_k)
        probs = torch.softmax(vals, dim=-1)
    else:
        idx = None
        probs = torch.softmax(z, dim=-1)  # [V], vocabulary order
    if p.top_p < 1.0 and idx is None:  # a sorted head of the distribution that holds at least top_p of the mass
        top, idx = torch.topk(probs, min(V, _TOP_P_FIRST))
        if float(top.sum()) < p.top_p:  # a flat distribution: sort it all (numpy's sort is ~4x torch's)
            idx = torch.from_numpy(np.argsort(-probs.numpy()))
            top = probs[idx]
        probs = top
    cum = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # one sum serves the top-p cut and the draw
    if p.top_p < 1.0:
        keep = max(1, int((cum - probs <= p.top_p).sum()))  # the smallest sorted prefix reaching top_p
        cum, idx = cum[:keep], idx[:keep]
    total = float(cum[-1])
    if not 0.0 < total < float("inf"):
        raise ValueError("the logits give no probability distribution (NaN or all -inf): the model's output is "
                         "broken; check the model file or artifact")
    u = torch.rand((), dtype=torch.float64, generator=gen) * total
    j = min(int(torch.searchsorted(cum, u, right=True)), cum.numel() - 1)
    return int(idx[j]) if idx is not None else j


class _StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class StepInfo:
    """What a decode step reports to ``step_hook``."""

    step: int  # 0-based index of the decode step
    seconds: float  # wall time of this step (forward pass + sampling)
    bits: float  # realized size-weighted bits of the linears in this step (nan for a float model)
    position: int  # tokens in the context after this step


@contextmanager
def decode_threads(model: Transformer) -> Iterator[None]:
    """Run decode steps with torch on ``model.decode_torch_threads`` threads (if set), then restore.

    A model whose linears run in the native kernels' own thread pool does the rest of a decode step (norms,
    attention over one query) in tiny torch ops: one torch thread keeps two thread pools from spinning
    against each other on the same cores (docs/kernels.md)."""
    n = getattr(model, "decode_torch_threads", None)
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generation_prefill(model: Transformer):
    """The prompt of a generation runs in the model's ``prefill.generation_dtype`` (bf16 tiles where the CPU
    multiplies bf16 natively: bitdial.runtime.anyprec.PrefillSettings); other calls keep ``prefill.dtype``."""
    from bitdial.runtime.anyprec import PrefillSettings, prefill_dtype

    s = getattr(model, "prefill", None)
    return prefill_dtype(model, s.generation_dtype) if isinstance(s, PrefillSettings) else nullcontext()


def _step_bits(model: Transformer) -> float:
    meter = getattr(model, "bits_meter", None)
    return meter.take() if meter is not None else float("nan")


def stream_generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                    result: GenerationResult | None = None, *,
                    step_hook: Callable[[StepInfo], None] | None = None,
                    cancel: threading.Event | None = None) -> Iterator[str]:
    """Yield text pieces as they are produced (complete UTF-8 only); fill ``result`` with the totals.

    ``step_hook`` is called after every decode step (a controller may change the model's precision
    target from it); setting ``cancel`` stops the generation before the next step
    (``finish_reason = "cancelled"``).
    """
    params.validate()
    res = result if result is not None else GenerationResult()
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    cfg = model.config
    total = len(prompt_ids) + params.max_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {cfg.max_seq_len}; shorten the prompt or lower max_tokens"
        )
    res.prompt_tokens = len(prompt_ids)
    stop_ids = set(tokenizer.eos_ids if params.stop_ids is None else params.stop_ids)
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    history = torch.tensor(prompt_ids, dtype=torch.long)
    matcher = _StopMatcher(params.stop)
    detok = tokenizer.stream()
    stopped = False
    if params.max_tokens == 0:
        res.finish_reason = "length"
        return
    with torch.inference_mode():
        model.setup_cache(1, total)
        t0 = time.perf_counter()
        with _generation_prefill(model):
            logits = model(history[None], 0, last_only=True)[0, -1]  # [V]
        _step_bits(model)  # prefill is not counted in the decode figures
        res.prefill_s = time.perf_counter() - t0
        pos = len(prompt_ids)
        t1 = ts = time.perf_counter()
        with decode_threads(model):
            while True:
                if cancel is not None and cancel.is_set():
                    res.finish_reason, res.cancelled = "cancelled", True
                    break
                tok = sample_next(logits, params, history, gen)
                if tok in stop_ids:
                    res.finish_reason = "stop"
                    break
                res.token_ids.append(tok)
                history = torch.cat([history, torch.tensor([tok])])
                piece, stopped = matcher.feed(detok.push(tok))
                if piece:
                    res.text += piece
                    yield piece
                if stopped:
                    res.finish_reason = "stop"
                    break
                if len(res.token_ids) >= params.max_tokens:
                    res.finish_reason = "length"
                    break
                logits = model(torch.tensor([[tok]]), pos)[0, -1]
                pos += 1
                now = time.perf_counter()
                info = StepInfo(res.decode_steps, now - ts, _step_bits(model), pos)
                ts = now
                res.step_ms.append(info.seconds * 1e3)
                res.step_bits.append(info.bits)
                res.decode_steps += 1
                if step_hook is not None:
                    step_hook(info)
        res.decode_s = time.perf_counter() - t1
    if not stopped and not res.cancelled:  # eos or length: emit what the decoders still hold
        tail, hit = matcher.feed(detok.flush())
        if not hit:
            tail += matcher.flush()
        if tail:
            res.text += tail
            yield tail


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
    res = GenerationResult()
    for _ in stream_generate(model, tokenizer, prompt_ids, params, res):
        pass
    return res
