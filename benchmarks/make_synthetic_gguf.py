"""Write a synthetic, bandwidth-bound Llama model as an F16 GGUF that bitdial and llama.cpp both load.

    python benchmarks/make_synthetic_gguf.py -o /tmp/synth-7b12.gguf [--layers 12] [--shape llama2-7b]

Shapes: ``llama2-7b`` (D 4096, F 11008, 32 heads, 32 KV heads) or ``llama3.2-1b`` (D 2048, F 8192, 32
heads, 8 KV heads). Weights are random (seeded) with a realistic scale; the tokenizer (and so the
vocabulary, 49152) is the default model's, so both engines can tokenize prompts. With 12 Llama-2-7B
layers this is about 2.8 B parameters (5.6 GB as F16). For speed measurements only.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from rich.logging import RichHandler
from rich.progress import track

from bitdial.fileio import atomic_path
from bitdial.loading import load_model
from bitdial.loading.gguf_reader import read_gguf

SHAPES = {
    "llama2-7b": dict(dim=4096, hidden=11008, heads=32, kv=32, theta=10000.0),
    "llama3.2-1b": dict(dim=2048, hidden=8192, heads=32, kv=8, theta=500000.0),
}
log = logging.getLogger("synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, handlers=[RichHandler()], format="%(message)s")
    import gguf

    s = SHAPES[a.shape]
    D, F, H, KV = s["dim"], s["hidden"], s["heads"], s["kv"]
    hd = D // H
    src = load_model("default")
    fields, _ = read_gguf(src.files[0])  # reuse the default model's tokenizer metadata verbatim
    V = len(fields["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(a.seed)

    def rand(*shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    out = Path(a.out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(f"synthetic-{a.shape}-{a.layers}L")
        w.add_block_count(a.layers)
        w.add_context_length(4096)
        w.add_embedding_length(D)
        w.add_feed_forward_length(F)
        w.add_head_count(H)
        w.add_head_count_kv(KV)
        w.add_rope_freq_base(s["theta"])
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(V)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tokenizer_model(fields["tokenizer.ggml.model"])
        w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
        w.add_token_list(fields["tokenizer.ggml.tokens"])
        w.add_token_types(fields["tokenizer.ggml.token_type"])
        w.add_token_merges(fields["tokenizer.ggml.merges"])
        w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
        w.add_add_bos_token(False)
        w.add_tensor("token_embd.weight", rand(V, D, scale=0.02))
        w.add_tensor("output_norm.weight", np.ones(D, dtype=np.float32))
        w.add_tensor("output.weight", rand(V, D, scale=0.02))
        for i in track(range(a.layers), description="layers"):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(D, dtype=np.float32))
            w.add_tensor(p + "ffn_norm.weight", np.ones(D, dtype=np.float32))
            w.add_tensor(p + "attn_q.weight", rand(H * hd, D, scale=D ** -0.5))
            w.add_tensor(p + "attn_k.weight", rand(KV * hd, D, scale=D ** -0.5))
            w.add_tensor(p + "attn_v.weight", rand(KV * hd, D, scale=D ** -0.5))
            w.add_tensor(p + "attn_output.weight", rand(D, H * hd, scale=D ** -0.5))
            w.add_tensor(p + "ffn_gate.weight", rand(F, D, scale=D ** -0.5))
            w.add_tensor(p + "ffn_up.weight", rand(F, D, scale=D ** -0.5))
            w.add_tensor(p + "ffn_down.weight", rand(D, F, scale=F ** -0.5))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
    log.info("wrote %s (%.2f GB)", out, out.stat().st_size / 1e9)


if __name__ == "__main__":
    main()
