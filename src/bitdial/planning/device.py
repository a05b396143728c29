"""Hardware profiles: how long (and how much energy) a token's decode takes for a per-module bit assignment.

Latency model
-------------
``t_token = c0 + Σ_modules t(shape, bits)``, in one of two forms (a measured profile stores both and
records which predicted held-out decode steps better, ``latency.model``):

``table``
    ``t(shape, bits)`` measured directly for every distinct module shape and width (``AnyPrecisionLinear``
    forward at M = 1), ``c0`` = the rest of a decode step (attention over the KV cache, norms, embedding,
    framework overhead): the median over uniform widths of (measured step − Σ table times).
``linear``
    ``t = a · bytes_read(bits) + w · N·K + d``: bytes over an effective bandwidth, a per-weight term
    (the torch reference path multiplies cached fp32 weights, whose cost depends on N·K, not on the
    bits), and a per-call overhead, fitted by non-negative least squares on the table; works for any
    shape. ``c0 = c0_fixed + c0_per_layer · n_layers``.
``step``
    ``t(shape, bits)`` measured *inside whole decode steps*, which is what a plan's latency is: from a base
    step with every module at ``base_bits`` (4), each shape group in turn is set to each width and the
    step re-timed; ``Δ(shape, b) = (T(group at b) − T(base)) / modules in the group`` is a module's marginal
    cost. ``t(shape, b) = bytes_read(b) / bw_shape``, the group's in-step bandwidth fitted by least squares
    on its Δ over every width (one noisy step moves it little, and it is monotone in the bits, which a
    per-width table is not: a planner exploits a flat spot), and ``c0`` is the rest of the base step. A native decode step runs ~200 small GEMVs in one call, so isolated
    module timings (``table``) carry per-call costs the step does not pay and miss the ones it does (on
    AMD Zen 4 the table over-predicted plans by ~20%); ``step`` is exact for the base step.

Estimated devices (``devices/*.json``, ``estimate: true``) use the ``linear`` form built from published
memory bandwidth and compute figures (sources in the file), assuming native bitplane kernels (a k-bit
module reads ``bytes_read(k)``). Prefill (M tokens at once) is ``max(bytes/bandwidth, 2·N·K·M/flops)``
per module for estimates and a measured table here.

Energy model
------------
``E_token = P_static · t_token + e_byte · bytes_read + e_flop · 2·N·K`` (per decode token), from published
figures (labelled estimates, ``energy.sources``). Where RAPL counters
(``/sys/class/powercap/intel-rapl*``) are readable, the package energy of decode steps is measured and
recorded next to the estimate; elsewhere this degrades to the estimate with the reason recorded.

Device file (JSON, ``schema: bitdial-device-profile``, ``schema_version`` 1; written atomically)::

    {"schema", "schema_version", "name", "estimate": bool, "created", "description", "sources": [...],
     "host": {...}, "backend": "native" | "torch-reference", "threads",
     "bandwidth_gbs": measured (or effective, for estimates) read bandwidth,
     "latency": {"model": "table" | "linear" | "step",
                 "table": {"NxK": {"2": ms, ...}}, "c0_ms": ..., "n_layers": ...,     # measured only
                 "step": {"base_bits": 4, "table": {"NxK": {"2": ms, ...}}, "c0_ms": ...},  # measured only
                 "linear": {"ms_per_mb": a, "ms_per_mweight": w, "per_call_ms": d,
                            "c0_fixed_ms": ..., "c0_per_layer_ms": ...},
                 "prefill": {"m": 64, "table": {...}} | {"m": .., "gflops": ..},
                 "validation": {...}},
     "energy": {"static_w", "pj_per_byte", "pj_per_flop", "estimate": true, "sources": [...], "rapl": {...}}}
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bitdial.planning.common import ProfileError, atomic_write_json, check_schema_version, utc_now

log = logging.getLogger(__name__)

SCHEMA = "bitdial-device-profile"
SCHEMA_VERSION = 1
RAPL_ROOT = Path("/sys/class/powercap")

__all__ = ["SCHEMA", "SCHEMA_VERSION", "DeviceModel", "ModuleSpec", "backend_name", "builtin_devices",
           "default_device_path", "load_device", "profile_device", "read_bandwidth", "rapl_reader",
           "save_device"]


@dataclass(frozen=True)
class ModuleSpec:
    """What the latency/energy models need to know about one module at one width."""

    shape: tuple[int, int]  # [N, K]
    bits: int
    bytes: int  # bytes a k-bit reader touches (qt.bytes_read(bits))


def kernel_threads(n: int | None = None) -> int | None:
    """Set (when ``n`` is given) and return the native kernels' thread count; None without kernels."""
    try:
        from bitdial import kernels

        if not kernels.available():
            return None
        if n is not None:
            kernels.set_threads(int(n))
        return int(kernels.threads())
    except Exception:
        return None


