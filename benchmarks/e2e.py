"""End-to-end decode and prefill speed: bitdial at uniform k = 2..8 against llama.cpp on the same machine.

    python benchmarks/e2e.py --artifact smol.bitdial [--gguf SRC.gguf] [--bits 2,3,4,5,6,8] [--threads 2]
        [--runs 5] [--rounds 1] [--new-tokens 64] [--prefill-tokens 512] [--types Q8_0,Q5_0,Q4_0,Q3_K_S,Q2_K] [--fp32]
        [--out benchmarks/results/e2e_default.json]

Both engines run in this one process, one after the other, on the same thread count; every figure is the
median of ``--runs``. bitdial: the artifact built at k bits for every linear, the head and the embedding
(``--head-bits`` pins the head instead), decode through the fused native step, prefill of
``--prefill-tokens`` tokens through the tiled bf16/fp32 path (``--prefill-dtype``). llama.cpp: the
``llama-cpp-python`` bindings (optional: ``pip install llama-cpp-python``, built from source with native
flags), on the types of similar size quantized from ``--gguf`` (default: the artifact's source) with
llama.cpp's own quantizer; tg = greedy decode of ``--new-tokens`` tokens one at a time, pp = one batch of
``--prefill-tokens`` tokens. ``--fp32`` adds bitdial's dense fp32 decoder on the GGUF. Quantized GGUFs are
cached next to ``--work`` (default /tmp/bitdial-e2e).

``--llama-bin DIR`` uses llama.cpp's own tools instead of the bindings: ``DIR/llama-quantize`` makes the
types and ``DIR/llama-bench`` times them (tg ``--new-tokens``, pp ``--prefill-tokens``, ``-r --runs``, the
median of its samples), in a subprocess between bitdial's rows of the same round.
``bash benchmarks/build_llama_cpp.sh`` builds both from llama-cpp-python's PyPI source with native flags,
AMX included (with the one patch that lets its AMX path run under GCC 12, see that script).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import bitdial  # noqa: F401  (before torch: sets its OpenMP wait policy, docs/kernels.md "Threads")
import torch
from rich.console import Console
from rich.table import Table

import bitdial.kernels as BK
from bitdial.artifact import open_artifact
from bitdial.runtime.anyprec import build_model
from bitdial.runtime.generate import SamplingParams, sample_next

ROOT = Path(__file__).resolve().parent
GREEDY = SamplingParams()  # temperature 0
PAIRS = ((8, "Q8_0"), (5, "Q5_0"), (4, "Q4_0"), (3, "Q3_K_S"), (2, "Q2_K"))  # bitdial k ~ llama.cpp type
LLAMA_FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
                "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
console = Console(stderr=True)


def med(xs):
    return statistics.median(xs)


def time_bitdial(model, new: int, pp: int, runs: int, vocab: int) -> tuple[float, float, dict]:
    """(decode tok/s, prefill tok/s, where the decode time went), medians."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    long = torch.randint(0, vocab, (1, pp), generator=g)
    dec, pre, split = [], [], []
    fused = getattr(model, "fast_decode", None)
    with torch.inference_mode():
        model.setup_cache(1, max(pp, 16 + new) + 8)
        for r in range(runs + 1):
            logits = model(prompt, 0, last_only=True)[0, -1]
            if fused is not None:
                fused.stats()
            t = time.perf_counter()
            for i in range(new):
                tok = sample_next(logits, GREEDY, None, None)  # as generation picks greedily
                logits = model(torch.tensor([[tok]]), 16 + i)[0, -1]
            dt = time.perf_counter() - t
            if fused is not None:
                s = fused.stats()
                native_s = s["step_ms"] * s["steps"] / 1e3
                split.append({"native_share": native_s / dt, "gemv_share_of_native": s["gemv_share"]})
            t = time.perf_counter()
            model(long, 0, last_only=True)
            pt = time.perf_counter() - t
            if r:  # the first run warms caches and page-ins
                dec.append(new / dt)
                pre.append(pp / pt)
    where = {}
    if split:
        native = med([s["native_share"] for s in split[1:] or split])
        gemv = med([s["gemv_share_of_native"] for s in split[1:] or split])
        where = {"outside_native_step": 1 - native, "gemv_jobs": native * gemv, "other_native": native * (1 - gemv)}
    return med(dec), med(pre), where


