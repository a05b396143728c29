"""Evaluation metrics on hand-made distributions: window plans, perplexity, KL, the reference cache, reports."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
import torch
from rich.console import Console

from bitdial.eval import (KLResult, PerplexityResult, ReferenceCache, ReferenceCacheError, Window,
                          build_reference, kl_divergence, kl_exact, kl_tail_estimate, kl_topk,
                          load_or_build_reference, perplexity, plan_windows, render, sample_tail, to_jsonable,
                          tokens_sha256, top1_agreement, topk_logprobs)
from bitdial.eval.kld import cache_path, default_cache_dir, reference_key

W = Window

# ---- window planning -------------------------------------------------------------------------------


def test_plan_non_overlapping_with_partial_last_window():
    # stride = ctx: the first token of every later window has no context inside it and is not scored
    assert plan_windows(10, 4) == [W(0, 4, 1), W(4, 8, 5), W(8, 10, 9)]
    assert plan_windows(12, 4) == [W(0, 4, 1), W(4, 8, 5), W(8, 12, 9)]


def test_plan_drops_trailing_one_token_window():
    assert plan_windows(9, 4) == [W(0, 4, 1), W(4, 8, 5)]  # [8, 9) predicts nothing


def test_plan_overlapping_stride_scores_each_token_once():
    assert plan_windows(10, 4, stride=2) == [W(0, 4, 1), W(2, 6, 4), W(4, 8, 6), W(6, 10, 8)]
    assert plan_windows(11, 6, stride=4) == [W(0, 6, 1), W(4, 10, 6), W(8, 11, 10)]
    for n in range(2, 40):
        for ctx in range(2, 9):
            for stride in range(1, ctx):
                ws = plan_windows(n, ctx, stride)
                scored = [t for w in ws for t in range(w.score_from, w.end)]
                assert scored == list(range(1, n)), (n, ctx, stride)
                assert all(w.length <= ctx and w.n_scored >= 1 for w in ws)


def test_plan_stride_larger_than_ctx_skips_text():
    assert plan_windows(20, 4, stride=8) == [W(0, 4, 1), W(8, 12, 9), W(16, 20, 17)]


def test_plan_max_windows_and_short_text():
    assert plan_windows(100, 8, max_windows=2) == [W(0, 8, 1), W(8, 16, 9)]
    assert plan_windows(100, 8, stride=4, max_windows=3) == [W(0, 8, 1), W(4, 12, 8), W(8, 16, 12)]
    assert plan_windows(3, 512) == [W(0, 3, 1)]
    assert plan_windows(2, 2) == [W(0, 2, 1)]


def test_plan_second_half_matches_llama_perplexity():
    # chunks of ctx, partial chunk dropped; logits at ctx//2 .. ctx-2 predict targets ctx//2+1 .. ctx-1
    ws = plan_windows(20, 8, score_second_half=True)
    assert ws == [W(0, 8, 5), W(8, 16, 13)]
    assert [w.n_scored for w in ws] == [3, 3]
    assert ws[0].rows == slice(4, 7)
    w512 = plan_windows(2000, 512, score_second_half=True)
    assert len(w512) == 3 and all(w.n_scored == 255 for w in w512)
    assert plan_windows(20, 8, 8, max_windows=1, score_second_half=True) == [W(0, 8, 5)]
    assert plan_windows(9, 3, score_second_half=True) == [W(0, 3, 2), W(3, 6, 5), W(6, 9, 8)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=10, ctx=1), "ctx must be >= 2"),
    (dict(n_tokens=1, ctx=8), "at least 2"),
    (dict(n_tokens=0, ctx=8), "at least 2"),
    (dict(n_tokens=10, ctx=4, stride=0), "stride must be >= 1"),
    (dict(n_tokens=10, ctx=4, max_windows=0), "max_windows must be >= 1"),
    (dict(n_tokens=10, ctx=4, stride=2, score_second_half=True), "stride must be None or ctx"),
    (dict(n_tokens=10, ctx=16, score_second_half=True), "at least one full chunk"),
    (dict(n_tokens=10, ctx=2, score_second_half=True), "ctx >= 3"),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_windows(**kwargs)


def test_plan_rejects_non_integers():
    with pytest.raises(TypeError):
        plan_windows(10, 4.0)
    with pytest.raises(TypeError):
        plan_windows(10, True)


# ---- perplexity ------------------------------------------------------------------------------------


def uniform_fn(vocab):
    return lambda ids: torch.zeros(1, ids.shape[1], vocab)


def peaked_fn(vocab, a, calls=None):
    """Logit ``a`` on the actual next token (row j -> ids[j+1]), 0 elsewhere; the last row stays uniform."""

    def fn(ids):
        if calls is not None:
            calls.append(ids.clone())
        out = torch.zeros(1, ids.shape[1], vocab)
        out[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = a
        return out

    return fn


def test_uniform_logits_give_ppl_equal_to_vocab():
    ids = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))
    for kw in (dict(ctx=64), dict(ctx=64, stride=16), dict(ctx=64, score_second_half=True)):
        r = perplexity(uniform_fn(1000), ids, progress=False, **kw)
        assert r.ppl == pytest.approx(1000.0, rel=1e-12)
        assert r.nll_mean == pytest.approx(math.log(1000), rel=1e-12)
        assert r.n_scored == sum(w.n_scored for w in plan_windows(300, **kw))


def test_peaked_distribution_known_nll_and_alignment():
    vocab, a = 50, 3.0
    expected = math.log(math.exp(a) + vocab - 1) - a
    ids = [(7 * i + 3) % vocab for i in range(100)]
    calls = []
    r = perplexity(peaked_fn(vocab, a, calls), ids, ctx=16, stride=8, progress=False)
    assert r.nll_mean == pytest.approx(expected, rel=1e-9)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-9)
    assert r.n_scored == 99 and r.n_windows == len(calls) == 12
    assert [c.shape[1] for c in calls] == [16] * 11 + [12]
    assert torch.equal(calls[1][0], torch.tensor(ids[8:24]))
    # the last row of every window (uniform) is never scored; an off-by-one would score it
    assert (r.ctx, r.stride, r.convention) == (16, 8, "sliding")


def test_perplexity_mean_is_over_tokens_not_windows():
    # window 0 scores 3 tokens at NLL log(4); window 1 scores 1 token at NLL log(2)
    def fn(ids):
        v = 4 if ids.shape[1] == 4 else 2
        out = torch.full((1, ids.shape[1], 4), -math.inf)
        out[..., :v] = 0.0
        return out

    r = perplexity(fn, [0, 1, 1, 1, 0, 1], ctx=4, progress=False)
    assert r.n_scored == 4
    assert r.nll_mean == pytest.approx((3 * math.log(4) + math.log(2)) / 4)


def test_perplexity_rejects_bad_logits_and_ids():
    ids = list(range(20))
    with pytest.raises(ValueError, match=r"expected \[1, 8, V\]"):
        perplexity(lambda x: torch.zeros(1, x.shape[1] - 1, 30), ids, ctx=8, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(uniform_fn(10), ids, ctx=8, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        perplexity(lambda x: torch.full((1, x.shape[1], 30), math.nan), ids, ctx=8, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(uniform_fn(30), [5], ctx=8, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(uniform_fn(30), torch.zeros(2, 5, dtype=torch.long), ctx=8, progress=False)
    with pytest.raises(TypeError):
        perplexity(uniform_fn(30), [0.5, 1.5, 2.5], ctx=8, progress=False)
    with pytest.raises(TypeError):
        perplexity("not callable", ids, ctx=8, progress=False)


def test_perplexity_progress_bar_runs():
    r = perplexity(uniform_fn(10), list(range(10)) * 3, ctx=8, progress=True)
    assert r.ppl == pytest.approx(10.0)


# ---- KL on hand-made distributions -----------------------------------------------------------------


def direct_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def test_kl_identical_is_zero():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.allclose(kl_exact(x, x), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    ids, lp, rest = topk_logprobs(x, 8)
    assert torch.allclose(kl_topk(ids, lp, rest, x), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_kl_known_pairs():
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3)
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    want = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_exact(p, q).item() == pytest.approx(want, rel=1e-12)
    # the top-1 bucket plus rest over a 2-token vocabulary is the whole distribution
    ids, lp, rest = topk_logprobs(p, 1)
    assert kl_topk(ids, lp, rest, q).item() == pytest.approx(want, rel=1e-6)  # top-k summary is fp32
    # a 4-token example by hand, coarsened to {top-2 of P, rest}
    p4 = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    q4 = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    ids, lp, rest = topk_logprobs(p4.log(), 2)
    assert ids.tolist() == [[0, 1]] and rest.exp().item() == pytest.approx(0.3, rel=1e-6)
    want2 = 0.4 * math.log(0.4 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.3 * math.log(0.3 / 0.5)
    assert kl_topk(ids, lp, rest, q4.log()).item() == pytest.approx(want2, rel=1e-6)
    want4 = sum(a * math.log(a / 0.25) for a in (0.4, 0.3, 0.2, 0.1))
    assert kl_exact(p4.log(), q4.log()).item() == pytest.approx(want4, rel=1e-9)
    assert want2 < want4


def test_kl_matches_direct_and_topk_is_a_lower_bound():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(64, 200, generator=g) * 2
    q = p + torch.randn(64, 200, generator=g) * 0.7
    exact = kl_exact(p, q)
    assert torch.allclose(exact, direct_kl(p, q), rtol=1e-9, atol=1e-12)
    prev = torch.zeros(64, dtype=torch.float64)
    for k in (1, 4, 16, 64, 199):
        bound = kl_topk(*topk_logprobs(p, k), q)
        assert (bound <= exact + 1e-6).all()
        assert (bound >= prev - 1e-6).all()  # refining the partition never lowers the KL
        prev = bound
    assert torch.allclose(kl_topk(*topk_logprobs(p, 500), q), exact, rtol=1e-5, atol=1e-7)  # k >= V: exact


def test_tail_samples_come_from_the_rest_bucket():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(50, 30, generator=g) * 2
    ids, lp, rest = topk_logprobs(p, 5)
    s_ids, s_lp = sample_tail(p, ids, 200, torch.Generator().manual_seed(0))
    assert s_ids.shape == (50, 200) and s_ids.dtype == torch.int32
    assert not (s_ids.long().unsqueeze(-1) == ids.long().unsqueeze(1)).any()  # never a top-k token
    assert torch.allclose(s_lp, torch.log_softmax(p, -1).gather(-1, s_ids.long()))
    again, _ = sample_tail(p, ids, 200, torch.Generator().manual_seed(0))
    assert torch.equal(again, s_ids)  # reproducible
    # the empirical frequencies follow P restricted to the rest bucket
    full_ids, _ = sample_tail(p[:1].expand(20000, 30), ids[:1].expand(20000, 5), 1, torch.Generator().manual_seed(1))
    freq = torch.bincount(full_ids.long().view(-1), minlength=30).double() / 20000
    want = torch.softmax(p[0].double(), -1).index_fill(0, ids[0].long(), 0.0)
    assert torch.allclose(freq, want / want.sum(), atol=0.015)
    # k covering the vocabulary: nothing to sample, zero weight
    ids_all, lp_all, rest_all = topk_logprobs(p, 30)
    d_ids, d_lp = sample_tail(p, ids_all, 3)
    assert torch.isinf(d_lp).all() and torch.isinf(rest_all).all()
    assert torch.allclose(kl_tail_estimate(ids_all, lp_all, rest_all, d_ids, d_lp, p + 1.0),
                          torch.zeros(50, dtype=torch.float64), atol=1e-6)


def test_tail_estimate_is_unbiased_where_the_bound_is_not():
    g = torch.Generator().manual_seed(6)
    p = torch.randn(3000, 200, generator=g) * 1.5
    q = p + torch.randn(3000, 200, generator=g) * 0.6
    exact = kl_exact(p, q).mean().item()
    ids, lp, rest = topk_logprobs(p, 8)
    bound = kl_topk(ids, lp, rest, q).mean().item()
    s_ids, s_lp = sample_tail(p, ids, 16, torch.Generator().manual_seed(0))
    est = kl_tail_estimate(ids, lp, rest, s_ids, s_lp, q)
    assert bound < 0.8 * exact  # a heavy tail: the bound misses a lot
    assert est.mean().item() == pytest.approx(exact, rel=0.03)
    same = kl_tail_estimate(ids, lp, rest, s_ids, s_lp, p)
    assert torch.allclose(same, torch.zeros(3000, dtype=torch.float64), atol=1e-6)


def test_kl_infinite_when_candidate_misses_reference_mass():
    p = torch.tensor([[0.0, 0.0, -math.inf]])
    q = torch.tensor([[0.0, -math.inf, 0.0]])
    assert math.isinf(kl_exact(p, q).item())
    assert kl_exact(q[:, [0, 2, 1]], q[:, [0, 2, 1]]).item() == 0.0  # zero-probability outcomes ignored


def test_top1_agreement_with_ties():
    cand = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    ref_top1 = torch.tensor([1, 1, 0])
    assert top1_agreement(ref_top1, cand).tolist() == [True, True, False]


# ---- KL end to end on a fake model, and the reference cache ----------------------------------------


VOCAB = 97


def fake_model(seed, calls=None, noise=0.0):
    """A deterministic 'language model': logits depend on the token and its window position."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, VOCAB, generator=g) * 2
    pos_bias = torch.randn(64, VOCAB, generator=g) * 0.3
    extra = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed + 1000)) * noise

    def fn(ids):
        if calls is not None:
            calls.append(int(ids.shape[1]))
        x = ids[0]
        return (table[x] + extra[x] + pos_bias[: x.numel()]).unsqueeze(0)

    return fn


