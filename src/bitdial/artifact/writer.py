"""Write a ``.bitdial`` artifact: streamed module by module, atomic, checksummed.

The full header (every tensor's dtype, shape and byte range) is known before any weight is quantized, so
it is written first with placeholder checksums; each module is then quantized, written and dropped, so
peak memory stays at a few modules whatever the model size. The header is rewritten in place with the
real checksums (same length), the file is fsynced and renamed over the target: a crash leaves no
half-written artifact behind a valid name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bitdial.artifact.format import ALIGN, FORMAT, FORMAT_VERSION, TORCH_TO_ST, TensorEntry, encode_header
from bitdial.errors import BitdialError
from bitdial.fileio import atomic_open
from bitdial.loading.source import LoadedModel
from bitdial.quant.bitplanes import row_bytes

log = logging.getLogger(__name__)

_ZERO_SUM = "0" * 64


@dataclass
class QuantSettings:
    method: str = "uniform"  # "uniform" | "nonuniform"
    max_bits: int = 8
    group_size: int = 64
    clip: str = "search"  # "search" | "none"
    # weight of large weights in the search (quant.uniform): one value, a {module pattern: value} map (see
    # saliency_map), or None = default_saliency_map(group_size)
    saliency: float | dict[str, float] | None = None
    overrides: dict[str, int] = field(default_factory=dict)  # {module pattern: max bits}
    calib: str | None = None  # importance source recorded for provenance: a text file, "random" (token ids), None
    # views (bit widths) of each module that the search with importance keeps no worse than plain nesting in
    # every group (quant.uniform): a {module pattern: [bits, ...]} map, or None = default_guard_map(G); views
    # above a module's maximum are skipped; the artifact records the map it used ({"default": []} without
    # importance)
    guard: dict[str, list[int]] | None = None

    def validate(self) -> None:
        if self.method not in ("uniform", "nonuniform"):
            raise BitdialError(f"--method must be 'uniform' or 'nonuniform', got {self.method!r}")
        if not 2 <= self.max_bits <= 8:
            raise BitdialError(f"--max-bits must be in 2..8, got {self.max_bits}")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise BitdialError(f"--group-size must be a power of two >= 8 (32, 64, 128), got {self.group_size}")
        if self.saliency is not None:
            sal = self.saliency if isinstance(self.saliency, Mapping) else {"default": self.saliency}
            for pat, v in sal.items():
                where = "" if pat == "default" else f" for {pat}"
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                    raise BitdialError(f"--saliency{where} must be a number >= 0 (0 turns it off), got {v!r}")
        for pat, views in (self.guard or {}).items():
            if not isinstance(views, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                               and 2 <= k <= 8 for k in views):
                raise BitdialError(f"--guard {pat}: expected a list of bit widths in 2..8 (a module guards those up "
                                   f"to its own maximum), got {views!r}")
        for pat, b in self.overrides.items():
            if not 2 <= int(b) <= 8:
                raise BitdialError(f"--override {pat}={b}: bits must be in 2..8")


def match_pattern(pattern: str, name: str) -> bool:
    """``re:<regex>`` (full match) or a glob (``*.mlp.*``, ``layers.1?.self_attn.q_proj``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def resolve_map(mapping: Mapping[str, Any], names: list[str], default: Any) -> dict[str, Any]:
    """Apply a ``{module pattern: value}`` map: the first matching pattern wins, else ``default``
    (or the map's own ``"default"`` key)."""
    default = mapping.get("default", default)
    pats = [(p, v) for p, v in mapping.items() if p != "default"]
    out = {}
    for n in names:
        out[n] = next((v for p, v in pats if match_pattern(p, n)), default)
    return out


def unmatched_patterns(mapping: Mapping[str, Any], names: list[str]) -> list[str]:
    """The patterns of a ``{module pattern: value}`` map (``"default"`` aside) that match none of ``names``:
    almost always a typo, which would otherwise be ignored without a word."""
    return [p for p in mapping if p != "default" and not any(match_pattern(p, n) for n in names)]


MODULE_NAMES_HINT = "modules look like 'layers.0.self_attn.q_proj', 'layers.3.mlp.down_proj', 'embed_tokens'"
#: what an unmatched-pattern error adds after the module names
PATTERN_HINT = f"{MODULE_NAMES_HINT}; globs use * and ?, 're:' starts a regex"


def guard_map(guard: Mapping[str, Any] | None, importance: bool, group_size: int) -> dict[str, list[int]]:
    """The search's ``{module pattern: guarded views}`` map as recorded, always with a ``"default"``.

    It only applies to the uniform search with importance (``importance`` False: ``{"default": []}``).
    None is ``default_guard_map(group_size)``.
    """
    from bitdial.quant.uniform import default_guard_map

    if not importance:
        return {"default": []}
    g = default_guard_map(group_size) if guard is None else guard
    out = {str(p): sorted(int(k) for k in v) for p, v in g.items() if p != "default"}
    out["default"] = sorted(int(k) for k in g.get("default", ()))
    return out


def saliency_map(saliency: float | Mapping[str, float] | None, group_size: int) -> dict[str, float]:
    """The search's ``{module pattern: saliency}`` map, always with a ``"default"``.

    None is ``default_saliency_map(group_size)``. One number applies to every module. A map with a
    ``"default"`` replaces the default map; a map without one is layered over it: its patterns come first
    (the first matching pattern wins), the modules they do not match keep the group size's default.
    """
    from bitdial.quant.uniform import default_saliency_map

    base = default_saliency_map(group_size)
    if saliency is None:
        return base
    if not isinstance(saliency, Mapping):
        return {"default": float(saliency)}
    user = {str(p): float(v) for p, v in saliency.items()}
    if "default" in user:
        return {**{p: v for p, v in user.items() if p != "default"}, "default": user["default"]}
    return {**user, **{p: v for p, v in base.items() if p not in user}}


def quantized_modules(model: LoadedModel) -> list[str]:
    names = ["embed_tokens"] + model.config.linear_names()
    if "lm_head.weight" in model.tensors:
        names.append("lm_head")
    return names


def _shape(model: LoadedModel, tname: str) -> tuple[int, ...]:
    shapes = getattr(model.tensors, "shapes", None) or {}
    if tname in shapes:
        return tuple(shapes[tname])
    return tuple(model.tensors[tname].shape)


def _module_tensor_specs(mod: str, method: str, B: int, G: int, N: int, K: int) -> list[tuple[str, str, tuple]]:
    specs = [(f"{mod}.planes", "U8", (B, N, row_bytes(K)))]
    if method == "uniform":
        ng = math.ceil(K / G)
        specs += [(f"{mod}.scales", "F16", (N, ng)), (f"{mod}.offsets", "F16", (N, ng))]
    else:
        specs += [(f"{mod}.lut{k}", "F16", (N, 1 << k)) for k in range(2, B + 1)]
    return specs


def quantize_tensor(W: torch.Tensor, method: str, max_bits: int, group_size: int, clip: str,
                    importance: torch.Tensor | None, saliency: float = 0.0, guard: tuple[int, ...] = ()):
    if method == "uniform":
        from bitdial.quant.uniform import quantize_uniform

        guard = tuple(k for k in guard if k <= max_bits)  # views above this module's maximum do not exist
        return quantize_uniform(W, max_bits=max_bits, group_size=group_size, clip=clip, importance=importance,
                                saliency=saliency, guard=guard)
    from bitdial.quant.nonuniform import quantize_nonuniform

    return quantize_nonuniform(W, max_bits=max_bits, importance=importance)


def write_artifact(model: LoadedModel, out: str | Path, settings: QuantSettings,
                   importance: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
                   source_hash: bool = True) -> dict[str, Any]:
    """Quantize ``model`` into ``out`` (atomically). Returns a summary (sizes, bits per weight)."""
    settings.validate()
    mods = quantized_modules(model)
    user_saliency = settings.saliency if isinstance(settings.saliency, Mapping) else {}
    for flag, mapping in (("--override", settings.overrides), ("--saliency", user_saliency),
                          ("--guard", settings.guard or {})):
        bad = unmatched_patterns(mapping, mods)
        if bad:
            v = mapping[bad[0]]
            v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            raise BitdialError(f"{flag} {bad[0]}={v} matches no module of the model ({PATTERN_HINT})")
    # record the map the search used, never None
    settings = replace(settings, saliency=saliency_map(settings.saliency, settings.group_size),
                       guard=guard_map(settings.guard, importance is not None and settings.method == "uniform"
                                       and settings.clip == "search", settings.group_size))
    out = Path(out)
    if out.suffix != ".bitdial":
        raise BitdialError(f"output {out} should end in .bitdial")
    if not out.parent.exists():
        raise BitdialError(f"output directory {out.parent} does not exist")
    cfg = model.config
    max_bits = resolve_map(settings.overrides, mods, settings.max_bits)
    saliency = resolve_map(settings.saliency, mods, 0.0)
    guard = resolve_map(settings.guard, mods, [])

    # ---- plan every tensor and module ---------------------------------------------------------
    modules: dict[str, Any] = {}
    plan: list[tuple[str, str, tuple]] = []  # (tensor name, dtype, shape) in file order
    float_tensors: list[str] = []
    for mod in mods:
        wname = f"{mod}.weight"
        N, K = _shape(model, wname)
        # embeddings and the head are per-row grouped uniform (rows are looked up / scored independently)
        method = "uniform" if mod in ("embed_tokens", "lm_head") else settings.method
        specs = _module_tensor_specs(mod, method, int(max_bits[mod]), settings.group_size, N, K)
        plan += specs
        modules[mod] = {"method": method, "shape": [N, K], "max_bits": int(max_bits[mod]),
                        "group_size": settings.group_size if method == "uniform" else None,
                        "min_bits": 1 if method == "uniform" else 2,
                        "layout": "planes-v1", "tensors": [s[0] for s in specs]}
    if cfg.tie_embeddings or "lm_head.weight" not in model.tensors:
        modules["embed_tokens"]["tied_lm_head"] = True
    for name in model.tensors:
        if name.endswith(".weight") and name[:-7] in modules:
            continue
        float_tensors.append(name)
        plan.append((name, "F32", _shape(model, name)))

    entries: list[TensorEntry] = []
    pos = 0
    pad_i = 0
    for name, dt, shape in plan:
        if pos % ALIGN:
            p = ALIGN - pos % ALIGN
            entries.append(TensorEntry(f"__pad.{pad_i}", "U8", (p,), pos, pos + p))
            pad_i += 1
            pos += p
        n = math.prod(shape) * {"U8": 1, "F16": 2, "F32": 4}[dt]
        entries.append(TensorEntry(name, dt, tuple(shape), pos, pos + n))
        pos += n

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": model.source, "kind": model.kind,
                   "sha256": model.fingerprint() if source_hash else None},
        "config": cfg.to_dict(),
        "tokenizer": model.tokenizer.to_json(),
        "quant": asdict(settings),
        "modules": modules,
        "float_tensors": float_tensors,
        "checksums": {e.name: _ZERO_SUM for e in entries if not e.name.startswith("__pad.")},
        "plans": {},
        "policies": {},
    }
    reserve = len(encode_header(meta, entries)) - 8 + 4096  # room for later metadata (plans) in place
    reserve += (-(8 + reserve)) % ALIGN
    header = encode_header(meta, entries, pad_to=reserve)
    data_start = len(header)

    # ---- stream ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    checks: dict[str, str] = {}
    stats = {"weights": 0, "bytes_quantized": 0}
    with atomic_open(out) as f:
        f.write(header)
        by_name = {e.name: e for e in entries}
        written = 0

        def put(name: str, t: torch.Tensor) -> None:
            nonlocal written
            e = by_name[name]
            if e.start != written:  # alignment padding before this tensor
                f.write(b"\0" * (e.start - written))
                written = e.start
            want = (e.dtype, tuple(e.shape))
            got = (TORCH_TO_ST[str(t.dtype)], tuple(t.shape))
            if want != got:
                raise BitdialError(f"internal: tensor {name} is {got}, planned {want}")
            b = t.contiguous().numpy().tobytes()
            checks[name] = hashlib.sha256(b).hexdigest()
            f.write(b)
            written += len(b)

        with _progress(progress, len(mods) + 1) as bar:
            for mod in mods:
                bar.update(f"quantizing {mod}")
                m = modules[mod]
                W = model.tensors[f"{mod}.weight"]
                imp = importance.get(mod) if importance else None
                qt = quantize_tensor(W, m["method"], m["max_bits"], settings.group_size, settings.clip, imp,
                                     saliency[mod], tuple(guard[mod]))
                for name, t in qt.to_tensors(mod).items():
                    put(name, t)
                stats["weights"] += W.numel()
                stats["bytes_quantized"] += qt.nbytes
                del W, qt
                bar.advance()
            bar.update("writing float tensors")
            for name in float_tensors:
                put(name, model.tensors[name].to(torch.float32))
            bar.advance()
        if written != pos:
            raise BitdialError(f"internal: wrote {written} data bytes, planned {pos}")
        meta["checksums"] = checks
        f.seek(0)
        f.write(encode_header(meta, entries, pad_to=reserve))
    size = out.stat().st_size
    n_weights = stats["weights"]
    return {
        "path": str(out), "file_bytes": size, "seconds": time.perf_counter() - t0,
        "quantized_weights": n_weights,
        "bits_per_weight_file": size * 8 / max(n_weights, 1),
        "bits_per_weight_quantized": stats["bytes_quantized"] * 8 / max(n_weights, 1),
        "modules": len(mods), "data_start": data_start,
    }


class _progress:
    """A rich progress bar on stderr (or nothing)."""

    def __init__(self, on: bool, total: int) -> None:
        self.on, self.total = on, total

    def __enter__(self):
        if self.on:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.p.__enter__()
            self.task = self.p.add_task("quantizing", total=self.total)
        return self

    def update(self, desc: str) -> None:
        if self.on:
            self.p.update(self.task, description=desc)

    def advance(self) -> None:
        if self.on:
            self.p.advance(self.task)

    def __exit__(self, *exc):
        if self.on:
            self.p.__exit__(*exc)
        return False
