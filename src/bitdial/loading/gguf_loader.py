"""Load a GGUF file: map llama.cpp names and metadata to ours, dequantize tensors on demand.

llama.cpp's converter permutes the rows of Q and K of the ``llama`` architecture so that RoPE rotates
adjacent pairs; we undo it so every source shares the Hugging Face layout (RoPE on the two halves).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitdial.errors import ModelFormatError, ModelNotFoundError
from bitdial.loading.config import ModelConfig
from bitdial.loading.source import LazyTensors, LoadedModel
from bitdial.loading.gguf_reader import read_gguf
from bitdial.loading.tokenizer import tokenizer_from_gguf_fields

log = logging.getLogger(__name__)

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}
_IGNORED = {"rope_freqs.weight"}  # read into the config instead




def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp convert_hf_to_gguf's ``permute`` of Q/K rows."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape))


def load_gguf(path: str | Path) -> LoadedModel:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    fields, tensors = read_gguf(path)

    gguf_arch = fields.get("general.architecture")
    if gguf_arch not in _GGUF_ARCH:
        raise ModelFormatError(
            f"{path}: unsupported architecture {gguf_arch!r}; bitdial reads GGUF architectures "
            f"{', '.join(sorted(_GGUF_ARCH))}"
        )
    a = gguf_arch

    def meta(key, default=None, required=False):
        v = fields.get(f"{a}.{key}", default)
        if v is None and required:
            raise ModelFormatError(f"{path}: GGUF metadata key {a}.{key} is missing")
        return v

    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: no token_embd.weight tensor; not a decoder-only language model")

    n_heads = int(meta("attention.head_count", required=True))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    dim = int(meta("embedding_length", required=True))
    head_dim = int(meta("attention.key_length", 0) or meta("rope.dimension_count", 0) or dim // n_heads)
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data(), dtype=np.float32).reshape(-1)
        rope_scaling = {"rope_type": "factors", "factors": [float(x) for x in factors]}
    elif meta("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor", 1.0))}
    elif meta("rope.scaling.type") not in (None, "none"):
        raise ModelFormatError(f"{path}: unsupported rope scaling {meta('rope.scaling.type')!r}")
    tokens = fields.get("tokenizer.ggml.tokens") or []
    emb_rows = int(tensors["token_embd.weight"].shape[0])
    arch = _GGUF_ARCH[a]
    if a == "llama" and fields.get("general.name", "").lower().startswith("mistral"):
        arch = "mistral"
    hidden = meta("feed_forward_length", required=True)
    if isinstance(hidden, list):  # per-layer lists appear in some converters; ours are uniform
        hidden = hidden[0]
    config = ModelConfig(
        arch=arch,
        vocab_size=int(meta("vocab_size", 0) or len(tokens) or emb_rows),
        dim=dim,
        n_layers=int(meta("block_count", required=True)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden_dim=int(hidden),
        head_dim=head_dim,
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=int(meta("context_length", 4096)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )
    if config.vocab_size != emb_rows:
        config.vocab_size = emb_rows

    # name mapping (ours -> (gguf name, post-processing))
    plan: dict[str, tuple[str, Any]] = {}
    for gname in tensors:
        if gname in _IGNORED:
            continue
        if gname in _TOP_MAP:
            plan[_TOP_MAP[gname]] = (gname, None)
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
        if not m:
            raise ModelFormatError(f"{path}: unexpected tensor {gname!r} for architecture {a}")
        i, rest = m.group(1), m.group(2)
        p = f"layers.{i}."
        if rest == "attn_qkv.weight":  # Phi-3: fused [q; k; v] rows
            q, kv = config.n_heads * head_dim, config.n_kv_heads * head_dim
            plan[p + "self_attn.q_proj.weight"] = (gname, ("rows", 0, q))
            plan[p + "self_attn.k_proj.weight"] = (gname, ("rows", q, q + kv))
            plan[p + "self_attn.v_proj.weight"] = (gname, ("rows", q + kv, q + 2 * kv))
        elif rest == "ffn_up.weight" and f"blk.{i}.ffn_gate.weight" not in tensors:  # Phi-3: [gate; up]
            f_ = config.hidden_dim
            plan[p + "mlp.gate_proj.weight"] = (gname, ("rows", 0, f_))
            plan[p + "mlp.up_proj.weight"] = (gname, ("rows", f_, 2 * f_))
        elif rest in _LAYER_MAP:
            post = None
            if a == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
                post = ("unpermute", config.n_heads)
            elif a == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
                post = ("unpermute", config.n_kv_heads)
            plan[p + _LAYER_MAP[rest]] = (gname, post)
        else:
            raise ModelFormatError(f"{path}: unexpected tensor {gname!r} for architecture {a}")

    def get(name: str) -> torch.Tensor:
        gname, post = plan[name]
        t = tensors[gname]
        qtype = GGMLQuantizationType(t.qtype)
        try:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.array(t.data(), dtype=np.float32)
            else:
                arr = dequantize(t.data(), qtype)
        except NotImplementedError as e:
            raise ModelFormatError(
                f"{path}: tensor {gname} has type {qtype.name}, which the gguf package cannot dequantize"
            ) from e
        w = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if post is not None:
            if post[0] == "rows":
                w = w[post[1]:post[2]].contiguous()
            elif post[0] == "unpermute":
                w = _unpermute(w, post[1]).contiguous()
        return w

    def shape(name: str) -> tuple[int, ...]:
        gname, post = plan[name]
        s = tensors[gname].shape
        if post is not None and post[0] == "rows":
            s = (post[2] - post[1],) + s[1:]
        return s

    names = sorted(plan, key=_order_key)
    tok = tokenizer_from_gguf_fields(fields)
    return LoadedModel(config=config, tensors=LazyTensors(names, get, {n: shape(n) for n in names}),
                       tokenizer=tok, source=str(path), files=[path], kind="gguf")


def _order_key(name: str):
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if name.startswith("embed") else 2, 0, name)
