"""Realized precision during evaluation: the size-weighted bits each window (request) actually ran at."""

from __future__ import annotations

import math
from typing import Any

import torch

from bitdial.eval.perplexity import LogitsFn


class MeteredLogits:
    """Wrap a logits function of a bitdial model: after every call, record the realized bits of that call
    (one window = one request) from the model's :class:`~bitdial.runtime.anyprec.BitsMeter`."""

    def __init__(self, model: torch.nn.Module, fn: LogitsFn) -> None:
        self.model, self.fn = model, fn
        self.windows: list[tuple[float, int]] = []  # (bits, rows)
        meter = getattr(model, "bits_meter", None)
        if meter is not None:
            meter.take()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.fn(ids)
        meter = getattr(self.model, "bits_meter", None)
        if meter is not None:
            self.windows.append((meter.take(), int(ids.numel())))
        return out

    def summary(self, target: float | None = None) -> dict[str, Any] | None:
        """Mean realized bits (token-weighted) and, given a target, the per-window deviations."""
        w = [(b, n) for b, n in self.windows if not math.isnan(b)]
        if not w:
            return None
        tot = sum(n for _, n in w)
        mean = sum(b * n for b, n in w) / tot
        d: dict[str, Any] = {"realized_bits": mean, "windows": len(w),
                             "per_window_min": min(b for b, _ in w), "per_window_max": max(b for b, _ in w)}
        if target is not None:
            dev = sorted(abs(b - target) for b, _ in w)
            d.update(target=target, deviation=mean - target,
                     per_window_p50_abs_dev=dev[len(dev) // 2],
                     per_window_p99_abs_dev=dev[min(len(dev) - 1, math.ceil(0.99 * len(dev)) - 1)])
        return d
