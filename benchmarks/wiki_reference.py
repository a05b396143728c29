"""Shared by the quality benchmarks: WikiText-2 validation ids and the dense fp32 default model's cached
reference distributions (bitdial.eval.kld), so every benchmark compares against the same reference."""

from __future__ import annotations

from pathlib import Path

from bitdial.eval import load_or_build_reference, model_logits_fn

WIKI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def dense_reference(tokenizer, ctx: int, windows: int, tail_samples: int = 32):
    """(ids, ReferenceCache) for the first ``windows`` windows of ``ctx`` tokens of WikiText-2 validation."""
    from bitdial.loading import load_model
    from bitdial.model.llama import Transformer

    ids = tokenizer.encode(WIKI.read_text(encoding="utf-8"), bos=False)[: ctx * windows]
    src = load_model("default")
    dense = Transformer(src.config, src.tensors).eval()
    ref = load_or_build_reference(model_logits_fn(dense), ids, ctx=ctx, max_windows=windows,
                                  identity=f"dense-default:{src.source}", tail_samples=tail_samples, progress=True)
    return ids, ref