def llama_env() -> dict[str, str]:
    """The environment llama.cpp runs in: without the ``OMP_WAIT_POLICY=PASSIVE`` that importing bitdial sets
    for torch's OpenMP pool (unless the user set one). llama.cpp's graph threads are OpenMP threads that spin
    between the hundreds of small ops of a decode step; made passive they sleep after each one, and its
    decode falls by half or more (Sapphire Rapids, default model, Q4_0 tg128: 103 tok/s passive against 214
    tok/s as llama-bench runs by default)."""
    env = dict(os.environ)
    if bitdial.OMP_WAIT_POLICY_SET_BY_BITDIAL:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def import_llama_cpp():
    """``llama_cpp``, its OpenMP runtime loaded under ``llama_env()`` (libgomp reads the policy when it loads)."""
    saved = os.environ.pop("OMP_WAIT_POLICY", None) if bitdial.OMP_WAIT_POLICY_SET_BY_BITDIAL else None
    try:
        import llama_cpp
    finally:
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved
    return llama_cpp


def llama_quantized(src: Path, kind: str, work: Path, bin_dir: Path | None = None) -> Path:
    if kind == "source":
        return src
    out = work / f"{src.stem}.{kind}.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp")
    if bin_dir is not None:
        r = subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(tmp), kind, "2"],
                           capture_output=True, text=True, env=llama_env())
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama-quantize could not make {kind} from {src} (rc {r.returncode}): "
                               f"{r.stderr.strip()[-300:]}")
        os.replace(tmp, out)
        return out
    llama_cpp = import_llama_cpp()

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_FTYPES[kind]
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind} (rc {rc})")
    os.replace(tmp, out)
    return out


def time_llama(path: Path, threads: int, new: int, pp: int, runs: int, vocab: int) -> tuple[float, float]:
    llama_cpp = import_llama_cpp()

    llm = llama_cpp.Llama(str(path), n_ctx=max(pp, 16 + new) + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (16,), generator=g).tolist()
    long = torch.randint(0, vocab, (pp,), generator=g).tolist()
    dec, pre = [], []
    for r in range(runs + 1):
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(new):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([tok])
        dt = time.perf_counter() - t
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        pt = time.perf_counter() - t
        if r:
            dec.append(new / dt)
            pre.append(pp / pt)
    del llm
    return med(dec), med(pre)


