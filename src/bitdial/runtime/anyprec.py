"""Any-precision layers: one stored set of bitplanes, run at any bit-width up to its maximum.

``AnyPrecisionLinear.forward(x, bits)`` picks the width per call (``bits=None`` uses ``self.bits``, which
a precision policy may change between calls). This file holds the torch reference path: dequantize the
top k planes, then matmul. The dequantized weight of the width in use is cached (one width per layer
by default) so that a run at a fixed width costs one dequantization per layer, not one per call.
Native kernels plug in behind ``_matmul``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitdial import kernels as _kernels
from bitdial.artifact.reader import Artifact, open_artifact
from bitdial.artifact.writer import PATTERN_HINT, resolve_map, unmatched_patterns
from bitdial.errors import BitdialError
from bitdial.model.llama import Transformer
from bitdial.quant.bitplanes import unpack_planes
from bitdial.quant.qtensor import QuantizedTensor, dequantize_uniform_codes


class BitsMeter:
    """Realized precision: the size-weighted mean bits of the decoder linears over the rows they ran.

    Every :class:`AnyPrecisionLinear` (except ``lm_head``, which no policy touches) adds
    ``weights x bits x rows`` per call; ``take()`` returns the mean bits per weight since the last take and
    resets. A decode step runs every linear once on one row, so a take after each step is that step's
    realized bits.
    """

    def __init__(self, total_weights: int) -> None:
        self.total = max(int(total_weights), 1)
        self.bit_rows = 0.0  # sum of weights * bits * rows
        self.rows = 0.0  # sum of weights * rows / total

    def add(self, weights: int, bits: float, rows: int) -> None:
        self.bit_rows += weights * bits * rows
        self.rows += weights * rows / self.total

    def take(self) -> float:
        v = self.bit_rows / (self.rows * self.total) if self.rows else float("nan")
        self.bit_rows = self.rows = 0.0
        return v


class PrefillSettings:
    """How batched inputs (prefill, more than ``kernels.MAX_ROWS`` rows) run, shared by a model's layers.

    ``dtype`` (for direct model calls: evaluation, calibration, profiling): ``torch.float32`` (the default:
    the exact k-bit weights) or ``torch.bfloat16`` (bf16 tiles and attention through torch's GEMM: oneDNN,
    AMX or AVX512-BF16 where present, 3-4x faster than fp32 here). ``generation_dtype``: what
    ``stream_generate`` uses for the prompt (default: bf16 where the CPU multiplies bf16 natively, else
    fp32). ``tile_bytes``: size of the reused tile buffer; the whole float weight is never materialized.
    ``native=False`` sends batches to the cached whole-weight torch reference path instead."""

    def __init__(self, dtype: torch.dtype | None = None, tile_bytes: int = 2 << 20, native: bool = True,
                 model: Transformer | None = None, generation_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tile_bytes = int(tile_bytes)
        self.native = native
        self._x = self._xs = None  # the last input and its conversion (q/k/v and gate/up share an input)
        self._ver = -1
        self.dtype = dtype or torch.float32
        self.generation_dtype = generation_dtype or (torch.bfloat16 if _kernels.fast_bf16() else torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @dtype.setter
    def dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise BitdialError(f"prefill dtype must be float32 or bfloat16, got {dtype}")
        self._dtype = dtype
        self._x = self._xs = None
        if self.model is not None:  # batched attention follows the linears
            for layer in self.model.layers:
                layer.self_attn.prefill_sdpa_dtype = None if dtype == torch.float32 else dtype

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        """x in the prefill dtype; the conversion of the same input tensor is reused by the next layer."""
        ver = -2 if x.is_inference() else x._version  # inference tensors cannot change in place later
        if x is self._x and ver == self._ver:
            return self._xs
        xs = x.to(self._dtype)
        self._x, self._xs, self._ver = x, xs, ver
        return xs


@contextmanager
def prefill_dtype(model, dtype: torch.dtype):
    """Run the model's batched (prefill) matmuls in ``dtype`` inside the block (evaluation uses fp32)."""
    s = getattr(model, "prefill", None)
    if not isinstance(s, PrefillSettings):
        yield
        return
    before = s.dtype
    s.dtype = dtype
    try:
        yield
    finally:
        s.dtype = before


