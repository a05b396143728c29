"""The CLI end to end: every command, in-process, on the real default model and a tiny artifact."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bitdial.cli.main import app
from bitdial.loading.hf_loader import save_hf_dir

from conftest import make_tiny

runner = CliRunner()


def run(*args, ok=True, input=None, env=None):
    r = runner.invoke(app, [str(a) for a in args], input=input, env=env)
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def last_json(r):
    out = r.stdout
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol):
    return save_hf_dir(make_tiny(smol.tokenizer, seed=3), tmp_path_factory.mktemp("tinyhf"))


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("tinyart") / "tiny.bitdial"
    r = run("quantize", tiny_dir, "-o", out, "--max-bits", "6", "--group-size", "32",
            "--override", "*.mlp.down_proj=8", "--json")
    d = last_json(r)
    assert d["file_bytes"] == out.stat().st_size and d["modules"] == 1 + 2 * 7
    return out


def test_info_default_json():
    d = last_json(run("info", "default", "--json"))
    assert d["config"]["n_layers"] == 30 and d["kind"] == "gguf" and d["chat_template"]
    assert 130e6 < d["parameters"] < 140e6
    assert "architecture" in run("info", "default").stdout


def test_generate_default_streams_coherent_text():
    d = last_json(run("generate", "default", "-p", "What is the capital of France?", "-n", "16", "--json",
                      "--threads", "2", "--seed", "1"))
    assert "Paris" in d["text"]
    assert d["prompt_tokens"] > 5 and 0 < d["completion_tokens"] <= 16
    assert d["decode_tokens_per_s"] > 0 and d["prefill_tokens_per_s"] > 0
    r = run("generate", "default", "-p", "The capital of France is", "--raw", "-n", "5", "--temperature", "0.8",
            "--seed", "3", "--top-k", "40")
    assert len(r.stdout.strip()) > 0


def test_chat_reads_turns_from_stdin():
    r = run("chat", "default", "-n", "12", "--temperature", "0", "--json",
            input="What is the capital of France?\n/reset\nSay hello.\n/exit\n")
    replies = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(replies) == 2 and "Paris" in replies[0]["reply"]


def test_eval_ppl_and_kld(wikitext_path, tmp_path, tiny_artifact):
    d = last_json(run("eval", "ppl", "default", "--text", wikitext_path, "--ctx", "64", "--max-windows", "2",
                      "--json"))
    assert 5 < d["ppl"] < 100 and d["n_windows"] == 2 and d["ctx"] == 64
    d2 = last_json(run("eval", "ppl", "default", "--text", wikitext_path, "--ctx", "64", "--max-windows", "2",
                       "--score-second-half", "--json"))
    assert d2["n_scored"] < d["n_scored"]
    k = last_json(run("eval", "kld", "default", "--ref", "default", "--text", wikitext_path, "--ctx", "64",
                      "--max-windows", "2", "--cache-dir", tmp_path, "--json"))
    assert k["kl_mean"] < 1e-6 and k["top1_agreement"] == 1.0 and abs(k["ppl_ratio"] - 1) < 1e-6
    assert any(tmp_path.rglob("*.safetensors"))  # the reference was cached


def test_quantize_info_verify_and_run_artifact(tiny_artifact, tmp_path):
    d = last_json(run("info", tiny_artifact, "--verify", "--json"))
    assert d["verify"]["ok"] and d["quant"]["max_bits"] == 6 and d["quant"]["group_size"] == 32
    assert d["quant"]["saliency"] == {"default": 0.0}  # the default at group size 32, recorded in the metadata
    assert d["bits_per_weight_read"]["3"] < d["bits_per_weight_read"]["6"]
    g = last_json(run("generate", tiny_artifact, "-p", "Hello", "--raw", "-n", "4", "--bits", "3", "--json"))
    assert g["completion_tokens"] == 4 and g["bits"] == 3
    bm = tmp_path / "map.json"
    bm.write_text(json.dumps({"*.mlp.*": 2, "default": 4}))
    run("generate", tiny_artifact, "-p", "Hello", "--raw", "-n", "2", "--bits-map", bm)
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "2", "--bits", "7", ok=False)
    assert r.exit_code == 2 and "stores 1..6 bits" in r.output


def test_quantize_saliency_map_and_info(tmp_path, tiny_dir):
    """--saliency S / PATTERN=S reach the artifact's metadata, and info prints the map (or an older float)."""
    from bitdial.artifact import update_metadata

    p = tmp_path / "s.bitdial"
    r = run("quantize", tiny_dir, "-o", p, "-g", "128", "--saliency", "0", "--saliency", "*.mlp.*=1", "--no-source-hash",
            env={"COLUMNS": "300"})
    assert "--saliency has no effect with activation importance (--calib random)" in r.output
    run("quantize", tiny_dir, "-o", p, "-g", "128", "--saliency", "0", "--saliency", "*.mlp.*=1", "--calib", "none",
        "--no-source-hash")
    assert last_json(run("info", p, "--json"))["quant"]["saliency"] == {"*.mlp.*": 1.0, "default": 0.0}
    p2 = tmp_path / "d.bitdial"
    run("quantize", tiny_dir, "-o", p2, "-g", "128", "--calib", "none", "--no-source-hash")
    out = run("info", p2, env={"COLUMNS": "200"}).output
    assert "saliency *.self_attn.*=2, default 0" in out
    q = last_json(run("info", p2, "--json"))["quant"]
    update_metadata(p2, "quant", {**q, "saliency": 2.0})  # as an artifact of stops 22-24 stored it
    assert "clip search, saliency 2 " in run("info", p2, env={"COLUMNS": "200"}).output