def shape_key(shape) -> str:
    return f"{int(shape[0])}x{int(shape[1])}"


def backend_name() -> str:
    """``native`` when :mod:`bitdial.kernels` reports its kernels available, else ``torch-reference``."""
    try:
        from bitdial import kernels

        avail = getattr(kernels, "available", None)
        if getattr(kernels, "enabled", True) and callable(avail) and avail():
            variant = getattr(kernels, "variant", None)
            try:
                v = variant() if callable(variant) else None
            except Exception:
                v = None
            return f"native ({v})" if v else "native"
    except Exception:  # kernels absent or failing to import: the reference path runs
        pass
    return "torch-reference"


# ---- the model ------------------------------------------------------------------------------------
class DeviceModel:
    """A validated device profile: predicts decode time (ms) and energy (mJ) per token."""

    def __init__(self, data: dict[str, Any], path: str | Path | None = None) -> None:
        validate_device(data, str(path or data.get("name", "device")))
        self.data = data
        self.path = None if path is None else Path(path)
        lat = data["latency"]
        self.kind = lat["model"]
        self.table = {k: {int(b): float(v) for b, v in row.items()} for k, row in (lat.get("table") or {}).items()}
        self.lin = lat["linear"]
        st = lat.get("step") or {}
        self.step_table = {k: {int(b): float(v) for b, v in row.items()} for k, row in (st.get("table") or {}).items()}
        e = data["energy"]
        self.static_w = float(e["static_w"])
        self.pj_per_byte = float(e["pj_per_byte"])
        self.pj_per_flop = float(e["pj_per_flop"])

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def estimate(self) -> bool:
        return bool(self.data.get("estimate"))

    def module_ms(self, spec: ModuleSpec) -> float:
        """Decode (M = 1) time of one module at its width, ms."""
        if self.kind in ("table", "step"):
            row = (self.table if self.kind == "table" else self.step_table).get(shape_key(spec.shape))
            if row is not None and spec.bits in row:
                return row[spec.bits]
        N, K = spec.shape
        return (self.lin["ms_per_mb"] * spec.bytes / 1e6 + self.lin["ms_per_mweight"] * N * K / 1e6
                + self.lin["per_call_ms"])

    def c0_ms(self, n_layers: int) -> float:
        """Per-token time outside the planned/fixed linears, ms."""
        lat = self.data["latency"]
        if self.kind == "table" and "c0_ms" in lat and int(lat.get("n_layers", -1)) == int(n_layers):
            return float(lat["c0_ms"])
        if self.kind == "step" and int(lat.get("n_layers", -1)) == int(n_layers):
            return float(lat["step"]["c0_ms"])
        return float(self.lin["c0_fixed_ms"]) + float(self.lin["c0_per_layer_ms"]) * n_layers

    def token_ms(self, specs: list[ModuleSpec], n_layers: int) -> float:
        return self.c0_ms(n_layers) + sum(self.module_ms(s) for s in specs)

    def module_mj(self, spec: ModuleSpec) -> float:
        """Energy attributable to one module per decode token, mJ (static power over its time + dynamic)."""
        N, K = spec.shape
        return (self.static_w * self.module_ms(spec)
                + (self.pj_per_byte * spec.bytes + self.pj_per_flop * 2 * N * K) * 1e-9)

    def c0_mj(self, n_layers: int) -> float:
        return self.static_w * self.c0_ms(n_layers)

    def token_mj(self, specs: list[ModuleSpec], n_layers: int) -> float:
        return self.c0_mj(n_layers) + sum(self.module_mj(s) for s in specs)

    def prefill_ms(self, specs: list[ModuleSpec], n_layers: int, m: int) -> float:
        """Rough prefill time of ``m`` tokens (linears only, plus ``m · c0`` as an upper bound of the rest)."""
        pre = self.data["latency"].get("prefill") or {}
        tab = pre.get("table") or {}
        gflops = float(pre.get("gflops") or 0)
        bw = float(self.data.get("bandwidth_gbs") or 0)
        t = 0.0
        for s in specs:
            row = tab.get(shape_key(s.shape))
            if row and str(s.bits) in row:
                t += float(row[str(s.bits)]) * m / int(pre.get("m", m))
            elif gflops > 0:
                N, K = s.shape
                t += max(s.bytes / (bw * 1e6) if bw else 0.0, 2 * N * K * m / (gflops * 1e6))
            else:
                t += self.module_ms(s) * m
        return t + self.c0_ms(n_layers) * m


