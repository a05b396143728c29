"""The lean Llama-family decoder: Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3, Phi-3.

Read top to bottom: norms and RoPE, then attention with a preallocated KV cache, the SwiGLU MLP, the
block, and the model. Shapes in comments: B batch, T new tokens, S cached positions, D model width,
H heads, Hk KV heads, Hd head width, F MLP width, V vocabulary.

Every linear layer is built through one seam, ``linear_factory(name, weight, bias)``; the default makes
a dense fp32 ``DenseLinear``, and the any-precision runtime passes its own factory. Module names match
tensor names (``layers.3.mlp.down_proj``), so per-layer ``{pattern: value}`` maps address them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bitdial.loading.config import ModelConfig

LinearFactory = Callable[[str, torch.Tensor, "torch.Tensor | None"], nn.Module]


class DenseLinear(nn.Module):
    """The default linear: y = x Wᵀ + b, weight [N, K] in fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        return F.linear(x, self.weight, self.bias)


def dense_factory(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return DenseLinear(weight, bias)


class FusedLinear(nn.Module):
    """Several dense linears that read the same input, as one matmul (fewer, larger GEMVs).

    The parts' weights become views of the fused weight, so nothing is stored twice."""

    def __init__(self, parts: list[DenseLinear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([p.weight.data for p in parts]), requires_grad=False)
        has_bias = [p.bias is not None for p in parts]
        self.bias = None
        if any(has_bias):
            self.bias = nn.Parameter(torch.cat([p.bias.data if p.bias is not None else
                                                torch.zeros(p.out_features) for p in parts]), requires_grad=False)
        self.sizes = [p.out_features for p in parts]
        off = 0
        for p in parts:
            n = p.out_features
            p.weight.data = self.weight.data[off:off + n]
            if p.bias is not None:
                p.bias.data = self.bias.data[off:off + n]
            off += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [Hd/2], with linear, Llama-3 or explicit per-dimension factor scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "factors":  # llama.cpp's rope_freqs tensor: one divisor per frequency
        inv = inv / torch.tensor(rs["factors"], dtype=torch.float64)
    return inv.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values: [B, Hk, S_max, Hd] each."""

    def __init__(self, batch: int, n_kv: int, max_seq: int, head_dim: int, dtype=torch.float32) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_seq, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, max_seq, head_dim, dtype=dtype), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape  # [B, Hk, T, Hd]
        self.k[:B, :, pos:pos + T] = k
        self.v[:B, :, pos:pos + T] = v
        return self.k[:B, :, :pos + T], self.v[:B, :, :pos + T]  # [B, Hk, S, Hd]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, w: Mapping[str, torch.Tensor], make: LinearFactory) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def lin(n):
            return make(f"{prefix}.{n}", w[f"{prefix}.{n}.weight"], w.get(f"{prefix}.{n}.bias"))

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.qkv = None  # set by fuse(): one [H*Hd + 2*Hk*Hd, D] matmul instead of three
        self.q_norm = RMSNorm(w[f"{prefix}.q_norm.weight"], cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w[f"{prefix}.k_norm.weight"], cfg.norm_eps) if cfg.qk_norm else None
        self.cache: KVCache | None = None
        self.prefill_sdpa_dtype: torch.dtype | None = None  # e.g. bf16: batched attention in that dtype

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        B, T, _ = x.shape  # [B, T, D]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.hd)  # [B, T, H, Hd]
        k = k.view(B, T, self.n_kv, self.hd)  # [B, T, Hk, Hd]
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, Hk, T, Hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Hd], [B, Hk, T, Hd]
        q = q * cos + rotate_half(q) * sin  # cos/sin: [T, Hd]
        k = k * cos + rotate_half(k) * sin
        k, v = self.cache.update(pos, k, v)  # [B, Hk, S, Hd]
        dt = self.prefill_sdpa_dtype
        if T > 1 and dt is not None and dt != q.dtype:  # faster batched attention (bf16 GEMM tiles)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if T == 1:  # decode: the one new query sees everything cached
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif pos == 0:  # prefill from the start: plain causal mask
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # T new tokens after pos cached ones: query i sees keys 0..pos+i
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=pos)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd).to(x.dtype)  # [B, T, H*Hd]
        return self.o_proj(o)  # [B, T, D]


class MLP(nn.Module):
    def __init__(self, prefix: str, w: Mapping[str, torch.Tensor], make: LinearFactory) -> None:
        super().__init__()

        def lin(n):
            return make(f"{prefix}.{n}", w[f"{prefix}.{n}.weight"], w.get(f"{prefix}.{n}.bias"))

        self.gate_proj, self.up_proj, self.down_proj = lin("gate_proj"), lin("up_proj"), lin("down_proj")
        self.gate_up = None  # set by fuse(): one [2F, D] matmul instead of two

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        if self.gate_up is not None:
            g, u = self.gate_up(x).split(self.gate_up.sizes, dim=-1)  # [B, T, F] each
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, w: Mapping[str, torch.Tensor], make: LinearFactory) -> None:
        super().__init__()
        p = f"layers.{i}"
        self.input_layernorm = RMSNorm(w[f"{p}.input_layernorm.weight"], cfg.norm_eps)
        self.self_attn = Attention(cfg, f"{p}.self_attn", w, make)
        self.post_attention_layernorm = RMSNorm(w[f"{p}.post_attention_layernorm.weight"], cfg.norm_eps)
        self.mlp = MLP(f"{p}.mlp", w, make)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    """Token embedding lookup: ids [B, T] -> [B, T, D]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor],
                 linear_factory: LinearFactory = dense_factory,
                 embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.config = cfg
        if embedding is None:
            embedding = Embedding(weights["embed_tokens.weight"])
        self.embed_tokens = embedding
        self.layers = nn.ModuleList(Block(cfg, i, weights, linear_factory) for i in range(cfg.n_layers))
        self.norm = RMSNorm(weights["norm.weight"], cfg.norm_eps)
        if "lm_head.weight" in weights:
            head = weights["lm_head.weight"]
        elif isinstance(embedding, Embedding):  # tied: share the one tensor, never copy it
            head = embedding.weight.data
        else:
            head = weights["embed_tokens.weight"]
        self.lm_head = linear_factory("lm_head", head, None)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.max_seq = 0
        self.max_batch = 0
        # Optional one-token decode seam: fast_decode(ids [1, 1], pos) -> logits [1, 1, V] or None (= run the
        # modules). The any-precision runtime installs its fused native step here (bitdial/runtime/fused.py).
        self.fast_decode = None

    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """(Re)allocate the KV caches for up to ``max_batch`` sequences of ``max_seq`` positions."""
        if max_batch <= self.max_batch and max_seq <= self.max_seq:
            return
        max_seq = max(max_seq, self.max_seq)
        max_batch = max(max_batch, self.max_batch)
        cfg = self.config
        # plain tensors even when called under inference_mode, so later no_grad calls can update them
        with torch.inference_mode(False):
            for layer in self.layers:
                layer.self_attn.cache = KVCache(max_batch, cfg.n_kv_heads, max_seq, cfg.head_dim)
            t = torch.arange(max_seq, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.clone())  # [S_max, Hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [S_max, Hd]
            self.cos, self.sin = emb.cos(), emb.sin()
        self.max_seq, self.max_batch = max_seq, max_batch

    def forward(self, ids: torch.Tensor, pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """ids [B, T] at positions pos..pos+T-1 -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        B, T = ids.shape
        if pos + T > self.max_seq or B > self.max_batch:
            self.setup_cache(B, max(pos + T, 256))
        if T == 1 and B == 1 and self.fast_decode is not None:
            out = self.fast_decode(ids, pos)
            if out is not None:
                return out
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # [T, Hd]
        x = self.embed_tokens(ids)  # [B, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, V]

    def fuse(self) -> "Transformer":
        """Fuse q/k/v and gate/up into single matmuls where all parts are dense (faster fp32 decode).

        Hooks on the separate linears stop firing once fused; leave models unfused for calibration."""
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            if all(type(p) is DenseLinear for p in (a.q_proj, a.k_proj, a.v_proj)):
                a.qkv = FusedLinear([a.q_proj, a.k_proj, a.v_proj])
            if all(type(p) is DenseLinear for p in (m.gate_proj, m.up_proj)):
                m.gate_up = FusedLinear([m.gate_proj, m.up_proj])
        return self

    def linears(self) -> dict[str, nn.Module]:
        """Every linear seam by module name (including ``lm_head``)."""
        out = {}
        for name, mod in self.named_modules():
            if name.endswith("_proj") or name == "lm_head":  # (fused qkv/gate_up are views of these)
                out[name] = mod
        return out