def time_llama_bench(bin_dir: Path, path: Path, threads: int, new: int, pp: int, runs: int) -> tuple[float, float]:
    """llama-bench's tg ``new`` and pp ``pp`` tok/s of one GGUF: medians of its ``runs`` samples."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-n", str(new), "-p", str(pp),
           "-r", str(runs), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=llama_env())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {r.returncode}): {r.stderr.strip()[-500:]}")
    tests = json.loads(r.stdout)
    dec = [t for t in tests if t["n_gen"] == new and t["n_prompt"] == 0]
    pre = [t for t in tests if t["n_prompt"] == pp and t["n_gen"] == 0]
    if not dec or not pre:
        raise RuntimeError(f"llama-bench gave no tg{new}/pp{pp} rows: {r.stdout[:300]}")
    return med(dec[0]["samples_ts"]), med(pre[0]["samples_ts"])


def llama_bench_version(bin_dir: Path) -> str:
    r = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True, env=llama_env())
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("version")]
    return lines[0].removeprefix("version: ") if lines else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--gguf", default=None, help="source GGUF for llama.cpp (default: the artifact's source)")
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--head-bits", type=int, default=None, help="pin the output head (default: k, like the rest)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole sweep this many times, engines interleaved: figures are medians over "
                         "rounds and each bitdial/llama.cpp ratio the median of the rounds' own ratios (robust to "
                         "a noisy host's drift)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--types", default="Q8_0,Q5_0,Q4_0,Q3_K_S,Q2_K", help="llama.cpp types ('' = skip llama.cpp)")
    ap.add_argument("--fp32", action="store_true", help="also time bitdial's dense fp32 decoder on the GGUF")
    ap.add_argument("--llama-bin", default=None,
                    help="directory with llama-bench and llama-quantize (benchmarks/build_llama_cpp.sh) to use "
                         "instead of the llama-cpp-python bindings")
    ap.add_argument("--work", default="/tmp/bitdial-e2e")
    ap.add_argument("--out", default=str(ROOT / "results" / "e2e_default.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    BK.set_threads(args.threads)
    art = open_artifact(args.artifact)
    vocab = art.config.vocab_size
    src = Path(args.gguf or art.meta.get("source", {}).get("path", ""))
    pdt = {"auto": torch.bfloat16 if BK.fast_bf16() else torch.float32, "bf16": torch.bfloat16,
           "fp32": torch.float32}[args.prefill_dtype]  # auto: what generation uses for the prompt
    types = [t for t in args.types.split(",") if t]
    llama_version = None
    if args.llama_bin:
        args.llama_bin = Path(args.llama_bin)
        missing = [t for t in ("llama-bench", "llama-quantize") if not (args.llama_bin / t).is_file()]
        if missing:
            raise SystemExit(f"--llama-bin {args.llama_bin}: no {', '.join(missing)} there "
                             "(build them with: bash benchmarks/build_llama_cpp.sh)")
        llama_version = f"llama-bench {llama_bench_version(args.llama_bin)}"
    elif types:
        try:
            llama_cpp = import_llama_cpp()
            llama_version = llama_cpp.__version__
        except ImportError:
            console.log("llama-cpp-python is not installed: llama.cpp columns skipped")
            types = []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rounds = [sweep(args, art, src, vocab, pdt, types, r) for r in range(max(1, args.rounds))]
    rows = []
    for i, first in enumerate(rounds[0]):
        per = [rd[i] for rd in rounds]
        row = dict(first, decode_tps=med([r["decode_tps"] for r in per]), prefill_tps=med([r["prefill_tps"] for r in per]))
        if len(per) > 1:
            row["rounds"] = [{"decode_tps": r["decode_tps"], "prefill_tps": r["prefill_tps"]} for r in per]
        rows.append(row)
    pairs = []  # bitdial k against the llama.cpp type of similar size, ratio per round then median
    for k, t in PAIRS:
        ib = [i for i, r in enumerate(rounds[0]) if r["engine"] == "bitdial" and r.get("bits") == k]
        il = [i for i, r in enumerate(rounds[0]) if r["engine"] == "llama.cpp" and r["type"] == t]
        if ib and il:
            pairs.append({"bits": k, "type": t,
                          "decode_ratio": med([rd[ib[0]]["decode_tps"] / rd[il[0]]["decode_tps"] for rd in rounds]),
                          "prefill_ratio": med([rd[ib[0]]["prefill_tps"] / rd[il[0]]["prefill_tps"] for rd in rounds])})

    table = Table(title=f"{Path(args.artifact).name}: {args.threads} threads, medians of {args.runs}"
                        + (f" x {len(rounds)} interleaved rounds" if len(rounds) > 1 else ""))
    for c in ("engine", "type", "decode tok/s", f"pp{args.prefill_tokens} tok/s", "decode: Python / GEMV / other C"):
        table.add_column(c, justify="right")
    for r in rows:
        w = r.get("decode_time_split") or {}
        split = (f"{w['outside_native_step']:.0%} / {w['gemv_jobs']:.0%} / {w['other_native']:.0%}" if w else "")
        table.add_row(r["engine"], r["type"], f"{r['decode_tps']:.1f}", f"{r['prefill_tps']:.0f}", split)
    Console().print(table)
    if pairs:
        Console().print("bitdial / llama.cpp (median of per-round ratios): " + ", ".join(
            f"{p['bits']}-bit / {p['type']} decode {p['decode_ratio']:.2f}x, prefill {p['prefill_ratio']:.2f}x"
            for p in pairs))
    out = {"artifact": str(args.artifact), "source": str(src), "threads": args.threads, "runs": args.runs,
           "rounds": len(rounds), "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
           "kernel_variant": BK.variant(), "llama_cpp_python": llama_version, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "rows": rows, "ratios": pairs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    console.log(f"wrote {args.out}")


def sweep(args, art, src: Path, vocab: int, pdt, types: list[str], rnd: int) -> list[dict]:
    """One pass over every configuration (bitdial widths, fp32, llama.cpp types): one row each, in a fixed
    order. The runs go pair by pair (bitdial k next to the llama.cpp type of similar size, the pair's order
    flipped every other round) so that the two engines of a ratio are timed seconds apart, not a round apart:
    this host's speed moves within a minute."""
    bits = [int(b) for b in args.bits.split(",") if b]
    jobs = []
    for k, t in PAIRS:
        if k in bits and t in types:
            jobs += [("bitdial", k), ("llama", t)] if rnd % 2 == 0 else [("llama", t), ("bitdial", k)]
    jobs += [("bitdial", k) for k in bits if ("bitdial", k) not in jobs]
    jobs += [("fp32", None)] if args.fp32 else []
    jobs += [("llama", t) for t in types if ("llama", t) not in jobs]
    done = {}
    for kind, what in jobs:
        if kind == "bitdial":
            done[kind, what] = time_bitdial_row(args, art, vocab, pdt, what, rnd)
        elif kind == "fp32":
            done[kind, what] = time_fp32_row(args, src, vocab, rnd)
        else:
            done[kind, what] = time_llama_row(args, src, vocab, what, rnd)
    order = [("bitdial", k) for k in bits] + ([("fp32", None)] if args.fp32 else []) + [("llama", t) for t in types]
    return [done[key] for key in order]


