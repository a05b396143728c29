"""The fused native decode step (bitdial/runtime/fused.py, csrc/decode.c) against the module path."""

from __future__ import annotations

import pytest
import torch

import bitdial.kernels as BK
from bitdial.artifact import QuantSettings, write_artifact
from bitdial.loading import LoadedModel
from bitdial.policies.dynamic import DynamicPolicy, DynamicRuntime, ModuleRule, PolicyError, round_g_int8
from bitdial.runtime.anyprec import build_model, set_bits
from conftest import make_tiny

pytestmark = pytest.mark.skipif(not BK.available(), reason="native kernels not built")


def _variant_model(tokenizer, kind: str) -> LoadedModel:
    if kind == "odd":  # K not a multiple of 64, N odd, 3 heads over 1 KV head, untied head
        src = make_tiny(tokenizer, dim=96, n_layers=2, n_heads=3, n_kv_heads=1, hidden=165, vocab=300, tie=False)
    else:
        src = make_tiny(tokenizer, vocab=400)
    if kind == "qwen":  # q/k/v biases (Qwen2) and q/k norms (Qwen3) on the same model
        cfg = src.config
        cfg.qkv_bias, cfg.qk_norm = True, True
        g = torch.Generator().manual_seed(3)
        hd = cfg.dim // cfg.n_heads
        for i in range(cfg.n_layers):
            p = f"layers.{i}.self_attn"
            src.tensors[f"{p}.q_proj.bias"] = 0.1 * torch.randn(cfg.n_heads * hd, generator=g)
            src.tensors[f"{p}.k_proj.bias"] = 0.1 * torch.randn(cfg.n_kv_heads * hd, generator=g)
            src.tensors[f"{p}.v_proj.bias"] = 0.1 * torch.randn(cfg.n_kv_heads * hd, generator=g)
            src.tensors[f"{p}.q_norm.weight"] = 1 + 0.1 * torch.randn(hd, generator=g)
            src.tensors[f"{p}.k_norm.weight"] = 1 + 0.1 * torch.randn(hd, generator=g)
    return src


@pytest.fixture(scope="module", params=["llama", "odd", "qwen"])
def art_path(request, smol, tmp_path_factory):
    src = _variant_model(smol.tokenizer, request.param)
    p = tmp_path_factory.mktemp("fused") / f"{request.param}.bitdial"
    G = 64 if request.param == "odd" else 32
    write_artifact(src, p, QuantSettings(group_size=G, clip="none"), progress=False, source_hash=False)
    return p


def _run(model, prompt, steps, fused: bool):
    """Prefill (torch) then `steps` greedy decode steps; logits of every decode step."""
    keep = model.fast_decode
    model.fast_decode = keep if fused else None
    try:
        with torch.inference_mode():
            model.setup_cache(1, 64)
            logits = model(torch.tensor([prompt]), 0, last_only=True)[0, -1]
            out, pos = [], len(prompt)
            for _ in range(steps):
                tok = int(logits.argmax())
                logits = model(torch.tensor([[tok]]), pos)[0, -1]
                out.append(logits.clone())
                pos += 1
        return torch.stack(out)
    finally:
        model.fast_decode = keep


def _close(a, b):
    """Same kernels, same widths: float rounding only. A rounding difference can flip one int8 activation
    code in an early layer, which moves the logits of that step by up to ~1% of their range at 2 bits."""
    scale = b.abs().max()
    d = (a - b).abs()
    assert d.max() <= 2e-2 * scale, float(d.max() / scale)
    assert d.mean() <= 1e-3 * scale, float(d.mean() / scale)


def test_fused_is_installed(art_path):
    model = build_model(art_path, 4)
    assert model.fast_decode is not None and model.fast_decode.reason is None


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_fused_matches_module_path(art_path, bits):
    model = build_model(art_path, bits)
    prompt = [5, 17, 42, 7, 99, 3]
    _close(_run(model, prompt, 6, True), _run(model, prompt, 6, False))


def test_fused_every_variant(art_path):
    model = build_model(art_path, 3)
    prompt = [11, 2, 300 % model.config.vocab_size]
    ref = _run(model, prompt, 4, False)
    before = BK.variant()
    try:
        for v in BK.variants():
            BK.set_isa(v)
            _close(_run(model, prompt, 4, True), ref)
    finally:
        BK.set_isa(before)


def test_fused_follows_width_changes(art_path):
    model = build_model(art_path, 4)
    prompt = [1, 2, 3, 4]
    set_bits(model, {"layers.0.*": 2, "*.mlp.down_proj": 6, "default": 3})
    model.embed_tokens.bits = 5
    model.lm_head.bits = 7
    fused = _run(model, prompt, 5, True)
    assert model.fast_decode.last_bits()["layers.0.self_attn.q_proj"] == 2
    assert model.fast_decode.last_bits()["layers.1.mlp.down_proj"] == 6
    assert model.fast_decode.last_bits()["lm_head"] == 7
    _close(fused, _run(model, prompt, 5, False))
    # the meter sees the same realized bits on both paths
    model.bits_meter.take()
    _run(model, prompt, 1, True)
    b_fused = model.bits_meter.take()
    _run(model, prompt, 1, False)
    b_mod = model.bits_meter.take()
    assert b_fused == pytest.approx(b_mod, rel=1e-9)


