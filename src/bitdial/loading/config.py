"""The model configuration shared by every source (GGUF, Hugging Face directory, artifact)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bitdial.errors import ModelFormatError

# Architectures the lean decoder runs. GGUF and Hugging Face spell them differently.
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")

SUPPORTED_ROPE_SCALING = (None, "default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    Tensor names everywhere in bitdial follow the Hugging Face layout without the ``model.`` prefix,
    e.g. ``layers.3.self_attn.q_proj.weight``; module patterns in per-layer maps match these names.
    """

    arch: str
    vocab_size: int
    dim: int  # hidden size D
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int  # MLP intermediate size F
    head_dim: int = 0  # 0 = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelFormatError(
                f"unsupported architecture {self.arch!r}; bitdial runs {', '.join(SUPPORTED_ARCHS)}"
            )
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in SUPPORTED_ROPE_SCALING:
            raise ModelFormatError(
                f"unsupported rope scaling {kind!r}; supported: linear, llama3 (or none)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelFormatError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    @property
    def n_params(self) -> int:
        D, F, H = self.dim, self.hidden_dim, self.head_dim
        attn = D * H * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 3 * D * F + 2 * D
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + D

    def linear_names(self) -> list[str]:
        """Every linear module of the decoder, in execution order (without ``.weight``)."""
        names = []
        for i in range(self.n_layers):
            p = f"layers.{i}"
            names += [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        return names