class AnyPrecisionLinear(nn.Module):
    def __init__(self, name: str, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 bits: int | None = None, cache_size: int = 1) -> None:
        super().__init__()
        self.name = name
        self.qt = qt
        self.out_features, self.in_features = qt.shape
        self.max_bits = qt.max_bits
        self.min_bits = qt.min_bits
        self.bias = bias
        self.cache_size = cache_size
        self._cache: dict[int, torch.Tensor] = {}
        self._fused_slot = None  # (int32 tensor, index): the fused decoder's copy of this layer's width
        self.bits = self.max_bits if bits is None else bits
        self.meter: BitsMeter | None = None  # set by build_model for the decoder linears
        self.weights = self.out_features * self.in_features
        self.rule = None  # a dynamic policy's ModuleRule (bitdial.policies.dynamic), or None: static width
        self.per_token_prefill = False  # with a rule: batched rows decide per row (else run at the maximum)
        self.prefill: PrefillSettings | None = None  # set by build_model: tiled native prefill

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, k: int) -> None:
        self._bits = self.check_bits(k)
        if self._fused_slot is not None:
            self._fused_slot[0][self._fused_slot[1]] = self._bits

    def check_bits(self, k: int) -> int:
        k = int(k)
        if not self.min_bits <= k <= self.max_bits:
            raise BitdialError(f"{self.name}: {k} bits requested, but this layer stores "
                               f"{self.min_bits}..{self.max_bits} bits")
        return k

    def weight_at(self, k: int) -> torch.Tensor:
        """The k-bit view as fp32 [N, K] (cached)."""
        w = self._cache.get(k)
        if w is None:
            w = self.qt.dequantize(k)
            if self.cache_size > 0:
                while len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[k] = w
        return w

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.numel() // self.in_features
        rule = self.rule
        if rule is not None and bits is None:
            if rows == 1 or self.per_token_prefill:
                return self._dynamic(x, rule, rows)
            bits = rule.max_bits  # prefill at the maximum
        k = self._bits if bits is None else self.check_bits(bits)
        if self.meter is not None:
            self.meter.add(self.weights, k, rows)
        return self.matmul(x, k)

    def _dynamic(self, x: torch.Tensor, rule, rows: int) -> torch.Tensor:
        """Each row runs at the rule's high width where its error estimate exceeds the threshold."""
        if rows == 1:  # a decode step: one native estimate, one kernel call
            h = rule.decide_one(x.reshape(self.in_features))
            rule.n_rows += 1
            k = rule.high if h else rule.low
            rule.n_high += h
            if self.meter is not None:
                self.meter.add(self.weights, k, 1)
            return self.matmul(x, k)
        x2 = x.reshape(rows, self.in_features)  # [R, K]
        hi = rule.choose(x2)  # [R] bool
        n_hi = int(hi.sum())
        rule.n_rows += rows
        rule.n_high += n_hi
        if self.meter is not None:
            self.meter.add(self.weights, rule.low, rows - n_hi)
            self.meter.add(self.weights, rule.high, n_hi)
        if n_hi == 0 or n_hi == rows:
            return self.matmul(x, rule.high if n_hi else rule.low)
        y = torch.empty(rows, self.out_features, dtype=x.dtype)  # [R, N]
        y[hi] = self.matmul(x2[hi], rule.high)
        y[~hi] = self.matmul(x2[~hi], rule.low)
        return y.view(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor, k: int) -> torch.Tensor:  # [..., K] -> [..., N] at k bits
        if (_kernels.enabled and self.qt.method == "uniform" and x.dtype == torch.float32 and not x.requires_grad
                and 0 < x.numel() <= _kernels.MAX_ROWS * self.in_features and _kernels.available()
                and _kernels.supports(self.qt)):
            # decode / small batch: native GEMV straight from the bit planes (bitdial.kernels)
            y = _kernels.gemv(self.qt, x.reshape(-1, self.in_features).contiguous(), k)
            if self.bias is not None:
                y += self.bias
            return y.view(*x.shape[:-1], self.out_features)
        s = self.prefill
        if (s is not None and s.native and _kernels.enabled and self.qt.method == "uniform" and not x.requires_grad
                and x.dtype == torch.float32 and _kernels.available() and _kernels.supports(self.qt)):
            return self._tiled(x, k, s)
        return F.linear(x, self.weight_at(k), self.bias)

    def _tiled(self, x: torch.Tensor, k: int, s: PrefillSettings) -> torch.Tensor:
        """Batched rows: dequantize tiles of output rows of the k-bit view natively into one reused buffer
        and multiply each with torch's GEMM in ``s.dtype``."""
        N, K = self.out_features, self.in_features
        x2 = x.reshape(-1, K)  # [R, K]
        xs = s.convert(x).reshape(-1, K)
        esz = 2 if s.dtype == torch.bfloat16 else 4
        T = max(16, min(N, s.tile_bytes // (K * esz)))
        if T >= N:
            w = _kernels.dequant(self.qt, k, 0, N, torch.empty(N, K, dtype=s.dtype))
            y = F.linear(xs, w).float()
        else:
            y = torch.empty(x2.shape[0], N, dtype=torch.float32)
            buf = torch.empty(T, K, dtype=s.dtype)
            for n0 in range(0, N, T):
                n1 = min(N, n0 + T)
                w = _kernels.dequant(self.qt, k, n0, n1, buf[:n1 - n0])
                y[:, n0:n1] = F.linear(xs, w)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], N)

    def bytes_at(self, k: int) -> int:
        return self.qt.bytes_read(k)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features}->{self.out_features}, bits={self._bits}/{self.max_bits} ({self.qt.method})"