def test_fused_mixed_widths_inside_one_job(art_path):
    """q/k/v (and gate/up) run as one job and share the quantized input: different widths in one job must
    not share the width-dependent block sums."""
    model = build_model(art_path, 4)
    set_bits(model, {"*.q_proj": 2, "*.k_proj": 5, "*.v_proj": 3, "*.gate_proj": 6, "*.up_proj": 2, "default": 4})
    prompt = [4, 8, 15, 16, 23, 42]
    _close(_run(model, prompt, 5, True), _run(model, prompt, 5, False))


def _policy(model, target, with_proj: bool | str) -> DynamicPolicy:
    """A hand-made dynamic policy: every decoder linear between 2 and 4 bits (3 and 4 for the o/down
    projections), thresholds picked so that both widths occur."""
    g = torch.Generator().manual_seed(7)
    rules = {}
    for n, m in model.linears().items():
        if n == "lm_head":
            continue
        lo, hi = (3, 4) if n.endswith(("o_proj", "down_proj")) else (2, 4)
        if with_proj and n.endswith(("q_proj", "gate_proj")):
            # int8: 21 rows, two chunks of the fused estimate (16 + 5), so 2 threads share a module's rows
            G = torch.randn(21 if with_proj == "int8" else 8, m.in_features, generator=g)
            if with_proj == "fp16":  # fp16-exact values (older calibrations): the step reads a half copy
                G = G.half().float()
            elif with_proj == "int8":  # the int8 estimator format calibrate stores: int8 codes + row scales
                G = round_g_int8(G)
            rules[n] = ModuleRule(n, lo, hi, (lo + hi) / 2, 1.0, "pca", (0.2, 0.1, -0.05), G, 4)
        else:
            rules[n] = ModuleRule(n, lo, hi, (lo + hi) / 2, 2.0, "linear", (0.3, 0.0, 0.0), None, 4)
    return DynamicPolicy(target, rules)


@pytest.mark.parametrize("with_proj", [False, "fp32", "fp16", "int8"])
def test_fused_dynamic_matches_module_path(art_path, with_proj):
    model = build_model(art_path, 4)
    dyn = DynamicRuntime(model, {3.0: _policy(model, 3.0, with_proj)})
    prompt = [9, 8, 7, 6, 5]
    # thresholds near the median estimate of each module on this input, so decisions really vary
    dyn.reset_counters()
    model.fast_decode.stats()
    fused = _run(model, prompt, 8, True)
    assert model.fast_decode.stats()["estimate_ms"] > 0  # the per-token estimates are timed on their own
    if with_proj:  # int8-format projections reach the step as int8, fp16-exact ones as fp16, others as fp32
        _, (_, gptr, _, _) = model.fast_decode._rules_for(dyn)
        used = gptr[gptr[:, 0] != 0]
        assert len(used) and set(used[:, 2].tolist()) == {{"fp32": 0, "fp16": 1, "int8": 2}[with_proj]}
    rates_fused = dyn.module_rates()
    dyn.reset_counters()
    ref = _run(model, prompt, 8, False)
    rates_mod = dyn.module_rates()
    _close(fused, ref)
    assert rates_fused == pytest.approx(rates_mod, nan_ok=True)
    if with_proj == "int8":  # every instruction set's int8 estimate decides the same, on 1 thread or 2
        before, nth = BK.variant(), BK.threads()
        try:
            for v in BK.variants():
                for t in (1, 2):
                    BK.set_isa(v)
                    BK.set_threads(t)
                    dyn.reset_counters()
                    _close(_run(model, prompt, 8, True), ref)
                    assert dyn.module_rates() == pytest.approx(rates_mod, nan_ok=True), (v, t)
        finally:
            BK.set_isa(before)
            BK.set_threads(nth)
    # switching the target off returns to the static widths in the fused step
    dyn.set_target(None)
    _close(_run(model, prompt, 3, True), _run(model, prompt, 3, False))
    assert set(model.fast_decode.last_bits()[n] for n in dyn.lin) == {4}


def test_fused_rejects_an_oversized_estimator(art_path):
    model = build_model(art_path, 4)
    pol = _policy(model, 3.0, "int8")
    r = next(r for r in pol.rules.values() if r.G is not None)
    r.G = torch.zeros(1025, r.G.shape[1])  # past the rule's own check: the step must not take it
    DynamicRuntime(model, {3.0: pol})
    with pytest.raises(PolicyError, match="1025 rows"):
        _run(model, [1, 2, 3], 2, True)


def test_fused_cache_reallocation(art_path):
    model = build_model(art_path, 4)
    a = _run(model, [1, 2, 3], 3, True)
    model.setup_cache(1, 400)  # a bigger cache: new tensors, the descriptor is rebuilt
    _close(_run(model, [1, 2, 3], 3, True), a)