@pytest.fixture()
def text_ids():
    return torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(3))


def test_kl_divergence_against_direct_computation(text_ids):
    ref_fn, cand_fn = fake_model(0), fake_model(0, noise=0.5)
    ref = build_reference(ref_fn, text_ids, 32, 16, None, 8, "fake-ref", progress=False)
    r = kl_divergence(cand_fn, text_ids, ref, progress=False)
    ws = plan_windows(150, 32, 16)
    kl, agree, nll_r, nll_c = [], [], [], []
    for w in ws:
        x = text_ids[w.begin:w.end].unsqueeze(0)
        lr, lc = ref_fn(x)[0, w.rows], cand_fn(x)[0, w.rows]
        kl.append(kl_topk(*topk_logprobs(lr, 8), lc))
        agree.append(lr.argmax(-1) == lc.argmax(-1))
        t = text_ids[w.score_from:w.end]
        nll_r.append(-torch.log_softmax(lr.double(), -1)[torch.arange(len(t)), t])
        nll_c.append(-torch.log_softmax(lc.double(), -1)[torch.arange(len(t)), t])
    kl, agree = torch.cat(kl), torch.cat(agree)
    assert r.n_tokens == 149 and r.n_windows == len(ws) and r.top_k == 8
    assert r.kl_mean == pytest.approx(kl.mean().item(), rel=1e-9)
    assert r.kl_max == pytest.approx(kl.max().item(), rel=1e-9)
    assert r.kl_median == pytest.approx(kl.median().item(), rel=0.05)
    assert r.kl_mean > 0.01
    assert r.top1_agreement == pytest.approx(agree.double().mean().item())
    assert 0 < r.top1_agreement < 1
    assert r.ppl_ref == pytest.approx(math.exp(torch.cat(nll_r).mean().item()), rel=1e-6)
    assert r.ppl_cand == pytest.approx(math.exp(torch.cat(nll_c).mean().item()), rel=1e-6)
    assert r.ppl_ratio == pytest.approx(r.ppl_cand / r.ppl_ref, rel=1e-9)
    assert r.per_token_kl.shape == (149,)
    full = kl_exact(torch.cat([ref_fn(text_ids[w.begin:w.end].unsqueeze(0))[0, w.rows] for w in ws]),
                    torch.cat([cand_fn(text_ids[w.begin:w.end].unsqueeze(0))[0, w.rows] for w in ws]))
    assert r.kl_mean <= full.mean().item() + 1e-9


