"""The fused native decode step: one token through the whole any-precision decoder in one C call.

A decode step of the default model is ~210 GEMVs of a few microseconds each plus ~20 small torch ops
per layer; driven from Python, the small ops and the per-call overhead cost several times the GEMVs.
``FusedDecoder`` hands the whole step to ``bitdial.kernels._native.decoder_step`` (``csrc/decode.c``):
embedding row, per layer RMSNorm, q/k/v (one thread-pool job), q/k norm, RoPE, the KV-cache append,
attention over the one query, o, RMSNorm, gate/up (one job), SwiGLU, down, residuals, then the final
norm and the head. It runs exactly the arithmetic of the module path (same kernels, same widths), so the
two agree to float rounding (``tests/test_fused.py``).

It is the model's ``fast_decode`` seam (``Transformer.forward`` calls it for one token of one sequence).
It follows the model's state without being told:

* static widths: every ``AnyPrecisionLinear`` / ``QuantEmbedding`` writes its ``bits`` into the shared
  ``bits`` array when it changes (``set_bits``, plans, the controller);
* dynamic precision: when ``model.dynamic`` has a target, that policy's rules (low/high widths,
  thresholds, estimators) are copied into the shared rule arrays, once per target switch; the C step
  then decides h or l per module per token. Online threshold tracking (``adapt > 0``) runs in Python,
  so the step falls back to the module path then;
* the KV cache and RoPE tables are the model's own tensors (prefill runs in torch and writes them);
  a reallocated cache rebuilds the descriptor.

It returns None (the caller then runs the module path) when the kernels are disabled or missing, or when
any linear cannot run natively (non-uniform method, unsupported group size). A dense fp32 model (every
linear a ``DenseLinear``) runs the same step with fp32 GEMVs (the fp32 decoder of ``Engine`` for GGUF and
HF sources; ``install_dense``).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import torch

from bitdial import kernels as _kernels

log = logging.getLogger(__name__)

PARTS = ("qkv", "o", "gate_up", "down", "head")  # profile parts of a step (csrc/decode.h BD_PART_*)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RULE_COLS = 7  # on, low, high, threshold, a, c, b (csrc/decode.h)


G_FP32, G_FP16, G_INT8 = 0, 1, 2  # estimator matrix formats (csrc/decode.h BD_G_*)


def _estimator_matrix(G: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The copy of an estimator's G [k, K] that the step reads, and its format: int8 codes and row scales
    for the int8 estimator format that calibrate stores (policies.dynamic.g_int8_parts), else fp16 for
    fp16-exact values, else fp32. Every format gives the estimate of the fp32 values."""
    from bitdial.policies.dynamic import g_int8_parts

    G = G.to(torch.float32).contiguous()
    parts = g_int8_parts(G)
    if parts is not None:
        q, sc = parts
        k, K = q.shape
        off = (k * K + 63) // 64 * 64  # csrc/decode.h bd_g_int8_scales_offset
        buf = torch.zeros(off + 4 * k, dtype=torch.uint8)
        buf[: k * K] = q.view(torch.uint8).flatten()
        buf[off:] = sc.view(torch.uint8)
        return buf, G_INT8
    half = G.to(torch.float16)
    if torch.equal(half.to(torch.float32), G):  # fp16-exact: read half the bytes
        return half.contiguous(), G_FP16
    return G, G_FP32


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def install_dense(model) -> bool:
    """Give a dense fp32 decoder the fused native step (True if it could); its decode then runs torch on one
    thread beside the kernel pool, like an artifact model's."""
    fused = FusedDecoder(model)
    if fused.reason:
        log.debug("fused fp32 decode off: %s", fused.reason)
        return False
    model.fast_decode = fused
    model.decode_torch_threads = 1
    return True