def test_fused_off_without_kernels(art_path, monkeypatch):
    model = build_model(art_path, 4)
    monkeypatch.setattr(BK, "enabled", False)
    assert model.fast_decode(torch.tensor([[1]]), 0) is None


@pytest.mark.parametrize("kind", ["llama", "odd", "qwen"])
def test_fused_dense_fp32_matches_module_path(smol, kind):
    from bitdial.model.llama import Transformer
    from bitdial.runtime.fused import install_dense

    src = _variant_model(smol.tokenizer, kind)
    model = Transformer(src.config, src.tensors).eval().fuse()
    assert install_dense(model) and model.fast_decode.dense
    prompt = [3, 1, 4, 1, 5, 9]
    a, b = _run(model, prompt, 6, True), _run(model, prompt, 6, False)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()  # fp32 throughout: rounding only


def test_fused_dense_real_model(smol_model):
    from bitdial.runtime.fused import FusedDecoder

    fused = FusedDecoder(smol_model)
    assert fused.reason is None
    keep = smol_model.fast_decode
    smol_model.fast_decode = fused
    try:
        prompt = [1, 504, 3458, 314, 260]
        a, b = _run(smol_model, prompt, 4, True), _run(smol_model, prompt, 4, False)
    finally:
        smol_model.fast_decode = keep
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_fused_with_padded_plane_stride(art_path):
    """Planes copied to a padded plane stride (pad_planes) give bit-identical fused decode steps."""
    from bitdial.runtime.fused import FusedDecoder

    model = build_model(art_path, 3)
    prompt = [4, 8, 15, 16]
    ref = _run(model, prompt, 4, True)
    mods = [m for m in model.modules() if hasattr(m, "qt") and m.qt.method == "uniform"]
    assert mods
    for m in mods:
        m.qt = BK.pad_planes(m.qt, force=True)
        assert BK.plane_stride(m.qt) % 4096
    model.fast_decode = FusedDecoder(model)
    assert model.fast_decode.reason is None
    assert torch.equal(_run(model, prompt, 4, True), ref)


def test_fused_profile_counters(art_path):
    """stats(): steps, parts that add up, and the plane + scale bytes the step reads at uniform k."""
    model = build_model(art_path, 3)
    fused = model.fast_decode
    fused.stats()  # reset
    _run(model, [4, 5, 6], 5, True)
    s = fused.stats()
    assert s["steps"] == 5
    parts = s["parts_ms"]
    assert set(parts) == {"qkv", "o", "gate_up", "down", "head", "other"}
    assert all(v >= 0 for v in parts.values()) and parts["qkv"] > 0 and parts["head"] > 0
    assert sum(parts.values()) == pytest.approx(s["step_ms"], rel=1e-6)
    assert 0 <= s["prepare_ms"] <= sum(v for k, v in parts.items() if k != "other")
    assert s["estimate_ms"] == 0.0  # no dynamic policy
    expect = sum(m.qt.bytes_read(m.bits) for m in model.linears().values())
    gemv_s = sum(v for k, v in parts.items() if k != "other") * s["steps"] / 1e3
    assert s["gbs"] * 1e9 * gemv_s == pytest.approx(expect * s["steps"], rel=1e-6)  # GB/s of GEMV job time
    assert fused.stats()["steps"] == 0  # read and reset


@pytest.mark.parametrize("dim,heads,kv", [(64, 4, 2), (96, 3, 1), (256, 4, 2), (384, 3, 1), (72, 3, 1)])
def test_fused_attention_long_context(smol, dim, heads, kv):
    """Attention over many keys in the fused step against torch: head sizes 16, 32, 64 and 128 (the AVX-512
    build's 16-key blocks and its tail of S % 16 keys) and 24 (the plain loops), on every ISA family's step;
    the last prompt is long enough for the thread pool's attention job (S * H * hd >= 64 Ki)."""
    from bitdial.model.llama import Transformer
    from bitdial.runtime.fused import install_dense

    src = make_tiny(smol.tokenizer, dim=dim, n_heads=heads, n_kv_heads=kv, hidden=96, vocab=300)
    model = Transformer(src.config, src.tensors).eval().fuse()
    assert install_dense(model)
    hd = dim // heads
    g = torch.Generator().manual_seed(dim)
    before, threads = BK.variant(), BK.threads()
    try:
        for n_prompt in (37, 65536 // (heads * hd) + 3):
            prompt = torch.randint(0, 300, (1, n_prompt), generator=g)
            for v in sorted({BK.variant(), "ref"}):
                BK.set_isa(v)
                BK.set_threads(2)
                outs = []
                for fused in (True, False):
                    keep = model.fast_decode
                    model.fast_decode = keep if fused else None
                    try:
                        with torch.inference_mode():
                            model.setup_cache(1, n_prompt + 8)
                            model(prompt, 0, last_only=True)
                            steps = [model(torch.tensor([[t]]), n_prompt + i)[0, -1] for i, t in enumerate((5, 77, 191))]
                        outs.append(torch.stack(steps))
                    finally:
                        model.fast_decode = keep
                a, b = outs
                assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (v, n_prompt, float((a - b).abs().max()))
    finally:
        BK.set_isa(before)
        BK.set_threads(threads)