class QuantEmbedding(nn.Module):
    """Embedding lookup that dequantizes only the rows it needs: ids [B, T] -> [B, T, D]."""

    def __init__(self, qt: QuantizedTensor, bits: int | None = None) -> None:
        super().__init__()
        if qt.method != "uniform":
            raise BitdialError("quantized embeddings use the uniform method")
        self.qt = qt
        self.max_bits = qt.max_bits
        self.weights = qt.shape[0] * qt.shape[1]
        self._fused_slot = None
        self.bits = self.max_bits if bits is None else int(bits)

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, k: int) -> None:
        k = int(k)
        if not 1 <= k <= self.max_bits:
            raise BitdialError(f"embed_tokens: {k} bits requested, but it stores 1..{self.max_bits} bits")
        self._bits = k
        if self._fused_slot is not None:
            self._fused_slot[0][self._fused_slot[1]] = k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        k, qt = self.bits, self.qt
        flat = ids.reshape(-1)
        rows, inv = torch.unique(flat, return_inverse=True)
        codes = unpack_planes(qt.planes[:k, rows], k, qt.shape[1])  # [R, D]
        w = dequantize_uniform_codes(codes, qt.scales[rows], qt.offsets[rows], k, qt.max_bits, qt.group_size)
        return w[inv].view(*ids.shape, qt.shape[1])


def _parse_bits(bits: int | Mapping[str, int] | None, names: list[str], art: Artifact) -> dict[str, int]:
    maxb = {n: art.modules[n]["max_bits"] for n in names}
    if bits is None:
        chosen = dict(maxb)
    elif isinstance(bits, Mapping):
        bad = unmatched_patterns(bits, names + ["lm_head"])
        if bad:
            raise BitdialError(f"bits map: {bad[0]!r} matches no module of the artifact ({PATTERN_HINT})")
        chosen = resolve_map(bits, names, None)
        chosen = {n: (maxb[n] if v is None else int(v)) for n, v in chosen.items()}
    else:
        chosen = {n: int(bits) for n in names}
    for n, b in chosen.items():
        lo = art.modules[n]["min_bits"]
        if not lo <= b <= maxb[n]:
            raise BitdialError(f"{n}: {b} bits requested, but the artifact stores {lo}..{maxb[n]} bits for it "
                               "(re-quantize with a higher --max-bits, or pin this module lower)")
    return chosen


def _pad_planes_default() -> bool:
    v = os.environ.get("BITDIAL_PAD_PLANES", "0").strip().lower()
    if v not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise BitdialError(f"BITDIAL_PAD_PLANES must be 0 or 1, got {v!r}")
    return v in ("1", "true", "yes", "on")