def time_bitdial_row(args, art, vocab: int, pdt, k: int, rnd: int) -> dict:
    model = build_model(art, {"default": k, "lm_head": args.head_bits or k, "embed_tokens": k}, prefill_dtype=pdt)
    d, p, where = time_bitdial(model, args.new_tokens, args.prefill_tokens, args.runs, vocab)
    bpw = sum(art.qtensor(n).bytes_read(k) for n in art.modules) * 8 / sum(
        art.modules[n]["shape"][0] * art.modules[n]["shape"][1] for n in art.modules)
    console.log(f"round {rnd + 1}: bitdial k={k}: decode {d:.1f} tok/s, prefill {p:.0f} tok/s")
    return {"engine": "bitdial", "type": f"uniform {k}-bit", "bits": k, "bits_per_weight_read": bpw,
            "decode_tps": d, "prefill_tps": p, "prefill_dtype": str(model.prefill.dtype).split(".")[-1],
            "decode_time_split": where}


def time_fp32_row(args, src: Path, vocab: int, rnd: int) -> dict:
    from bitdial.loading import load_model
    from bitdial.model.llama import Transformer
    from bitdial.runtime.fused import install_dense

    lm = load_model(src)
    dense = Transformer(lm.config, dict(lm.tensors)).eval().fuse()
    install_dense(dense)  # the fp32 decode step in one native call, as Engine.load sets it up
    d, p, _ = time_bitdial(dense, args.new_tokens, args.prefill_tokens, args.runs, vocab)
    console.log(f"round {rnd + 1}: bitdial fp32: decode {d:.1f}, prefill {p:.0f}")
    return {"engine": "bitdial", "type": "fp32 (dense)", "bits": 32, "decode_tps": d, "prefill_tps": p}


def time_llama_row(args, src: Path, vocab: int, t: str, rnd: int) -> dict:
    path = llama_quantized(src, t, Path(args.work), args.llama_bin)
    if args.llama_bin:
        d, p = time_llama_bench(args.llama_bin, path, args.threads, args.new_tokens, args.prefill_tokens, args.runs)
    else:
        d, p = time_llama(path, args.threads, args.new_tokens, args.prefill_tokens, args.runs, vocab)
    console.log(f"round {rnd + 1}: llama.cpp {t}: decode {d:.1f} tok/s, prefill {p:.0f} tok/s")
    return {"engine": "llama.cpp", "type": t, "file_mib": path.stat().st_size / 2**20, "decode_tps": d,
            "prefill_tps": p}

if __name__ == "__main__":
    main()