def _check_ms_table(table: Any, name: str) -> None:
    """A {shape: {bits: ms}} table: non-empty, integer widths, finite non-negative times (ValueError naming the entry)."""
    if not isinstance(table, dict) or not table:
        raise ValueError(f"empty {name}")
    for key, row in table.items():
        for b, t in row.items():
            int(b)
            if not math.isfinite(float(t)) or float(t) < 0:
                raise ValueError(f"{name}[{key}][{b}] = {t!r}")


def validate_device(d: Any, where: str) -> None:
    """Raise ProfileError naming the first problem of a device profile dict."""
    fix = " Re-run `bitdial profile device` to rebuild it."
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: not a bitdial device profile (schema "
                           f"{d.get('schema') if isinstance(d, dict) else None!r}, expected {SCHEMA!r}).{fix}")
    check_schema_version(d.get("schema_version"), SCHEMA_VERSION, "device profile", where, fix)
    try:
        lat = d["latency"]
        if lat["model"] not in ("table", "linear", "step"):
            raise ValueError(f"latency model {lat['model']!r}")
        lin = lat["linear"]
        for k in ("ms_per_mb", "ms_per_mweight", "per_call_ms", "c0_fixed_ms", "c0_per_layer_ms"):
            x = float(lin[k])
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"linear.{k} = {lin[k]!r}")
        if lat["model"] == "table":
            _check_ms_table(lat["table"], "table")
            float(lat["c0_ms"])
        if lat["model"] == "step":
            _check_ms_table(lat["step"]["table"], "step.table")
            if not math.isfinite(float(lat["step"]["c0_ms"])):
                raise ValueError(f"step.c0_ms = {lat['step']['c0_ms']!r}")
        e = d["energy"]
        for k in ("static_w", "pj_per_byte", "pj_per_flop"):
            x = float(e[k])
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"energy.{k} = {e[k]!r}")
        str(d["name"])
    except (KeyError, TypeError, ValueError) as ex:
        raise ProfileError(f"{where}: device profile entry missing or malformed ({ex}): corrupt file.{fix}") from None


