"""Measured quality of a per-module bit assignment: KL divergence of the artifact's model against
itself at maximum bits, on a few short windows, cheaply.

:class:`KLProbe` builds the any-precision model once, builds (or loads from the on-disk cache of
:mod:`bitdial.eval.kld`) the reference distributions at maximum bits, and caches the hidden state that
enters every decoder layer of every window at maximum bits. Measuring an assignment whose lowest changed
module sits in layer ``i`` reruns only layers ``i..L-1`` and the head: when one module changes at a time
(the sensitivity ground truth) this halves the cost on average. Only modules whose width changed since
the previous measurement are re-dequantized.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from bitdial.errors import BitdialError
from bitdial.planning.common import artifact_identity, module_layer

log = logging.getLogger(__name__)

__all__ = ["KLProbe"]


class KLProbe:
    """KL(artifact at max bits || artifact at an assignment) on ``n_windows`` windows of ``ctx`` tokens.

    Args:
        art: an open :class:`~bitdial.artifact.Artifact`.
        ids: token ids (1-D) of the text to measure on; the first ``n_windows * ctx`` are used.
        ctx, n_windows: the window plan (non-overlapping windows).
        tail_samples: draws from each reference token's tail, for the unbiased full-KL estimate.
        cache_dir: reference cache directory (default: bitdial.eval's, ``~/.cache/bitdial/kld``).
    """

    def __init__(self, art, ids: torch.Tensor, *, ctx: int = 128, n_windows: int = 2, tail_samples: int = 0,
                 cache_dir=None, progress: bool = False) -> None:
        from bitdial.eval import load_or_build_reference, model_logits_fn
        from bitdial.runtime.anyprec import build_model

        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        need = ctx * n_windows
        if ids.numel() < need:
            raise BitdialError(f"the KL sample needs {need} tokens ({n_windows} windows of {ctx}); the text has "
                               f"only {ids.numel()}: give a longer text or fewer/shorter windows")
        self.ids = ids[:need].clone()
        self.art = art
        self.ctx, self.n_windows = int(ctx), int(n_windows)
        self.model = build_model(art)
        self.n_layers = art.config.n_layers
        self.tied = "lm_head" not in art.modules
        self.max_bits = {n: int(m["max_bits"]) for n, m in art.modules.items()}
        self.current = dict(self.max_bits)
        ident = artifact_identity(art)
        self.identity = f"bitdial-artifact:{ident['header_sha256']}@max-bits"
        self.reference = load_or_build_reference(
            model_logits_fn(self.model), self.ids, ctx=self.ctx, max_windows=self.n_windows, identity=self.identity,
            tail_samples=tail_samples, cache_dir=cache_dir, progress=progress)
        self._hidden: dict[bytes, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for w in self.reference.windows:
                x_ids = self.ids[w.begin:w.end][None]  # [1, T]
                self._hidden[x_ids.numpy().tobytes()] = self._layer_inputs(x_ids)
        self.calls = 0

    # ---- model state ------------------------------------------------------------------------------
    def _layer_inputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states [1, T, D] entering each decoder layer, at the current widths (max at init)."""
        m = self.model
        T = ids.shape[1]
        m.setup_cache(1, T)
        cos, sin = m.cos[:T], m.sin[:T]
        x = m.embed_tokens(ids)
        out = []
        for layer in m.layers:
            out.append(x)
            x = layer(x, cos, sin, 0)
        return out

    def _set(self, name: str, bits: int) -> None:
        lin = self.model.linears()
        if name == "embed_tokens":
            self.model.embed_tokens.bits = bits
            if self.tied:
                lin["lm_head"].bits = bits
        elif name in lin:
            lin[name].bits = bits
        else:
            raise BitdialError(f"unknown module {name!r}")
        self.current[name] = bits

    def apply(self, bits: Mapping[str, int]) -> int:
        """Set the model to ``bits`` (modules not named run at their maximum); return the first decoder layer
        whose output can differ from the max-bits run (``n_layers`` when only the head changed)."""
        target = dict(self.max_bits)
        for n, b in bits.items():
            if n not in target:
                if n == "lm_head" and self.tied:
                    continue  # the tied head follows embed_tokens
                raise BitdialError(f"module {n!r} is not in the artifact")
            target[n] = int(b)
        for n, b in target.items():
            if self.current[n] != b:
                self._set(n, b)
        start = self.n_layers
        for n, b in target.items():
            if b == self.max_bits[n]:
                continue
            layer = module_layer(n)
            if layer is None:
                start = 0 if n == "embed_tokens" else min(start, self.n_layers)
            else:
                start = min(start, layer)
        return start

    def _logits_fn(self, start: int):
        m = self.model

        def fn(ids: torch.Tensor) -> torch.Tensor:  # [1, T] -> [1, T, V]
            hidden = self._hidden.get(ids.numpy().tobytes())
            with torch.inference_mode():
                if hidden is None or start == 0:
                    T = ids.shape[1]
                    m.setup_cache(1, T)
                    return m(ids, 0).float()
                T = ids.shape[1]
                m.setup_cache(1, T)
                cos, sin = m.cos[:T], m.sin[:T]
                x = hidden[start] if start < self.n_layers else None
                if x is None:  # only the head changed: rerun the last layer from its cached input
                    x = m.layers[-1](hidden[-1], cos, sin, 0)
                else:
                    for layer in m.layers[start:]:
                        x = layer(x, cos, sin, 0)
                return m.lm_head(m.norm(x)).float()

        return fn

    # ---- measuring ------------------------------------------------------------------------------
    def measure(self, bits: Mapping[str, int]) -> Any:
        """The :class:`~bitdial.eval.KLResult` of the model at ``bits`` against the max-bits reference."""
        from bitdial.eval import kl_divergence

        start = self.apply(bits)
        self.calls += 1
        return kl_divergence(self._logits_fn(start), self.ids, self.reference, progress=False)

    def kl(self, bits: Mapping[str, int]) -> float:
        """Mean KL (top-k + rest lower bound, nats per token) at ``bits``."""
        return float(self.measure(bits).kl_mean)

    @property
    def n_tokens(self) -> int:
        return self.reference.n_scored
