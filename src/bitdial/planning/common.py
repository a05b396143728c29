"""Shared pieces of profiling and planning: errors, atomic JSON files, artifact identity, module sets.

A *plannable* module is one whose bit-width a plan chooses: every linear of every decoder layer
(``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``), plus the embeddings /
output head when asked (``include_embeddings``). The default model ties its embeddings to its output head
(one tensor, ``embed_tokens``, that also serves as ``lm_head``): by default it is *fixed* at its stored
maximum and counted in sizes and latencies, but not planned.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from bitdial.errors import BitdialError
from bitdial.fileio import atomic_open

__all__ = ["ProfileError", "PlanError", "atomic_write_json", "artifact_identity", "module_type", "module_layer",
           "plannable_modules", "fixed_modules", "module_bit_range", "parse_size", "parse_bits_list", "utc_now",
           "head_source", "spearman"]


class ProfileError(BitdialError, ValueError):
    """A sensitivity or device profile file is corrupt, foreign, of another version, or does not match
    the artifact it is used with."""


class PlanError(BitdialError, ValueError):
    """A plan that cannot be made, found or applied (bad pins, unknown plan name, ...)."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file next to it, fsynced, renamed over it."""
    path = Path(path)
    if not path.parent.exists():
        raise BitdialError(f"output directory {path.parent} does not exist")
    text = json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n"
    with atomic_open(path) as f:
        f.write(text.encode("utf-8"))
    return path


def check_schema_version(v: Any, supported: int, what: str, where: str, fix: str) -> None:
    """Raise ProfileError unless ``v == supported``; a newer version says to upgrade bitdial."""
    if v != supported:
        newer = isinstance(v, int) and v > supported
        raise ProfileError(f"{where}: {what} schema version {v!r} is not supported (this bitdial reads "
                           f"{supported})" + ("; upgrade bitdial." if newer else f".{fix}"))


def artifact_identity(art) -> dict[str, Any]:
    """What a profile records about the artifact it was measured on.

    ``header_sha256`` is the sha256 of the canonical JSON of the header *without* the ``plans``,
    ``policies`` and ``created`` keys, together with the tensor table (without policy tensors): it identifies
    the weights and their quantization, and stays valid when plans or dynamic policies are added.
    """
    meta = {k: v for k, v in art.meta.items() if k not in ("plans", "policies", "created")}
    # dynamic policies add estimator tensors (``policy.*``): not part of the weights' identity
    meta["checksums"] = {n: v for n, v in meta.get("checksums", {}).items() if not n.startswith("policy.")}
    tensors = {n: [e.dtype, list(e.shape), e.start, e.end] for n, e in sorted(art.header.tensors.items())
               if not n.startswith("policy.")}
    blob = json.dumps({"meta": meta, "tensors": tensors}, sort_keys=True, separators=(",", ":")).encode()
    return {"path": str(Path(art.path).resolve()), "header_sha256": hashlib.sha256(blob).hexdigest(),
            "file_bytes": art.file_bytes}


def head_source(art) -> str:
    """The module that stores the output head: ``lm_head``, or ``embed_tokens`` when they are tied."""
    return "lm_head" if "lm_head" in art.modules else "embed_tokens"


def plannable_modules(art, include_embeddings: bool = False) -> list[str]:
    """Modules a plan chooses widths for, in execution order (decoder linears, then embeddings/head)."""
    names = [n for n in art.config.linear_names() if n in art.modules]
    if include_embeddings:
        names += [n for n in ("embed_tokens", "lm_head") if n in art.modules]
    return names


def fixed_modules(art, include_embeddings: bool = False) -> list[str]:
    """Quantized modules a plan leaves at their stored maximum (unless pinned): the embeddings/head."""
    planned = set(plannable_modules(art, include_embeddings))
    return [n for n in art.modules if n not in planned]


def module_bit_range(art, name: str, min_bits: int = 2) -> list[int]:
    """Widths a module can run at: ``max(min_bits, its min_bits) .. its max_bits``."""
    m = art.modules[name]
    lo = max(int(min_bits), int(m["min_bits"]))
    return list(range(lo, int(m["max_bits"]) + 1))


_TYPE_RE = re.compile(r"^layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def module_type(name: str) -> str:
    """``layers.3.mlp.down_proj`` -> ``down_proj``; ``embed_tokens`` -> ``embed_tokens``."""
    m = _TYPE_RE.match(name)
    return m.group(2) if m else name


def module_layer(name: str) -> int | None:
    """``layers.3.mlp.down_proj`` -> 3; modules outside the decoder layers -> None."""
    m = _TYPE_RE.match(name)
    return int(m.group(1)) if m else None


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "ki": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "mi": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "gi": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"60MB"`` -> 60_000_000, ``"60MiB"`` -> 62_914_560, ``"1.5GB"``, plain byte counts."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise BitdialError(f"cannot read the size {text!r}: write e.g. 60MB, 57.2MiB or 60000000")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bits_list(text: str) -> list[int]:
    """``"2,3,4"`` or ``"2-4"`` or ``"all"`` (-> []) into sorted unique ints."""
    text = text.strip()
    if text in ("", "all"):
        return []
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return sorted(out)


def _ranks(x: list[float]) -> list[float]:
    """Ranks 1..n with ties given their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks); NaN if undefined."""
    if len(a) != len(b):
        raise ValueError("spearman: sequences of different lengths")
    n = len(a)
    if n < 2:
        return math.nan
    ra, rb = _ranks(list(a)), _ranks(list(b))
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)
