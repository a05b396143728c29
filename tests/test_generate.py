"""Generation on the real model: greedy, seeded sampling, stops, streaming, UTF-8."""

from __future__ import annotations

import pytest
import torch

from bitdial.runtime.generate import GenerationResult, SamplingParams, generate, sample_next, stream_generate


@pytest.fixture(scope="module")
def prompt(smol):
    return smol.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])


def test_greedy_is_argmax_loop_and_coherent(smol, smol_model, prompt):
    res = generate(smol_model, smol.tokenizer, prompt, SamplingParams(max_tokens=12))
    assert "Paris" in res.text
    # the same tokens by a plain full-recompute argmax loop (no KV cache reuse)
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(len(res.token_ids)):
            seq.append(int(smol_model(torch.tensor([seq]), 0)[0, -1].argmax()))
    assert seq[len(prompt):] == res.token_ids


def test_seeded_sampling_is_reproducible_and_seed_sensitive(smol, smol_model, prompt):
    p = dict(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(smol_model, smol.tokenizer, prompt, SamplingParams(**p, seed=7))
    b = generate(smol_model, smol.tokenizer, prompt, SamplingParams(**p, seed=7))
    c = generate(smol_model, smol.tokenizer, prompt, SamplingParams(**p, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def _reference_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution by the textbook definition: full sort, top-k, then the smallest sorted prefix
    whose mass reaches top_p, renormalized (probabilities [V], vocabulary order)."""
    z = logits / temperature
    if top_k:
        z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
    pr = torch.softmax(z, -1)
    sp, si = torch.sort(pr, descending=True)
    drop = torch.cumsum(sp, -1) - sp > top_p
    out = torch.zeros_like(pr)
    out[si[~drop]] = sp[~drop]
    return out / out.sum()


@pytest.mark.parametrize("V,scale,top_k,top_p", [
    (300, 3.0, 0, 0.9),      # top-p inside the first 64 candidates
    (5000, 0.2, 0, 0.9),     # nearly flat: the 64-token head holds too little, the whole vocabulary is sorted
    (1000, 2.0, 40, 0.8),    # top-k, then top-p over its renormalized mass
    (1000, 2.0, 0, 1.0),     # plain temperature sampling over the whole vocabulary
])
def test_sample_next_matches_the_reference_distribution(V, scale, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(V, generator=g) * scale
    ref = _reference_kept(logits, 0.8, top_k, top_p)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    n = 6000
    counts = torch.zeros(V)
    for _ in range(n):
        counts[sample_next(logits, params, None, g)] += 1
    assert counts[ref == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    # mass outside the 64 most likely tokens, drawn as often as the reference says (a sampler that kept only
    # a 64-token head would draw none there)
    head = torch.topk(ref, min(64, V)).indices
    outside = max(0.0, 1.0 - float(ref[head].sum()))
    drawn_outside = 1.0 - float(counts[head].sum()) / n
    assert abs(drawn_outside - outside) <= 5 * (outside * (1 - outside) / n) ** 0.5 + 1e-3
    likely = ref > 0.004  # expected >= 24 draws each: every one must show up (the set is not cut short)
    assert (counts[likely] > 0).all(), "a token of the top-k / top-p set was never drawn"
    # each likely token's frequency within 5 binomial standard deviations of its probability
    sd = (ref[likely] * (1 - ref[likely]) / n).sqrt()
    assert ((counts[likely] / n - ref[likely]).abs() <= 5 * sd + 1e-3).all()


def test_sample_next_edge_cases():
    g = torch.Generator().manual_seed(0)
    # a tiny temperature is greedy, not a division overflow
    assert sample_next(torch.tensor([0.0, 30.0, 29.0]), SamplingParams(temperature=1e-38), None, g) == 1
    # logits that need grad (a caller outside inference mode) are fine, greedy and sampled
    x = torch.tensor([0.0, 3.0, 1.0], requires_grad=True)
    assert sample_next(x, SamplingParams(), None, g) == 1
    assert sample_next(x, SamplingParams(temperature=1.0, top_p=0.5), None, g) == 1
    for bad in (torch.tensor([float("nan"), 1.0]), torch.full((4,), float("-inf"))):
        with pytest.raises(ValueError, match="no probability distribution"):
            sample_next(bad, SamplingParams(temperature=1.0), None, g)


def test_sample_next_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), None, g) == 1
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), None, g) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), None, g) for _ in range(100)}
    assert picks == {1}  # token 1 alone holds > 50% of the mass
    # repetition penalty: dividing the positive logit of a seen token flips the greedy choice
    hist = torch.tensor([1])
    assert sample_next(logits, SamplingParams(repetition_penalty=1.5), hist, None) == 2
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()


def test_stop_string_max_tokens_and_eos(smol, smol_model, prompt):
    tok = smol.tokenizer
    full = generate(smol_model, tok, prompt, SamplingParams(max_tokens=40))
    assert full.finish_reason == "stop" and full.completion_tokens < 40  # ended by <|im_end|>
    cut = generate(smol_model, tok, prompt, SamplingParams(max_tokens=40, stop=["Paris"]))
    assert "Paris" not in cut.text and full.text.startswith(cut.text) and cut.finish_reason == "stop"
    short = generate(smol_model, tok, prompt, SamplingParams(max_tokens=3))
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    assert generate(smol_model, tok, prompt, SamplingParams(max_tokens=0)).completion_tokens == 0


def test_streaming_pieces_join_to_the_text(smol, smol_model, prompt):
    res = GenerationResult()
    pieces = list(stream_generate(smol_model, smol.tokenizer, prompt, SamplingParams(max_tokens=20), res))
    assert len(pieces) > 3 and "".join(pieces) == res.text == smol.tokenizer.decode(res.token_ids)
    assert res.prefill_s > 0 and res.decode_tps > 0


def test_stream_decoder_holds_back_partial_utf8(smol):
    tok = smol.tokenizer
    text = "Emoji 🙂🚀 and 日本語 and ümlauts"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    d = tok.stream()
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_context_overflow_is_a_clear_error(smol, smol_model, prompt):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(smol_model, smol.tokenizer, prompt, SamplingParams(max_tokens=10_000))
