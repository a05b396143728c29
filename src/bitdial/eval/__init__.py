"""Quality evaluation: perplexity over windows of a text, and KL divergence against a cached reference."""

from bitdial.eval.kld import (DEFAULT_TOP_K, KLResult, ReferenceCache, ReferenceCacheError, build_reference,
                              default_cache_dir, kl_divergence, kl_exact, kl_tail_estimate, kl_topk,
                              load_or_build_reference, sample_tail, tokens_sha256, top1_agreement, topk_logprobs)
from bitdial.eval.perplexity import (LogitsFn, PerplexityResult, Window, model_logits_fn, perplexity,
                                     plan_windows)
from bitdial.eval.report import kl_table, perplexity_table, render, render_kl, render_perplexity, to_jsonable

__all__ = [
    "DEFAULT_TOP_K", "KLResult", "LogitsFn", "PerplexityResult", "ReferenceCache", "ReferenceCacheError", "Window",
    "build_reference", "default_cache_dir", "kl_divergence", "kl_exact", "kl_table", "kl_tail_estimate", "kl_topk",
    "load_or_build_reference", "model_logits_fn", "perplexity", "perplexity_table", "plan_windows", "render",
    "render_kl", "render_perplexity", "sample_tail", "to_jsonable", "tokens_sha256", "top1_agreement", "topk_logprobs",
]