def test_kl_self_comparison_is_zero_with_full_agreement(text_ids):
    fn = fake_model(5)
    ref = build_reference(fn, text_ids, 40, None, 3, 4, "fake", progress=False)
    r = kl_divergence(fn, text_ids, ref, progress=False)
    assert r.kl_mean == 0.0 and r.kl_max == 0.0
    assert r.top1_agreement == 1.0 and r.ppl_ratio == 1.0
    assert r.n_windows == 3


def test_kl_rejects_other_tokens_and_vocabularies(text_ids):
    ref = build_reference(fake_model(0), text_ids, 32, None, None, 8, "fake", progress=False)
    with pytest.raises(ValueError, match="not the ones the reference was built on"):
        kl_divergence(fake_model(0), text_ids.flip(0), ref, progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        kl_divergence(lambda x: torch.zeros(1, x.shape[1], VOCAB + 3), text_ids, ref, progress=False)
    with pytest.raises(ValueError, match="identity"):
        build_reference(fake_model(0), text_ids, 32, None, None, 8, "", progress=False)
    with pytest.raises(ValueError, match="top_k"):
        build_reference(fake_model(0), text_ids, 32, None, None, 0, "fake", progress=False)


def test_reference_cache_round_trip(tmp_path, text_ids):
    calls = []
    fn = fake_model(0, calls)
    kw = dict(ctx=32, stride=16, max_windows=None, top_k=8, identity="fake-ref", cache_dir=tmp_path, progress=False)
    ref = load_or_build_reference(fn, text_ids, **kw)
    n_calls = len(calls)
    files = list(tmp_path.iterdir())
    assert n_calls == len(ref.windows) and [f.suffix for f in files] == [".safetensors"]
    assert files[0].name.startswith("ref-")
    again = load_or_build_reference(fn, text_ids, **kw)
    assert len(calls) == n_calls  # served from disk
    for name in ("topk_ids", "topk_logp", "rest_logp", "nll", "targets"):
        assert torch.equal(getattr(again, name), getattr(ref, name)), name
    assert again.windows == ref.windows and again.meta == ref.meta
    assert again.topk_ids.dtype == torch.int32 and again.topk_logp.dtype == torch.float32
    assert again.meta["tokens_sha256"] == tokens_sha256(text_ids) and again.meta["convention"] == "sliding"
    # compact: k ids + k log-probs per token, never the vocabulary
    assert again.topk_ids.shape == (149, 8) and again.rest_logp.shape == (149,)
    r1 = kl_divergence(fake_model(1), text_ids, ref, progress=False)
    r2 = kl_divergence(fake_model(1), text_ids, again, progress=False)
    assert r1.to_dict() == r2.to_dict()
    # a different key -> a different file
    load_or_build_reference(fn, text_ids, **dict(kw, top_k=4))
    load_or_build_reference(fn, text_ids, **dict(kw, identity="other"))
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_stale_cache_is_rebuilt_with_a_warning(tmp_path, text_ids, caplog):
    calls = []
    kw = dict(ctx=32, stride=None, max_windows=2, top_k=8, identity="fake-ref", cache_dir=tmp_path, progress=False)
    # plant a reference computed with other settings under this key's file name
    other = build_reference(fake_model(9), text_ids, 16, None, 2, 8, "fake-ref", progress=False)
    path = cache_path(reference_key(text_ids, identity="fake-ref", ctx=32, stride=None, max_windows=2, top_k=8),
                      tmp_path)
    other.save(path)
    with caplog.at_level(logging.WARNING, logger="bitdial.eval.kld"):
        ref = load_or_build_reference(fake_model(0, calls), text_ids, **kw)
    assert calls == [32, 32]
    assert "does not match" in caplog.text and "ctx" in caplog.text
    assert ReferenceCache.load(path).meta["ctx"] == 32 and ref.meta["ctx"] == 32
    # same key but the stored numbers were computed on different tokens (targets differ)
    tampered = ReferenceCache.load(path)
    tampered.targets = (tampered.targets + 1) % VOCAB
    tampered.save(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitdial.eval.kld"):
        load_or_build_reference(fake_model(0, calls), text_ids, **kw)
    assert "targets differ" in caplog.text and len(calls) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "no-metadata"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, text_ids, caplog, damage):
    kw = dict(ctx=32, stride=None, max_windows=None, top_k=8, identity="fake-ref", cache_dir=tmp_path, progress=False)
    ref = load_or_build_reference(fake_model(0), text_ids, **kw)
    (path,) = tmp_path.glob("ref-*.safetensors")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"nll": torch.zeros(3)}, str(path))
    with pytest.raises(ReferenceCacheError):
        ReferenceCache.load(path)
    calls = []
    with caplog.at_level(logging.WARNING, logger="bitdial.eval.kld"):
        rebuilt = load_or_build_reference(fake_model(0, calls), text_ids, **kw)
    assert calls and "unusable" in caplog.text
    assert torch.equal(rebuilt.topk_logp, ref.topk_logp)
    assert ReferenceCache.load(path).meta == ref.meta