def test_quantize_calib_default_is_random_tokens(tmp_path, tiny_dir, calib_text):
    """Without --calib the uniform search weighs errors by the importance measured on random token ids
    (recorded as calib "random"); --calib none turns it off, --calib FILE uses a text; each changes ranges."""
    from bitdial.artifact import open_artifact

    arts = {}
    for name, extra in (("random", []), ("none", ["--calib", "none"]), ("text", ["--calib", str(calib_text)])):
        p = tmp_path / f"{name}.bitdial"
        run("quantize", tiny_dir, "-o", p, "-g", "64", "--no-source-hash", *extra)
        arts[name] = open_artifact(p)
    assert arts["random"].meta["quant"]["calib"] == "random" and arts["none"].meta["quant"]["calib"] is None
    assert arts["text"].meta["quant"]["calib"] == str(calib_text)
    off = {k: a.tensor("layers.0.mlp.up_proj.offsets").float() for k, a in arts.items()}
    assert not torch.equal(off["random"], off["none"]) and not torch.equal(off["random"], off["text"])
    info = run("info", tmp_path / "random.bitdial", env={"COLUMNS": "200"}).output
    assert "calib random, guard *.self_attn.v_proj=2" in info
    assert arts["none"].meta["quant"]["guard"] == {"default": []}
    assert "guard" not in run("info", tmp_path / "none.bitdial", env={"COLUMNS": "200"}).output
    # --guard none turns the default guard off; a PATTERN=BITS map replaces it
    for name, extra, want in (("g0", ["--guard", "none"], {"default": []}),
                              ("g1", ["--guard", "*.mlp.*=2,3"], {"*.mlp.*": [2, 3], "default": []})):
        run("quantize", tiny_dir, "-o", tmp_path / f"{name}.bitdial", "--no-source-hash", *extra)
        arts[name] = open_artifact(tmp_path / f"{name}.bitdial")
        assert arts[name].meta["quant"]["guard"] == want
    v = "layers.0.self_attn.v_proj.offsets"
    assert not torch.equal(arts["g0"].tensor(v), arts["random"].tensor(v))
    assert torch.equal(arts["g1"].tensor(v), arts["g0"].tensor(v))
    # plain min/max ranges (--clip none) have nothing to weigh: no calibration by default
    run("quantize", tiny_dir, "-o", tmp_path / "n.bitdial", "--clip", "none", "--no-source-hash")
    assert open_artifact(tmp_path / "n.bitdial").meta["quant"]["calib"] is None


