"""The .bitdial artifact: round trips, validation of damaged files, atomic and streamed writing."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from bitdial.artifact import QuantSettings, open_artifact, read_header, update_metadata, write_artifact
from bitdial.artifact.format import ALIGN, FORMAT_VERSION
from bitdial.errors import ArtifactError, BitdialError
from bitdial.model.llama import Transformer
from bitdial.runtime.anyprec import AnyPrecisionLinear, build_model, set_bits


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory, tiny):
    p = tmp_path_factory.mktemp("art") / "tiny.bitdial"
    summary = write_artifact(tiny, p, QuantSettings(group_size=32), progress=False, source_hash=False)
    return p, summary


def test_header_describes_itself(tiny_art, tiny):
    p, summary = tiny_art
    h = read_header(p)
    m = h.meta
    assert m["format"] == "bitdial" and m["format_version"] == FORMAT_VERSION
    assert m["config"] == tiny.config.to_dict()
    q = m["modules"]["layers.1.mlp.down_proj"]
    assert (q["method"], q["max_bits"], q["group_size"], q["layout"]) == ("uniform", 8, 32, "planes-v1")
    assert q["shape"] == [64, 96]
    assert m["modules"]["embed_tokens"]["tied_lm_head"] and "lm_head" not in m["modules"]
    assert "layers.0.input_layernorm.weight" in m["float_tensors"]
    assert h.data_start % ALIGN == 0
    assert all(e.start % ALIGN == 0 for e in h.tensors.values())
    assert set(m["checksums"]) == set(h.tensors)
    # a standard safetensors reader opens it too
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        assert torch.equal(f.get_tensor("layers.0.mlp.up_proj.scales"),
                           open_artifact(p).tensor("layers.0.mlp.up_proj.scales"))


def test_views_round_trip_against_quantizer(tiny_art, tiny):
    from bitdial.quant.uniform import quantize_uniform

    art = open_artifact(tiny_art[0])
    W = tiny.tensors["layers.0.self_attn.q_proj.weight"]
    ref = quantize_uniform(W, max_bits=8, group_size=32)
    qt = art.qtensor("layers.0.self_attn.q_proj")
    for k in range(1, 9):
        assert torch.equal(qt.dequantize(k), ref.dequantize(k))


def test_model_runs_at_every_width_and_map(tiny_art, tiny):
    art = open_artifact(tiny_art[0])
    dense = Transformer(tiny.config, tiny.tensors).eval()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = dense(ids).log_softmax(-1)
        kls = []
        for k in range(2, 9):
            out = build_model(art, k)(ids).log_softmax(-1)  # fp32 tiles: the exact k-bit weights
            kls.append((ref.exp() * (ref - out)).sum(-1).mean().item())
        assert all(a > b for a, b in zip(kls, kls[1:])), kls  # more bits, closer to full precision
        assert kls[-1] < 1e-3
        m = build_model(art, {"*.mlp.*": 3, "layers.0.*": 8, "default": 5})
        lin = m.linears()
        assert lin["layers.0.mlp.up_proj"].bits == 3  # first matching pattern wins
        assert lin["layers.0.self_attn.q_proj"].bits == 8
        assert lin["layers.1.self_attn.o_proj"].bits == 5
        set_bits(m, 4)  # switch without reloading
        assert all(v.bits == 4 for n, v in lin.items() if n != "lm_head")
        x = torch.randn(3, 64)
        layer = lin["layers.1.self_attn.q_proj"]
        assert isinstance(layer, AnyPrecisionLinear)
        ref = x @ layer.qt.dequantize(2).T
        # the native kernel (if built) quantizes activations to int8: equal up to that rounding
        assert (layer(x, bits=2) - ref).norm() < 1e-2 * ref.norm()
    with pytest.raises(BitdialError, match="stores 1..8 bits"):
        build_model(art, 9)
    with pytest.raises(BitdialError, match="'layers.0.mlp.up' matches no module"):
        build_model(art, {"layers.0.mlp.up": 3, "default": 5})  # a typo (up_proj) is not ignored
    build_model(art, {"lm_head": 6, "default": 5})  # a tied head is a module a map may name


def _copy(src, dst, data: bytes | None = None):
    dst.write_bytes(src.read_bytes() if data is None else data)
    return dst


def test_damaged_artifacts_are_rejected(tmp_path, tiny_art):
    p = tiny_art[0]
    raw = p.read_bytes()
    with pytest.raises(ArtifactError, match="truncated"):
        open_artifact(_copy(p, tmp_path / "trunc.bitdial", raw[: len(raw) - 1000]))
    with pytest.raises(ArtifactError, match="too short"):
        open_artifact(_copy(p, tmp_path / "tiny5.bitdial", raw[:5]))
    with pytest.raises(ArtifactError, match="header length"):
        open_artifact(_copy(p, tmp_path / "head.bitdial", raw[:4000]))
    with pytest.raises(ArtifactError, match="trailing bytes"):
        open_artifact(_copy(p, tmp_path / "tail.bitdial", raw + b"\0" * 64))
    bad = bytearray(raw)
    bad[20:24] = b"\xff\xfe\xfd\xfc"
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_artifact(_copy(p, tmp_path / "json.bitdial", bytes(bad)))
    with pytest.raises(ArtifactError, match="not found"):
        open_artifact(tmp_path / "missing.bitdial")
    # a foreign safetensors file
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4)}, str(tmp_path / "foreign.bitdial"))
    with pytest.raises(ArtifactError, match="not a .bitdial artifact"):
        open_artifact(tmp_path / "foreign.bitdial")
    # a newer format version
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'\\"format_version\\":1', b'\\"format_version\\":9')
    with pytest.raises(ArtifactError, match="version 9 is not supported.*upgrade bitdial"):
        open_artifact(_copy(p, tmp_path / "v9.bitdial", raw[:8] + header + raw[8 + n:]))


def test_verify_detects_a_flipped_byte(tmp_path, tiny_art):
    p = tiny_art[0]
    assert open_artifact(p).verify() == []
    h = read_header(p)
    e = h.tensors["layers.1.mlp.gate_proj.planes"]
    raw = bytearray(p.read_bytes())
    raw[h.data_start + e.start + 5] ^= 0x10
    q = _copy(p, tmp_path / "flip.bitdial", bytes(raw))
    assert open_artifact(q).verify() == ["layers.1.mlp.gate_proj.planes"]


def test_write_is_atomic_on_failure(tmp_path, tiny, monkeypatch):
    import bitdial.artifact.writer as w

    calls = {"n": 0}
    real = w.quantize_tensor

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(w, "quantize_tensor", failing)
    out = tmp_path / "x.bitdial"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_artifact(tiny, out, QuantSettings(clip="none"), progress=False, source_hash=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_bad_settings_are_clear_errors(tmp_path, tiny):
    for s, msg in ((QuantSettings(max_bits=9), "max-bits"), (QuantSettings(group_size=48), "group-size"),
                   (QuantSettings(method="gptq"), "method"), (QuantSettings(overrides={"*": 1}), "override"),
                   (QuantSettings(saliency=-1.0), "saliency"), (QuantSettings(saliency=float("inf")), "saliency"),
                   (QuantSettings(saliency={"*.mlp.*": -2.0}), r"saliency for \*\.mlp\.\*"),
                   # a pattern that matches no module is a typo, not a silent no-op
                   (QuantSettings(overrides={"layer.*.mlp.*": 6}), r"--override layer\.\*\.mlp\.\*=6 matches no module"),
                   (QuantSettings(saliency={"*.attn.*": 1.0}), r"--saliency \*\.attn\.\*=1\.0 matches no module")):
        with pytest.raises(BitdialError, match=msg):
            write_artifact(tiny, tmp_path / "x.bitdial", s, progress=False)
    with pytest.raises(BitdialError, match="end in .bitdial"):
        write_artifact(tiny, tmp_path / "x.safetensors", QuantSettings(), progress=False)


def test_overrides_and_metadata_update(tmp_path, tiny):
    p = tmp_path / "o.bitdial"
    write_artifact(tiny, p, QuantSettings(max_bits=6, clip="none", overrides={"*.mlp.down_proj": 8}),
                   progress=False, source_hash=False)
    art = open_artifact(p)
    assert art.modules["layers.0.mlp.down_proj"]["max_bits"] == 8
    assert art.modules["layers.0.mlp.up_proj"]["max_bits"] == 6
    assert art.tensor("layers.0.mlp.up_proj.planes").shape[0] == 6
    before = p.read_bytes()
    update_metadata(p, "plans", {"small": {"bits": {"default": 3}}})
    art2 = open_artifact(p)
    assert art2.meta["plans"]["small"]["bits"]["default"] == 3
    assert art2.verify() == []
    h1, h2 = read_header(p), read_header(tmp_path / "o.bitdial")
    assert p.read_bytes()[h2.data_start:] == before[h1.data_start:]


def test_saliency_is_a_per_module_map(tmp_path, tiny):
    """The search's saliency resolves per module: by default 2 on the attention projections at G = 128 and 0
    elsewhere; a user map without "default" is layered over that default, one with "default" replaces it; the
    map is recorded as used."""
    from bitdial.quant.uniform import quantize_uniform

    def offsets(p, mod):
        return open_artifact(p).tensor(f"{mod}.offsets").clone()

    q, up = "layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"
    p = tmp_path / "d.bitdial"
    write_artifact(tiny, p, QuantSettings(group_size=128), progress=False, source_hash=False)
    assert open_artifact(p).meta["quant"]["saliency"] == {"*.self_attn.*": 2.0, "default": 0.0}
    for mod, sal in ((q, 2.0), (up, 0.0)):
        ref = quantize_uniform(tiny.tensors[f"{mod}.weight"], 8, 128, saliency=sal)
        assert torch.equal(offsets(p, mod), ref.offsets), mod
    assert not torch.equal(offsets(p, q), quantize_uniform(tiny.tensors[f"{q}.weight"], 8, 128).offsets)
    p2 = tmp_path / "m.bitdial"
    write_artifact(tiny, p2, QuantSettings(group_size=128, saliency={"*.mlp.*": 2.0}), progress=False,
                   source_hash=False)
    assert open_artifact(p2).meta["quant"]["saliency"] == {"*.mlp.*": 2.0, "*.self_attn.*": 2.0, "default": 0.0}
    assert torch.equal(offsets(p2, up), quantize_uniform(tiny.tensors[f"{up}.weight"], 8, 128, saliency=2).offsets)
    assert torch.equal(offsets(p2, q), offsets(p, q))  # still the default's saliency 2
    p3 = tmp_path / "z.bitdial"
    write_artifact(tiny, p3, QuantSettings(group_size=128, saliency=0.0), progress=False, source_hash=False)
    assert open_artifact(p3).meta["quant"]["saliency"] == {"default": 0.0}
    assert torch.equal(offsets(p3, q), quantize_uniform(tiny.tensors[f"{q}.weight"], 8, 128).offsets)
    # the user's patterns come before the default's: layer 0 off, layer 1's attention keeps saliency 2
    p4 = tmp_path / "l.bitdial"
    write_artifact(tiny, p4, QuantSettings(group_size=128, saliency={"layers.0.*": 0.0}), progress=False,
                   source_hash=False)
    q1 = "layers.1.self_attn.q_proj"
    assert torch.equal(offsets(p4, q), offsets(p3, q)) and torch.equal(offsets(p4, q1), offsets(p, q1))
    assert not torch.equal(offsets(p, q1), offsets(p3, q1))
    # a map with its own "default" replaces the default map
    p5 = tmp_path / "r.bitdial"
    write_artifact(tiny, p5, QuantSettings(group_size=128, saliency={"*.mlp.*": 2.0, "default": 0.0}),
                   progress=False, source_hash=False)
    assert open_artifact(p5).meta["quant"]["saliency"] == {"*.mlp.*": 2.0, "default": 0.0}
    assert torch.equal(offsets(p5, q), offsets(p3, q)) and torch.equal(offsets(p5, up), offsets(p2, up))


def test_guard_map_applies_with_importance(tmp_path, tiny):
    """With importance at G = 64 the writer guards the value projections' 2-bit view (default_guard_map) and
    records the map; at G = 32 or without importance nothing is guarded; a user map replaces the default;
    bad maps are errors."""
    from bitdial.quant.calibrate import RANDOM, collect_importance
    from bitdial.quant.uniform import quantize_uniform

    imp = collect_importance(tiny, RANDOM, n_tokens=64, ctx=32, progress=False)
    v, q, up = "layers.0.self_attn.v_proj", "layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"

    def write(name, imp=imp, **kw):
        p = tmp_path / f"{name}.bitdial"
        write_artifact(tiny, p, QuantSettings(calib=RANDOM if imp else None, **kw), importance=imp, progress=False,
                       source_hash=False)
        return open_artifact(p)

    def ref(mod, guard, G=64):
        return quantize_uniform(tiny.tensors[f"{mod}.weight"], 8, G, importance=imp[mod], guard=guard).offsets

    art = write("g", group_size=64)
    assert art.meta["quant"]["guard"] == {"*.self_attn.v_proj": [2], "default": []}
    assert torch.equal(art.tensor(f"{v}.offsets"), ref(v, (2,))) and not torch.equal(ref(v, (2,)), ref(v, ()))
    assert torch.equal(art.tensor(f"{q}.offsets"), ref(q, ()))
    art = write("g32", group_size=32)
    assert art.meta["quant"]["guard"] == {"default": []}
    assert torch.equal(art.tensor(f"{v}.offsets"), ref(v, (), 32))
    assert write("n", imp=None, group_size=64).meta["quant"]["guard"] == {"default": []}
    art = write("u", group_size=64, guard={"*.mlp.*": [2, 3]})
    assert art.meta["quant"]["guard"] == {"*.mlp.*": [2, 3], "default": []}
    assert torch.equal(art.tensor(f"{up}.offsets"), ref(up, (2, 3))) and torch.equal(art.tensor(f"{v}.offsets"),
                                                                                       ref(v, ()))
    for g, msg in (({"*.attn.*": [2]}, r"--guard \*\.attn\.\*=2 matches no module"),
                   ({"*.mlp.*": [9]}, r"--guard \*\.mlp\.\*: expected a list of bit widths in 2\.\.8"),
                   ({"*.mlp.*": "2"}, "expected a list of bit widths"), ({"*.mlp.*": 2}, "got 2")):
        with pytest.raises(BitdialError, match=msg):
            write("bad", group_size=64, guard=g)
    assert not (tmp_path / "bad.bitdial").exists()


def test_loading_maps_without_reading(tmp_path, smol):
    """RSS right after opening the default model's artifact stays far below the file size."""
    p = tmp_path / "smol.bitdial"
    # clip=none keeps this test fast; the layout is the same
    write_artifact(smol, p, QuantSettings(clip="none"), progress=False, source_hash=False)
    code = textwrap.dedent(f"""
        import os, json
        from bitdial.artifact import open_artifact
        from bitdial.runtime.anyprec import build_model
        def rss():
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS'))
        r0 = rss()
        art = open_artifact({str(p)!r})
        qts = [art.qtensor(m) for m in art.modules]
        m = build_model(art, 4)
        print(json.dumps({{"grow": rss() - r0, "size": os.path.getsize({str(p)!r})}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["size"] * 8 / smol.config.n_params < 8.6  # bits per weight on disk, scales and header included
    assert d["grow"] < 0.2 * d["size"], d


def test_streamed_write_under_memory_cap(tmp_path, smol):
    """Quantizing a 0.5 GB (fp32) synthetic model must not hold it in memory."""
    code = textwrap.dedent(f"""
        import resource, json, torch
        from bitdial.loading import LazyTensors, LoadedModel, ModelConfig, load_model
        from bitdial.artifact import QuantSettings, write_artifact
        tok = load_model('default').tokenizer
        cfg = ModelConfig(arch='llama', vocab_size=4096, dim=512, n_layers=32, n_heads=8, n_kv_heads=8,
                          hidden_dim=2048, tie_embeddings=True)
        shapes = {{'embed_tokens.weight': (4096, 512), 'norm.weight': (512,)}}
        for i in range(32):
            p = f'layers.{{i}}.'
            shapes[p + 'input_layernorm.weight'] = (512,)
            shapes[p + 'post_attention_layernorm.weight'] = (512,)
            for n in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj'):
                shapes[p + n + '.weight'] = (512, 512)
            shapes[p + 'mlp.gate_proj.weight'] = (2048, 512)
            shapes[p + 'mlp.up_proj.weight'] = (2048, 512)
            shapes[p + 'mlp.down_proj.weight'] = (512, 2048)
        def get(name):
            g = torch.Generator().manual_seed(hash(name) % 2**31)
            return torch.randn(*shapes[name], generator=g) * 0.02
        total = sum(torch.Size(s).numel() * 4 for s in shapes.values())
        m = LoadedModel(cfg, LazyTensors(list(shapes), get, shapes), tok, 'synthetic', kind='test')
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_artifact(m, {str(tmp_path / 'big.bitdial')!r}, QuantSettings(clip='none'), progress=False,
                       source_hash=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{'total': total, 'growth': peak - base}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["total"] > 500e6
    assert d["growth"] < 0.25 * d["total"], d
    open_artifact(tmp_path / "big.bitdial")