# ---- files ----------------------------------------------------------------------------------------------
def default_device_path() -> Path:
    """Where ``bitdial profile device`` writes this machine's profile by default and the planner looks for it:
    ``$BITDIAL_CACHE/device.json`` or ``~/.cache/bitdial/device.json``."""
    root = os.environ.get("BITDIAL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "bitdial"
    return base / "device.json"


def builtin_devices() -> dict[str, Path]:
    """Shipped estimate profiles by name (``rpi5``, ``jetson-orin-nano``, ``snapdragon-8-gen-3``, ``apple-m2``)."""
    out = {}
    base = resources.files("bitdial.planning") / "devices"
    try:
        entries = list(base.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return out
    for p in entries:
        if p.name.endswith(".json"):
            out[p.name[:-5]] = Path(str(p))
    return dict(sorted(out.items()))


def load_device(spec: str | Path | None = None) -> DeviceModel:
    """A device profile from a path, a built-in name, or (``None``) this machine's default profile."""
    if spec is None:
        p = default_device_path()
        if not p.is_file():
            raise ProfileError(f"no device profile for this machine at {p}: run `bitdial profile device` first, "
                               f"or pass --device with a file or one of: {', '.join(builtin_devices())}")
    else:
        p = Path(spec)
        if not p.is_file():
            builtin = builtin_devices()
            if str(spec) in builtin:
                p = builtin[str(spec)]
            else:
                raise ProfileError(f"device profile {spec!r} not found: give a file made by `bitdial profile device` "
                                   f"or one of the built-in estimates: {', '.join(builtin)}")
    try:
        d = json.loads(Path(p).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{p}: not valid JSON ({e}): corrupt device profile. Re-run `bitdial profile device`.") from None
    return DeviceModel(d, p)


def save_device(data: dict[str, Any], path: str | Path) -> Path:
    validate_device(data, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data)


# ---- measurement ----------------------------------------------------------------------------------------
def _time_calls(fn, min_time: float = 0.05, min_calls: int = 5, batches: int = 5) -> float:
    """Median over ``batches`` of the mean time per call (seconds), each batch >= ``min_time``."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(min_calls, int(min_time / one))
    res = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        res.append((time.perf_counter() - t0) / n)
    return statistics.median(res)


def read_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Read bandwidth, GB/s: the best of ``repeats`` sums of a ``mbytes`` MB fp32 tensor."""
    x = torch.ones(mbytes * (1 << 20) // 4)
    x.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def rapl_reader() -> tuple[Any, dict[str, Any]]:
    """``(read_fn, info)``: ``read_fn()`` returns the summed package energy counters in joules, or ``None`` with
    ``info['reason']`` when RAPL is not readable here (no powercap, permissions, a VM)."""
    zones = sorted(RAPL_ROOT.glob("intel-rapl:[0-9]")) if RAPL_ROOT.is_dir() else []
    if not zones:
        return None, {"available": False, "reason": f"no RAPL package zones under {RAPL_ROOT} (VM, non-Intel/AMD CPU, "
                                                    "or powercap not exposed)"}
    files = [z / "energy_uj" for z in zones]
    try:
        for f in files:
            int(f.read_text())
    except OSError as e:
        return None, {"available": False, "reason": f"RAPL counters not readable ({e.strerror}; needs root or "
                                                    "a relaxed powercap permission)"}
    ranges = []
    for z in zones:
        try:
            ranges.append(int((z / "max_energy_range_uj").read_text()))
        except OSError:
            ranges.append(0)

    last = [int(f.read_text()) for f in files]
    total = [0.0]

    def read() -> float:
        for i, f in enumerate(files):
            v = int(f.read_text())
            d = v - last[i]
            if d < 0 and ranges[i]:  # wrapped
                d += ranges[i]
            total[0] += d * 1e-6
            last[i] = v
        return total[0]

    return read, {"available": True, "zones": [z.name for z in zones]}


def _random_qt(shape: tuple[int, int], max_bits: int, group: int, gen: torch.Generator):
    from bitdial.quant.bitplanes import row_bytes
    from bitdial.quant.qtensor import QuantizedTensor

    N, K = shape
    ng = math.ceil(K / group)
    planes = torch.randint(0, 256, (max_bits, N, row_bytes(K)), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(N, ng, generator=gen) * 1e-3 + 1e-4).half()
    offsets = (-scales.float() * (2 ** max_bits) / 2).half()
    return QuantizedTensor(method="uniform", shape=(N, K), max_bits=max_bits, group_size=group, planes=planes,
                           scales=scales, offsets=offsets)


def synthetic_model(cfg, max_bits: int = 8, group: int = 64, seed: int = 0):
    """A decoder with the config's shapes and random bitplanes (for timing without an artifact)."""
    from bitdial.model.llama import Transformer
    from bitdial.runtime.anyprec import AnyPrecisionLinear, QuantEmbedding

    gen = torch.Generator().manual_seed(seed)
    w: dict[str, Any] = {"norm.weight": torch.ones(cfg.dim), "embed_tokens.weight": None}
    shapes = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        w[f"{p}.input_layernorm.weight"] = torch.ones(cfg.dim)
        w[f"{p}.post_attention_layernorm.weight"] = torch.ones(cfg.dim)
        if cfg.qk_norm:
            w[f"{p}.self_attn.q_norm.weight"] = torch.ones(cfg.head_dim)
            w[f"{p}.self_attn.k_norm.weight"] = torch.ones(cfg.head_dim)
        hq, hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for n, s in (("self_attn.q_proj", (hq, cfg.dim)), ("self_attn.k_proj", (hk, cfg.dim)),
                     ("self_attn.v_proj", (hk, cfg.dim)), ("self_attn.o_proj", (cfg.dim, hq)),
                     ("mlp.gate_proj", (cfg.hidden_dim, cfg.dim)), ("mlp.up_proj", (cfg.hidden_dim, cfg.dim)),
                     ("mlp.down_proj", (cfg.dim, cfg.hidden_dim))):
            w[f"{p}.{n}.weight"] = None
            shapes[f"{p}.{n}"] = s
    cache: dict[tuple[int, int], Any] = {}

    def qt_for(shape):
        if shape not in cache:
            cache[shape] = _random_qt(shape, max_bits, group, gen)
        return cache[shape]  # one random tensor per shape: timing does not depend on the values

    emb_qt = qt_for((cfg.vocab_size, cfg.dim))

    def factory(name, weight, bias):
        shape = shapes.get(name, (cfg.vocab_size, cfg.dim))
        return AnyPrecisionLinear(name, qt_for(shape), bias)

    return Transformer(cfg, w, factory, embedding=QuantEmbedding(emb_qt)).eval()


def _set_all(model, bits: dict[str, int]) -> None:
    from bitdial.runtime.anyprec import AnyPrecisionLinear

    for n, m in model.linears().items():
        if isinstance(m, AnyPrecisionLinear) and n in bits:
            m.bits = bits[n]


def _decode_step_ms(model, steps: int = 16, prompt: int = 16) -> float:
    """Median time of one decode step (M = 1) after a short prefill, ms."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, prompt + steps + 2), generator=g)
    model.setup_cache(1, prompt + steps + 4)
    times = []
    with torch.inference_mode():
        model(ids[:, :prompt], 0)
        model(ids[:, prompt:prompt + 1], prompt)  # warm-up step (dequantizes new widths)
        for i in range(steps):
            p = prompt + 1 + i
            t0 = time.perf_counter()
            model(ids[:, p:p + 1], p, last_only=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_decode(model, assigns: list[dict[str, int]], *, steps: int = 16, rounds: int = 3,
                   on_done=None) -> list[float]:
    """Decode-step time (ms) of each per-module assignment: the minimum over ``rounds`` interleaved rounds of
    the median of ``steps`` steps, in a shuffled order each round (interference only ever adds time)."""
    best = [math.inf] * len(assigns)
    order = list(range(len(assigns)))
    rng = random.Random(0)
    for r in range(max(1, rounds)):
        if r:
            rng.shuffle(order)  # a different order each round decorrelates periodic interference
        for i in order:
            a = assigns[i]
            _set_all(model, a)
            best[i] = min(best[i], _decode_step_ms(model, steps))
            if on_done is not None:
                on_done(i)
    return best


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares (scipy when present, else clipped lstsq)."""
    import numpy as np

    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    scale = np.maximum(np.abs(A).max(0), 1e-30)
    try:
        from scipy.optimize import nnls

        x, _ = nnls(A / scale, b)
    except ImportError:
        x = np.linalg.lstsq(A / scale, b, rcond=None)[0].clip(min=0)
    return list(x / scale)


def _sig(v: float, digits: int = 6) -> float:
    """v to ``digits`` significant digits (a fixed number of decimals would round a tiny module's cost to 0)."""
    return float(f"{v:.{digits}g}")


def _step_table(lin: dict, groups: dict[str, list[str]], base_b: int, t_base: float | None,
                designed: list[tuple[str, int]], times: list[float], lin_fit: dict,
                bw_gbs: float = 0.0) -> dict[str, Any] | None:
    """The ``step`` latency form (module docstring) from the base step time and the designed steps."""
    if t_base is None or not designed:
        return None
    table: dict[str, dict[str, float]] = {}
    per_module = 0.0
    for key, names in groups.items():
        qt = lin[names[0]].qt
        delta = {base_b: 0.0}
        for (k, b), t in zip(designed, times):
            if k == key:
                delta[b] = (t - t_base) / len(names)
        # the group's in-step cost per MB: least squares through the base point over every width (robust to
        # one noisy step, and monotone in the bits by construction, which a per-width table is not)
        d_bytes = {b: (qt.bytes_read(b) - qt.bytes_read(base_b)) / 1e6 for b in delta}
        den = sum(v * v for v in d_bytes.values())
        ms_per_mb = sum(delta[b] * d_bytes[b] for b in delta) / den if den > 0 else 0.0
        # a group too small to time (its Δ lost in the step's noise) gets a tenth of the isolated fit's cost per
        # MB at least: the in-step cost was 0.3-0.6x the isolated one on the default model, never near 0. Where
        # that fit is lost in the noise too (tiny models), a tenth of the DRAM cost (1 / bandwidth, GB/s =
        # MB/ms): reading the bytes from cache is not ten times faster than that.
        floor = 0.1 / bw_gbs if bw_gbs > 0 else 1e-6
        ms_per_mb = max(ms_per_mb, 0.1 * float(lin_fit["ms_per_mb"]), floor)
        table[key] = {str(b): _sig(ms_per_mb * qt.bytes_read(b) / 1e6) for b in sorted(delta)}
        per_module += len(names) * table[key][str(base_b)]
    if per_module > t_base > 0:
        # the floors (or one noisy designed step) put the modules above the whole base step: a negative rest of
        # the step is impossible, so scale the modules down until they fill the base step and leave c0 = 0
        shrink = t_base / per_module
        table = {key: {b: _sig(ms * shrink) for b, ms in row.items()} for key, row in table.items()}
        per_module = sum(len(groups[key]) * table[key][str(base_b)] for key in table)
    return {"base_bits": base_b, "table": table, "c0_ms": round(max(t_base - per_module, 0.0), 6)}


def profile_device(art=None, *, config=None, bits: list[int] | None = None, prefill_m: int = 64,
                   random_plans: int = 10, min_time: float = 0.05, decode_steps: int = 16, rounds: int = 3,
                   seed: int = 0,
                   name: str = "this-machine", progress: bool = False) -> dict[str, Any]:
    """Measure this machine (see the module docstring); returns the device profile dict.

    ``art``: time the artifact's real modules and model; else ``config`` (default: the default model's) with
    random bitplanes. ``random_plans`` random per-module assignments validate both latency forms; the one
    with the smaller median absolute error is recorded as ``latency.model``.
    """
    from bitdial.runtime.anyprec import AnyPrecisionLinear, build_model

    t_start = time.perf_counter()
    if art is not None:
        model = build_model(art)
        cfg = art.config
    else:
        if config is None:
            from bitdial.loading import load_model

            config = load_model("default").config
        cfg = config
        model = synthetic_model(cfg)
    lin = {n: m for n, m in model.linears().items() if isinstance(m, AnyPrecisionLinear)}
    max_b = max(m.max_bits for m in lin.values())
    bits = sorted(bits) if bits else list(range(2, max_b + 1))
    # one representative module per distinct shape
    reps: dict[str, AnyPrecisionLinear] = {}
    for n, m in lin.items():
        reps.setdefault(shape_key(m.qt.shape), m)
    backend = backend_name()
    base_b = 4 if 4 in bits else bits[len(bits) // 2]  # the base step of the in-step table
    groups: dict[str, list[str]] = {}  # shape -> its modules
    for n, m in lin.items():
        groups.setdefault(shape_key(m.qt.shape), []).append(n)
    designed = [(key, b) for key, names in groups.items() for b in bits
                if b != base_b and lin[names[0]].min_bits <= b <= lin[names[0]].max_bits]
    steps = [(k, b) for k in reps for b in bits] + [("decode", b) for b in bits] + [("plan", i) for i in range(random_plans)] \
        + [("group", i) for i in range(len(designed))]
    steps = steps[:len(reps) * len(bits)] + steps[len(reps) * len(bits):] * rounds
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                       console=Console(stderr=True), transient=True)
        bar.__enter__()
        task = bar.add_task("timing modules", total=len(steps))

    def tick(desc: str) -> None:
        if bar is not None:
            bar.update(task, description=desc, advance=1)

    table: dict[str, dict[str, float]] = {}
    prefill: dict[str, dict[str, float]] = {}
    samples = []  # (bytes, weights, ms)
    try:
        with torch.inference_mode():
            for key, m in reps.items():
                probe = AnyPrecisionLinear(m.name, m.qt, None, bits=m.max_bits)
                K = m.in_features
                x1 = torch.randn(1, 1, K)
                xm = torch.randn(1, prefill_m, K)
                for b in bits:
                    if not probe.min_bits <= b <= probe.max_bits:
                        continue
                    probe.bits = b
                    t1 = _time_calls(lambda: probe(x1), min_time) * 1e3
                    tm = _time_calls(lambda: probe(xm), min_time, batches=3) * 1e3
                    table.setdefault(key, {})[str(b)] = round(t1, 6)
                    prefill.setdefault(key, {})[str(b)] = round(tm, 6)
                    N, Kk = m.qt.shape
                    samples.append((m.qt.bytes_read(b), N * Kk, t1))
                    tick(f"timing {key} at {b} bits")
                probe.clear_cache()
        bw = read_bandwidth()
        # linear fit of module time: a * bytes + w * weights + d
        coef = _nnls([[s[0] / 1e6, s[1] / 1e6, 1.0] for s in samples], [s[2] for s in samples])
        lin_fit = {"ms_per_mb": coef[0], "ms_per_mweight": coef[1], "per_call_ms": coef[2]}

        def predict(kind: str, assign: dict[str, int], c0: float) -> float:
            t = c0
            for n, m in lin.items():
                b = assign[n]
                row = step_fit["table"].get(shape_key(m.qt.shape), {}) if kind == "step" else {}
                if str(b) in row:
                    t += row[str(b)]
                elif kind == "table":
                    t += table[shape_key(m.qt.shape)][str(b)]
                else:
                    N, K = m.qt.shape
                    t += lin_fit["ms_per_mb"] * m.qt.bytes_read(b) / 1e6 + lin_fit["ms_per_mweight"] * N * K / 1e6 \
                        + lin_fit["per_call_ms"]
            return t

        read_energy, rapl = rapl_reader()
        rapl_mj = {}
        assigns = {b: {n: min(max(b, m.min_bits), m.max_bits) for n, m in lin.items()} for b in bits}
        rng = random.Random(seed)
        plans = [{n: rng.choice([b for b in bits if m.min_bits <= b <= m.max_bits]) for n, m in lin.items()}
                 for _ in range(random_plans)]
        # every configuration is timed in `rounds` interleaved rounds; the minimum of the per-round medians
        # discards interference from other processes (timing noise only ever adds time)
        base = {n: min(max(base_b, m.min_bits), m.max_bits) for n, m in lin.items()}
        group_assigns = [dict(base, **{n: b for n in groups[key]}) for key, b in designed]
        times = measure_decode(model, [assigns[b] for b in bits] + plans + group_assigns, steps=decode_steps,
                               rounds=rounds, on_done=lambda i: tick("decode steps"))
        uniform = {b: (assigns[b], times[i]) for i, b in enumerate(bits)}
        step_fit = _step_table(lin, groups, base_b, uniform[base_b][1] if base_b in uniform else None,
                               designed, times[len(bits) + len(plans):], lin_fit, bw)
        if read_energy:
            for b in bits:
                _set_all(model, assigns[b])
                e0, t0 = read_energy(), time.perf_counter()
                ms = _decode_step_ms(model, decode_steps)
                dt = time.perf_counter() - t0
                rapl_mj[str(b)] = round((read_energy() - e0) * 1e3 / max(dt, 1e-9) * ms / 1e3, 4)
        c0 = {k: statistics.median(ms - predict(k, a, 0.0) for a, ms in uniform.values()) for k in ("table", "linear")}
        c0 = {k: max(v, 0.0) for k, v in c0.items()}
        val = []
        for i, assign in enumerate(plans):
            ms = times[len(bits) + i]
            row = {"measured_ms": ms, "table_ms": predict("table", assign, c0["table"]),
                   "linear_ms": predict("linear", assign, c0["linear"])}
            if step_fit is not None:
                row["step_ms"] = predict("step", assign, step_fit["c0_ms"])
            val.append(row)
        _set_all(model, {n: m.max_bits for n, m in lin.items()})
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)

    def err(kind: str) -> float | None:
        if not val:
            return None
        return statistics.median(abs(v[f"{kind}_ms"] - v["measured_ms"]) / v["measured_ms"] for v in val)

    errs = {k: err(k) for k in ("table", "linear") + (("step",) if step_fit is not None else ())}
    if val:
        chosen = min(errs, key=lambda k: errs[k])
    else:
        chosen = "table"
    n_layers = cfg.n_layers
    lin_fit.update(c0_fixed_ms=0.0, c0_per_layer_ms=c0["linear"] / n_layers)
    host = {"machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "system": platform.system()}
    static_w, pj_b, pj_f, esrc = _host_energy_defaults()
    data = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": name, "estimate": False, "created": utc_now(),
        "description": f"measured on this machine ({host['processor']}, {torch.get_num_threads()} threads, "
                       f"{backend} backend)",
        "sources": ["measured by `bitdial profile device`"],
        "host": host, "backend": backend, "threads": torch.get_num_threads(), "kernel_threads": kernel_threads(),
        "model": {"source": str(art.path) if art is not None else "synthetic (random bitplanes)",
                  "n_layers": n_layers, "dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "vocab_size": cfg.vocab_size},
        "bandwidth_gbs": round(bw, 3),
        "latency": {
            "model": chosen, "n_layers": n_layers, "table": table, "c0_ms": round(c0["table"], 6),
            "linear": {k: float(v) for k, v in lin_fit.items()},
            **({"step": step_fit} if step_fit is not None else {}),
            "prefill": {"m": prefill_m, "table": prefill},
            "uniform_decode_ms": {str(b): round(ms, 4) for b, (_, ms) in uniform.items()},
            "validation": {"random_plans": len(val), "median_abs_rel_error": errs, "plans": val},
        },
        "energy": {"static_w": static_w, "pj_per_byte": pj_b, "pj_per_flop": pj_f, "estimate": True,
                   "sources": esrc, "rapl": dict(rapl, **({"decode_mj_per_token": rapl_mj} if rapl_mj else {}))},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return data


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_energy_defaults() -> tuple[float, float, float, list[str]]:
    """Energy figures for an x86 server-class host without RAPL: order-of-magnitude estimates."""
    return (
        15.0, 160.0, 5.0,
        ["static_w 15 W: an assumed active share of a server package for 1-2 busy cores (estimate, not measured)",
         "pj_per_byte 160 pJ: DRAM read of ~640 pJ per 32-bit word, M. Horowitz, 'Computing's energy problem', "
         "ISSCC 2014 (45 nm) -- order of magnitude for DDR4/DDR5",
         "pj_per_flop 5 pJ: fp32 multiply 3.7 pJ + add 0.9 pJ (Horowitz, ISSCC 2014, 45 nm) per FMA, with SIMD "
         "amortizing instruction overhead -- order of magnitude"],
    )
