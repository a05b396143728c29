"""Our decoder against transformers (extra [hf]): the real GGUF, and tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from bitdial.loading import load_model
from bitdial.model.llama import Transformer

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
pytestmark = pytest.mark.hf

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def hf_gguf_model(default_gguf):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return m.eval()


def test_tokenizer_matches_transformers(default_gguf, smol):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    for text in PROMPTS + ["Numbers 12345 and  double  spaces\n\nnew lines", "naïve café — 日本語 🙂"]:
        assert smol.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gguf_logits_match_transformers_prefill_and_decode(prompt, smol, smol_model, hf_gguf_model):
    ids = torch.tensor([smol.tokenizer.encode(prompt)])
    T = ids.shape[1]
    with torch.inference_mode():
        ref = hf_gguf_model(ids).logits  # [1, T, V]
        ours = smol_model(ids, 0)
        assert (ours - ref).abs().max() < 2e-3
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
        # three decode steps through the KV cache against the full-sequence reference
        seq = ids
        for step in range(3):
            nxt = ours[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            seq = torch.cat([seq, nxt], 1)
            ours = smol_model(nxt, T + step)
            ref = hf_gguf_model(seq).logits[:, -1:]
            assert (ours - ref).abs().max() < 2e-3
            assert torch.equal(ours.argmax(-1), ref.argmax(-1))


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "phi3", "llama_linear_rope"])
def test_tiny_random_families_match_transformers(family, tmp_path, smol):
    torch.manual_seed(0)
    kw = dict(TINY)
    if family == "llama3":
        cfg = transformers.LlamaConfig(**kw, rope_theta=500000.0, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = transformers.LlamaForCausalLM
    elif family == "llama_linear_rope":
        cfg = transformers.LlamaConfig(**kw, rope_scaling={"rope_type": "linear", "factor": 2.0})
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(**kw, sliding_window=None), transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(**kw, head_dim=32), transformers.Qwen3ForCausalLM
    else:
        cfg, cls = transformers.Phi3Config(**kw, pad_token_id=0), transformers.Phi3ForCausalLM
    ref = cls(cfg).eval()
    with torch.no_grad():  # random norms and biases so that every parameter matters
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    smol.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    src = load_model(tmp_path)
    ours = Transformer(src.config, src.tensors).eval()
    if family == "qwen2":
        assert src.config.qkv_bias
    if family == "qwen3":
        assert src.config.qk_norm and src.config.head_dim == 32
    ids = torch.randint(0, 96, (2, 80))  # beyond original_max_position_embeddings for llama3 scaling
    with torch.inference_mode():
        r = ref(ids).logits
        o = ours(ids, 0)
        assert (o - r).abs().max() < 1e-4
        # chunked prefill (two chunks) must give the same logits as one pass
        ours.setup_cache(2, 128)
        a = ours(ids[:, :50], 0)
        b = ours(ids[:, 50:], 50)
        assert (torch.cat([a, b], 1) - r).abs().max() < 1e-4