def test_tail_samples_through_the_cache(tmp_path, text_ids):
    kw = dict(ctx=32, stride=None, max_windows=None, top_k=4, identity="fake", cache_dir=tmp_path, progress=False)
    ref = load_or_build_reference(fake_model(0), text_ids, tail_samples=24, **kw)
    assert ref.tail_samples == 24 and ref.tail_ids.shape == (ref.n_scored, 24)
    calls = []
    again = load_or_build_reference(fake_model(0, calls), text_ids, tail_samples=24, **kw)
    assert not calls and torch.equal(again.tail_ids, ref.tail_ids) and torch.equal(again.tail_logp, ref.tail_logp)
    no_tail = load_or_build_reference(fake_model(0), text_ids, **kw)  # another key, another file
    assert no_tail.tail_samples == 0 and len(list(tmp_path.glob("ref-*"))) == 2
    cand = fake_model(0, noise=0.8)
    r = kl_divergence(cand, text_ids, again, progress=False)
    assert r.tail_samples == 24 and r.kl_mean_estimate is not None
    assert kl_divergence(cand, text_ids, no_tail, progress=False).kl_mean_estimate is None
    ws = again.windows
    rows = [(fake_model(0)(text_ids[w.begin:w.end][None])[0, w.rows], cand(text_ids[w.begin:w.end][None])[0, w.rows])
            for w in ws]
    exact = kl_exact(torch.cat([a for a, _ in rows]), torch.cat([b for _, b in rows])).mean().item()
    assert r.kl_mean < exact
    assert abs(r.kl_mean_estimate - exact) < abs(r.kl_mean - exact)
    self_r = kl_divergence(fake_model(0), text_ids, again, progress=False)
    assert self_r.kl_mean_estimate == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="tail_samples"):
        build_reference(fake_model(0), text_ids, 32, None, None, 4, "fake", tail_samples=-1, progress=False)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BITDIAL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "kld"
    monkeypatch.delenv("BITDIAL_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "bitdial", "kld")


def test_second_half_reference(tmp_path, text_ids):
    fn = fake_model(0)
    ref = load_or_build_reference(fn, text_ids, 32, None, None, 8, "fake", score_second_half=True,
                                  cache_dir=tmp_path, progress=False)
    assert ref.windows == plan_windows(150, 32, score_second_half=True)
    assert ref.n_scored == 4 * 15
    r = kl_divergence(fn, text_ids, ref, progress=False)
    assert r.convention == "second_half" and r.kl_mean == 0.0
    p = perplexity(fn, text_ids, 32, score_second_half=True, progress=False)
    assert r.ppl_ref == pytest.approx(p.ppl, rel=1e-6)


# ---- reports -------------------------------------------------------------------------------------


def test_reports_render_and_serialize(text_ids):
    fn = fake_model(0)
    ppl = perplexity(fn, text_ids, 32, progress=False)
    ref = build_reference(fn, text_ids, 32, None, None, 8, "fake", progress=False)
    kl = kl_divergence(fake_model(1), text_ids, ref, progress=False)
    assert isinstance(ppl, PerplexityResult) and isinstance(kl, KLResult)
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    render(console, {"fp32": ppl, "q4": ppl})
    render(console, {"q4": kl})
    render(console, kl)
    out = buf.getvalue()
    assert f"{ppl.ppl:.4f}" in out and "q4" in out and f"{kl.kl_mean:.5f}" in out and "top-8" in out
    d = to_jsonable({"fp32": ppl})
    json.dumps(d, allow_nan=False)
    assert d["fp32"]["ppl"] == ppl.ppl and d["fp32"]["n_scored"] == ppl.n_scored
    dk = to_jsonable(kl)
    json.dumps(dk, allow_nan=False)
    assert "per_token_kl" not in dk and dk["top1_agreement"] == kl.top1_agreement
    with pytest.raises(TypeError):
        render(console, {"x": 3})
