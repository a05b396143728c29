"""Load (and write) a Hugging Face model directory without transformers.

Reads ``config.json``, ``*.safetensors`` (one file or sharded with ``model.safetensors.index.json``,
memory-mapped), ``tokenizer.json``, ``tokenizer_config.json`` (chat template, special tokens) and
``generation_config.json`` (extra stop ids). Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are split.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from bitdial.errors import ModelFormatError, ModelNotFoundError
from bitdial.fileio import atomic_path
from bitdial.loading.config import ModelConfig
from bitdial.loading.source import LazyTensors, LoadedModel
from bitdial.loading.tokenizer import Tokenizer, tokenizer_from_hf_files

log = logging.getLogger(__name__)

_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def config_from_hf(c: dict[str, Any], where: str = "config.json") -> ModelConfig:
    archs = c.get("architectures") or []
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None)
    if arch is None:
        raise ModelFormatError(
            f"{where}: unsupported architecture {archs or c.get('model_type')!r}; bitdial runs "
            f"{', '.join(_HF_ARCH)}"
        )
    try:
        n_heads = int(c["num_attention_heads"])
        dim = int(c["hidden_size"])
        # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes one rope_parameters dict
        rp = dict(c.get("rope_parameters") or {})
        theta = c.get("rope_theta", rp.pop("rope_theta", 10000.0))
        rs = c.get("rope_scaling") or rp or None
        if rs is not None and rs.get("rope_type", rs.get("type")) in ("default", None):
            rs = None
        return ModelConfig(
            arch=arch,
            vocab_size=int(c["vocab_size"]),
            dim=dim,
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            hidden_dim=int(c["intermediate_size"]),
            head_dim=int(c.get("head_dim") or dim // n_heads),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rs,
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
        )
    except KeyError as e:
        raise ModelFormatError(f"{where}: required key {e.args[0]!r} is missing") from e


def load_hf_dir(path: str | Path) -> LoadedModel:
    from safetensors import safe_open

    d = Path(path)
    if not d.is_dir():
        raise ModelNotFoundError(f"model directory not found: {d}")
    if not (d / "config.json").is_file():
        raise ModelNotFoundError(
            f"{d} has no config.json: not a Hugging Face model directory (pass a .gguf file, a .bitdial "
            "artifact, a model directory, or 'default')"
        )
    cfg = config_from_hf(_read_json(d / "config.json"), str(d / "config.json"))

    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no 'weight_map'")
        files = sorted({d / f for f in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        bins = list(d.glob("*.bin")) + list(d.glob("*.pt"))
        hint = " (only pickle .bin files found: convert them to safetensors; bitdial never unpickles)" if bins else ""
        raise ModelNotFoundError(f"{d}: no *.safetensors weights{hint}")
    handles = {}
    where: dict[str, tuple[Path, str]] = {}  # our name -> (file, hf name)
    for f in files:
        if not f.is_file():
            raise ModelNotFoundError(f"{d}: shard {f.name} listed in the index is missing")
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise ModelFormatError(f"{f}: not a readable safetensors file ({e}); it may be truncated") from e
        handles[f] = h
        for k in h.keys():
            name = k[len("model."):] if k.startswith("model.") else k
            where[name] = (f, k)

    splits: dict[str, tuple[str, int, int]] = {}
    for name in list(where):
        m = re.fullmatch(r"(layers\.\d+)\.self_attn\.qkv_proj\.weight", name)
        if m:
            q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            for part, a, b in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
                splits[f"{m.group(1)}.self_attn.{part}_proj.weight"] = (name, a, b)
        m = re.fullmatch(r"(layers\.\d+)\.mlp\.gate_up_proj\.weight", name)
        if m:
            F_ = cfg.hidden_dim
            splits[f"{m.group(1)}.mlp.gate_proj.weight"] = (name, 0, F_)
            splits[f"{m.group(1)}.mlp.up_proj.weight"] = (name, F_, 2 * F_)

    def raw(name: str) -> torch.Tensor:
        f, k = where[name]
        return handles[f].get_tensor(k)

    def get(name: str) -> torch.Tensor:
        if name in splits:
            src, a, b = splits[name]
            return raw(src)[a:b].float().contiguous()
        return raw(name).float()

    def shape(name: str) -> tuple[int, ...]:
        if name in splits:
            src, a, b = splits[name]
            s = tuple(handles[where[src][0]].get_slice(where[src][1]).get_shape())
            return (b - a,) + s[1:]
        f, k = where[name]
        return tuple(handles[f].get_slice(k).get_shape())

    fused = {s[0] for s in splits.values()}
    names = [n for n in where if n not in fused and not n.endswith("rotary_emb.inv_freq")] + list(splits)
    if cfg.tie_embeddings and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    missing = [n for n in ("embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight") if n not in names]
    if missing:
        raise ModelFormatError(f"{d}: weights are missing tensors {missing}")

    tok_json = d / "tokenizer.json"
    if not tok_json.is_file():
        raise ModelNotFoundError(f"{d}: tokenizer.json is missing (bitdial reads fast tokenizers only)")
    tok_cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    if (d / "chat_template.jinja").is_file() and not tok_cfg.get("chat_template"):
        tok_cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    gen_cfg = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else None
    try:
        tok = tokenizer_from_hf_files(str(tok_json), tok_cfg, gen_cfg)
    except Exception as e:
        raise ModelFormatError(f"{tok_json}: cannot build the tokenizer ({e})") from e
    return LoadedModel(config=cfg, tensors=LazyTensors(names, get, {n: shape(n) for n in names}),
                       tokenizer=tok, source=str(d), files=files, kind="hf")


def save_hf_dir(model: LoadedModel, out: str | Path, *, shard_bytes: int | None = None) -> Path:
    """Write a loaded model as a Hugging Face directory (safetensors, sharded above ``shard_bytes``).

    Used to convert a GGUF into a directory that transformers and bitdial both read.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_cfg = {
        "architectures": [_MODEL_TYPE[c.arch]],
        "model_type": c.arch,
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.hidden_dim,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if c.qkv_bias and c.arch != "qwen2":
        hf_cfg["attention_bias"] = True
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in model.tensors:
        t = model.tensors[name].contiguous()
        if shard_bytes and size and size + t.numel() * 4 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1]["model." + name if name != "lm_head.weight" else name] = t
        size += t.numel() * 4
    if len(shards) == 1:
        _atomic_save(save_file, shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, s in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(save_file, s, out / fname)
            weight_map.update({k: fname for k in s})
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    tok: Tokenizer = model.tokenizer
    tok.tok.save(str(out / "tokenizer.json"))
    tc: dict[str, Any] = {"add_bos_token": tok.add_bos, "chat_template": tok.chat_template}
    if tok.bos_id is not None:
        tc["bos_token"] = tok.token(tok.bos_id)
    if tok.eos_ids:
        tc["eos_token"] = tok.token(tok.eos_ids[0])
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_ids}, indent=2))
    return out


def _atomic_save(save_file, tensors, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