def build_model(art: Artifact | str | Path, bits: int | Mapping[str, int] | None = None,
                *, head_bits: int | None = None, embed_bits: int | None = None,
                prefill_dtype: torch.dtype | None = None,
                generation_prefill_dtype: torch.dtype | None = None,
                pad_planes: bool | None = None) -> Transformer:
    """A decoder whose linears are AnyPrecisionLinear over the artifact's planes.

    ``bits``: one width for every module, or a ``{module pattern: bits}`` map (with an optional
    ``"default"``); modules not covered run at their maximum. ``embed_tokens`` and ``lm_head`` follow the
    map like any module; a plain int leaves them at their stored maximum unless ``head_bits`` /
    ``embed_bits`` say otherwise. ``prefill_dtype`` / ``generation_prefill_dtype``: see
    :class:`PrefillSettings` (default fp32 for direct calls; generation's prompt in bf16 where the CPU
    multiplies bf16 natively). ``pad_planes``: copy every plane stack whose plane stride is a multiple of
    4 KiB to a padded stride (:func:`bitdial.kernels.pad_planes`: faster decode at high k, one RAM copy of
    the planes instead of reading them from the mmapped file, so loading is no longer a mapping without
    reads); default: the ``BITDIAL_PAD_PLANES`` environment variable (``1`` turns it on), else off.
    """
    if not isinstance(art, Artifact):
        art = open_artifact(art)
    cfg = art.config
    linears = cfg.linear_names() + ["lm_head"]
    head_src = "lm_head" if "lm_head" in art.modules else "embed_tokens"
    names = cfg.linear_names() + ["embed_tokens"] + (["lm_head"] if head_src == "lm_head" else [])
    if isinstance(bits, int):
        chosen = _parse_bits(bits, cfg.linear_names(), art)
        chosen["embed_tokens"] = embed_bits or art.modules["embed_tokens"]["max_bits"]
        chosen["lm_head"] = head_bits or art.modules[head_src]["max_bits"]
    else:
        chosen = _parse_bits(bits, names, art)
        if head_src != "lm_head":
            chosen["lm_head"] = resolve_map(bits or {}, ["lm_head"], chosen["embed_tokens"])["lm_head"]
            if bits is None or chosen["lm_head"] is None:
                chosen["lm_head"] = art.modules["embed_tokens"]["max_bits"]
    floats = art.float_tensors()
    pad = _pad_planes_default() if pad_planes is None else pad_planes
    qts: dict[str, QuantizedTensor] = {}

    def qtensor(src: str) -> QuantizedTensor:  # once per stored tensor (a tied head shares the embedding's)
        if src not in qts:
            qt = art.qtensor(src)
            if pad and qt.method == "uniform" and _kernels.enabled and _kernels.available():
                qt = _kernels.pad_planes(qt)
            qts[src] = qt
        return qts[src]

    def factory(name: str, weight: Any, bias: torch.Tensor | None) -> nn.Module:
        src = head_src if name == "lm_head" else name
        return AnyPrecisionLinear(name, qtensor(src), bias, bits=int(chosen[name]))

    weights = _ArtifactWeights(floats, linears, head_src)
    emb = QuantEmbedding(qtensor("embed_tokens"), bits=int(chosen["embed_tokens"]))
    model = Transformer(cfg, weights, factory, embedding=emb).eval()
    model.artifact = art
    dec = [m for n, m in model.linears().items() if n != "lm_head" and isinstance(m, AnyPrecisionLinear)]
    model.bits_meter = BitsMeter(sum(m.weights for m in dec))
    if _kernels.enabled and _kernels.available():
        model.decode_torch_threads = 1  # decode: linears in the kernels' pool, the small rest on one torch thread
    for m in dec:
        m.meter = model.bits_meter
    model.prefill = PrefillSettings(prefill_dtype, model=model, generation_dtype=generation_prefill_dtype)
    for m in model.linears().values():
        if isinstance(m, AnyPrecisionLinear):
            m.prefill = model.prefill
    from bitdial.runtime.fused import FusedDecoder

    fused = FusedDecoder(model)
    model.fast_decode = None if fused.reason else fused
    return model


class _ArtifactWeights(Mapping):
    """What Transformer reads: float tensors by name, and placeholders for the quantized weights
    (the factory fetches the planes itself)."""

    def __init__(self, floats: dict[str, torch.Tensor], linears: list[str], head_src: str) -> None:
        self.floats = floats
        self.placeholders = {f"{n}.weight" for n in linears} | {"embed_tokens.weight"}
        if head_src == "lm_head":
            self.placeholders.add("lm_head.weight")

    def __getitem__(self, k: str):
        if k in self.floats:
            return self.floats[k]
        if k in self.placeholders:
            return None
        raise KeyError(k)

    def __iter__(self):
        return iter(list(self.floats) + sorted(self.placeholders))

    def __len__(self) -> int:
        return len(self.floats) + len(self.placeholders)


def set_bits(model: Transformer, bits: int | Mapping[str, int]) -> None:
    """Change the widths of a built model in place (no reload)."""
    lin = {n: m for n, m in model.linears().items() if isinstance(m, AnyPrecisionLinear)}
    if isinstance(bits, Mapping):
        chosen = resolve_map(bits, list(lin), None)
        for n, b in chosen.items():
            if b is not None:
                lin[n].bits = b
    else:
        for n, m in lin.items():
            if n != "lm_head":
                m.bits = bits