class FusedDecoder:
    def __init__(self, model) -> None:
        from bitdial.model.llama import DenseLinear, Embedding
        from bitdial.runtime.anyprec import AnyPrecisionLinear, QuantEmbedding

        self.model = model
        cfg = model.config
        L = cfg.n_layers
        self.n_slots = 7 * L + 2
        self.reason: str | None = None
        mods: list = []
        for i, layer in enumerate(model.layers):
            a, m = layer.self_attn, layer.mlp
            mods += [getattr(a, n) if n in PROJ[:4] else getattr(m, n) for n in PROJ]
        mods += [model.lm_head, model.embed_tokens]
        self.mods = mods
        self.dense = all(type(m) is DenseLinear for m in mods[:-1]) and type(mods[-1]) is Embedding
        if not _kernels.available():
            self.reason = "the native kernels are not built"
        elif self.dense:
            if not all(m.weight.dtype == torch.float32 and m.weight.is_contiguous() for m in mods):
                self.reason = "a dense weight is not contiguous fp32"
        elif not all(isinstance(m, AnyPrecisionLinear) for m in mods[:-1]) or not isinstance(mods[-1], QuantEmbedding):
            self.reason = "the linears are neither all any-precision layers nor all dense fp32"
        elif not all(_kernels.supports(m.qt) for m in mods):
            self.reason = "a layer cannot run natively (non-uniform method or unsupported group size)"
        if self.reason:
            log.debug("fused decode off: %s", self.reason)
            return
        n = self.n_slots
        self.bits = torch.zeros(n, dtype=torch.int32)
        self.chosen = torch.zeros(n, dtype=torch.uint8)
        self.n_high = torch.zeros(n, dtype=torch.int64)
        self.rules = torch.zeros(n, RULE_COLS, dtype=torch.float64)
        self.gptr = torch.zeros(n, 3, dtype=torch.int64)  # G pointer, rows, format G_* (csrc/decode.h)
        self.steps = 0  # fused steps with dynamic rules since the last counter flush
        for i, m in enumerate(mods):
            if self.dense:
                self.bits[i] = 32
            else:
                self.bits[i] = m.bits
                m._fused_slot = (self.bits, i)
        self._rule_key = None
        self._rule_cache: dict = {}
        self._handle = None
        self._cache_ref = None
        self._isa_gen = -1

    # ---- descriptor ----------------------------------------------------------------------------
    def _build(self) -> None:
        m, cfg = self.model, self.model.config
        L = cfg.n_layers
        eps_bits = struct.unpack("<I", struct.pack("<f", float(cfg.norm_eps)))[0]
        cache0 = m.layers[0].self_attn.cache
        S_max = cache0.k.shape[2]
        head = [L, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, S_max, eps_bits,
                _ptr(m.cos), _ptr(m.sin), _ptr(m.norm.weight), _ptr(self.bits), _ptr(self.chosen),
                _ptr(self.n_high), _ptr(self.rules), _ptr(self.gptr)]
        keep = [m.cos, m.sin]
        for layer in m.layers:
            a = layer.self_attn
            c = a.cache
            if not (c.k.is_contiguous() and c.v.is_contiguous() and c.k.dtype == torch.float32):
                raise RuntimeError("fused decode needs contiguous fp32 KV caches")
            head += [_ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight),
                     _ptr(a.q_norm.weight) if a.q_norm is not None else 0,
                     _ptr(a.k_norm.weight) if a.k_norm is not None else 0, _ptr(c.k), _ptr(c.v)]
        for mod in self.mods:
            bias = getattr(mod, "bias", None)
            if bias is not None:
                bias = bias.detach().to(torch.float32).contiguous()
                keep.append(bias)
            if self.dense:  # B = 0: a dense fp32 weight (csrc/decode.h)
                w = mod.weight.detach()
                N, K = w.shape
                head += [_ptr(w), 0, 0, _ptr(bias), N, K, 0, 0, 0]
                continue
            qt = mod.qt
            N, K = qt.shape
            head += [_ptr(qt.planes), _ptr(qt.scales), _ptr(qt.offsets), _ptr(bias), N, K, qt.group_size, qt.max_bits,
                     _kernels.plane_stride(qt)]
        self._desc = torch.tensor(head, dtype=torch.int64)
        self._keep = keep
        self._handle = _kernels._native.decoder_new(self._desc.data_ptr(), self._desc.numel(), -1)
        self._cache_ref = cache0
        self._isa_gen = _kernels.generation()

    # ---- dynamic rules -------------------------------------------------------------------------
    def _rules_for(self, dyn):
        key = (id(dyn), dyn.target)
        got = self._rule_cache.get(key)
        if got is None:
            from bitdial.policies.dynamic import check_proj_rows

            pol = dyn.policies[dyn.target]
            rules = torch.zeros(self.n_slots, RULE_COLS, dtype=torch.float64)
            gptr = torch.zeros(self.n_slots, 3, dtype=torch.int64)
            keep = []
            for i, mod in enumerate(self.mods[:-2]):
                r = pol.rules.get(mod.name)
                if r is None:
                    continue
                if r.estimator == "linear":
                    a, b, c = r.coef[0], r.coef[1], 0.0
                elif r.estimator == "fixed":
                    a = b = c = 0.0
                else:
                    a, c, b = r.coef
                    check_proj_rows(mod.name, r.G)  # again: G may have been replaced; decode.c sizes its sums by it
                    G, fmt = _estimator_matrix(r.G)
                    keep.append(G)
                    gptr[i, 0], gptr[i, 1], gptr[i, 2] = G.data_ptr(), r.G.shape[0], fmt
                rules[i] = torch.tensor([1.0, r.low, r.high, r.threshold, a, c, b], dtype=torch.float64)
            got = (rules, gptr, keep, pol)
            self._rule_cache[key] = got
        return key, got

    def flush(self) -> None:
        """Add the fused steps' decisions to the dynamic rules' counters (``n_rows``, ``n_high``)."""
        if self.reason or self.dense or not self.steps or self._rule_key is None:
            self.steps = 0
            return
        pol = self._rule_cache[self._rule_key][3]
        nh = self.n_high.tolist()
        for i, mod in enumerate(self.mods[:-2]):
            r = pol.rules.get(mod.name)
            if r is not None:
                r.n_rows += self.steps
                r.n_high += nh[i]
        self.n_high.zero_()
        self.steps = 0

    # ---- the step ------------------------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor | None:
        """Logits [1, 1, V] of token ids [1, 1] at position pos, or None: run the module path."""
        if self.reason or not _kernels.enabled:
            return None
        m = self.model
        dyn = None if self.dense else getattr(m, "dynamic", None)
        key = None
        if dyn is not None and dyn.target is not None:
            if dyn.adapt:
                return None  # online threshold tracking lives in Python (ModuleRule._track)
            key = (id(dyn), dyn.target)
        if key != self._rule_key:
            self.flush()
            if key is None:
                self.rules.zero_()
                self.gptr.zero_()
            else:
                _, (rules, gptr, _, _) = self._rules_for(dyn)
                self.rules.copy_(rules)
                self.gptr.copy_(gptr)
            self._rule_key = key
        if self._handle is None or m.layers[0].self_attn.cache is not self._cache_ref \
                or self._isa_gen != _kernels.generation():
            self._build()
        logits = torch.empty(1, 1, self.mods[-2].out_features, dtype=torch.float32)
        wb = _kernels._native.decoder_step(self._handle, int(ids.reshape(-1)[0]), pos, logits.data_ptr())
        if key is not None:
            self.steps += 1
        meter = getattr(m, "bits_meter", None)
        if meter is not None:
            meter.bit_rows += wb
            meter.rows += 1.0
        return logits

    def stats(self) -> dict[str, Any]:
        """Where the fused steps' time went since the last call (then reset).

        ``steps``; ``step_ms``, ms per step inside the native call; ``gemv_share``, the share of it in the GEMV
        jobs (quantize activations + kernels + thread pool); ``parts_ms``, ms per step in each part's GEMV
        jobs (``qkv``, ``o``, ``gate_up``, ``down`` summed over the layers, and ``head``) and ``other`` (norms,
        RoPE, attention, SwiGLU, residuals, the embedding row); ``prepare_ms`` and ``estimate_ms``, ms per step
        quantizing activations and in the dynamic estimates (both inside the parts); ``gbs``, plane and scale
        bytes read per second of GEMV jobs."""
        nan = float("nan")
        empty = {"steps": 0, "step_ms": nan, "gemv_share": nan, "parts_ms": {}, "prepare_ms": nan, "estimate_ms": nan,
                 "gbs": nan}
        if self._handle is None:
            return empty
        n, tot, gemv, parts, prep, est, nbytes = _kernels._native.decoder_stats(self._handle)
        if not n:
            return empty
        per = {name: ns / n / 1e6 for name, ns in zip(PARTS, parts)}
        per["other"] = (tot - gemv) / n / 1e6
        return {"steps": n, "step_ms": tot / n / 1e6, "gemv_share": gemv / tot if tot else nan, "parts_ms": per,
                "prepare_ms": prep / n / 1e6, "estimate_ms": est / n / 1e6, "gbs": nbytes / gemv if gemv else nan}

    def last_bits(self) -> dict[str, int]:
        """The width each module ran at in the last fused step."""
        ch = self.chosen.tolist()
        return {mod.name if hasattr(mod, "name") else "embed_tokens": ch[i] for i, mod in enumerate(self.mods)}