def test_quantize_skips_default_calibration_when_memory_is_short(tmp_path, tiny_dir, monkeypatch):
    """The default random-token pass runs the model in fp32; when that does not fit in the available memory
    it is skipped with a warning (an explicit --calib random still runs)."""
    from bitdial.artifact import open_artifact
    from bitdial.control import telemetry

    monkeypatch.setattr(telemetry.Memory, "read", lambda self: {"mem_available_bytes": 1 << 20, "mem_total_bytes": 1 << 30})
    p = tmp_path / "short.bitdial"
    r = run("quantize", tiny_dir, "-o", p, "--no-source-hash", env={"COLUMNS": "300"})
    assert open_artifact(p).meta["quant"]["calib"] is None and "does not fit in the available" in r.output
    run("quantize", tiny_dir, "-o", p, "--calib", "random", "--no-source-hash")
    assert open_artifact(p).meta["quant"]["calib"] == "random"


def test_errors_are_clear(tmp_path, tiny_dir):
    r = run("generate", tmp_path / "missing.gguf", "-p", "x", ok=False)
    assert r.exit_code == 2 and "model not found" in r.output
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--override", "lm_head", ok=False)
    assert r.exit_code == 2 and "PATTERN=BITS" in r.output
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--saliency", "-1", ok=False)
    assert r.exit_code == 2 and "--saliency must be a number >= 0" in r.output
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--saliency", "*.mlp.*=high", ok=False)
    assert r.exit_code == 2 and "PATTERN=NUMBER" in r.output
    for g in ("*.mlp.*=two", "2", "none=2"):
        r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--guard", g, ok=False)
        assert r.exit_code == 2 and "PATTERN=BITS[,BITS]" in r.output, g
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--guard", "none", "--guard", "*.mlp.*=2", ok=False)
    assert r.exit_code == 2 and "cannot be combined" in r.output
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--guard", "*.mlp.*=9", ok=False)
    assert r.exit_code == 2 and "bit widths in 2..8" in r.output
    r = run("quantize", tiny_dir, "-o", tmp_path / "x.bitdial", "--calib", tmp_path / "nope.txt", ok=False)
    assert r.exit_code == 2 and "nope.txt: no such file" in r.output and "'random'" in r.output
    assert not (tmp_path / "x.bitdial").exists()
    r = run("generate", "default", "-p", "x", "--bits", "4", ok=False)
    assert r.exit_code == 2 and "need a .bitdial artifact" in r.output
    (tmp_path / "bad.bitdial").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    r = run("info", tmp_path / "bad.bitdial", ok=False)
    assert r.exit_code == 2 and "bitdial" in r.output
    r = run("eval", "ppl", "default", "--text", tmp_path / "none.txt", ok=False)
    assert r.exit_code == 2 and "text file not found" in r.output


def test_unknown_plan_is_a_clear_error(tiny_artifact):
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "2", "--plan", "nope", ok=False)
    assert r.exit_code == 2 and "no plan named 'nope'" in r.output
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "2", "--plan", "x", "--bits", "3", ok=False)
    assert r.exit_code == 2 and "one of --bits, --bits-map, --plan or --dynamic" in r.output


def test_head_bits_flag(tiny_artifact):
    """--head-bits on a static artifact: a width for every target runs; bad values are clear errors."""
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "3", "--bits", "3", "--head-bits", "4", "--json")
    assert last_json(r)["completion_tokens"] == 3
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "2", "--head-bits", "12", ok=False)
    assert r.exit_code == 2 and "output head stores" in r.output
    r = run("generate", tiny_artifact, "-p", "Hello", "-n", "2", "--head-bits", "3=4", ok=False)
    assert r.exit_code == 2 and "no dynamic policy for target" in r.output
    r = run("generate", "default", "-p", "x", "--head-bits", "4", ok=False)
    assert r.exit_code == 2 and "needs a .bitdial artifact" in r.output
