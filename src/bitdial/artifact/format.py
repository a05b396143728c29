"""The ``.bitdial`` artifact: one safetensors file that describes itself.

File layout (standard safetensors, readable by any safetensors reader)::

    [u64 little-endian: header length H][H bytes: JSON header, space-padded][tensor data ...]

The data starts at a 64-byte boundary and every tensor starts at a 64-byte boundary: gaps are filled by
``__pad.<i>`` uint8 tensors, so the buffer stays gap-free as safetensors requires. The JSON header's
``__metadata__`` holds one key, ``bitdial``, a JSON string with:

* ``format``: ``"bitdial"``; ``format_version``: :data:`FORMAT_VERSION`;
* ``source``: where the weights came from (path, kind, sha256 of the source files);
* ``config``: the :class:`~bitdial.loading.config.ModelConfig`; ``tokenizer``: tokenizer.json,
  special ids and chat template;
* ``quant``: the settings the model was quantized with (method, group size, max bits, clipping,
  calibration);
* ``modules``: per quantized module (``layers.0.self_attn.q_proj``, ``embed_tokens``, ``lm_head``) its
  method, shape, group size, max bits, layout (``planes-v1``: see docs/bitplanes.md) and the names
  of its tensors;
* ``float_tensors``: names of tensors kept in float (norms, biases);
* ``checksums``: sha256 per tensor (hex), checked by ``bitdial info --verify``;
* ``plans`` / ``policies``: named precision plans added later (may be absent).

Precision lives in this metadata, never in the file name.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdial.errors import ArtifactError

FORMAT = "bitdial"
FORMAT_VERSION = 1
ALIGN = 64
# safetensors dtype names -> (bytes per element, torch dtype name)
DTYPES = {"U8": (1, "uint8"), "I8": (1, "int8"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "F32": (4, "float32"), "I32": (4, "int32"), "I64": (8, "int64")}
TORCH_TO_ST = {"torch.uint8": "U8", "torch.int8": "I8", "torch.float16": "F16", "torch.bfloat16": "BF16",
               "torch.float32": "F32", "torch.int32": "I32", "torch.int64": "I64"}
MAX_HEADER = 256 << 20


@dataclass
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # offset in the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    meta: dict[str, Any]  # the decoded ``bitdial`` metadata
    tensors: dict[str, TensorEntry]  # without padding entries
    data_start: int  # absolute offset of the data buffer in the file
    header_len: int

    def module_tensors(self, module: str) -> list[str]:
        return self.meta["modules"][module]["tensors"]


def read_header(path: str | Path) -> Header:
    """Read and validate the header only (no tensor data is read).

    Checks: the file is long enough, the header length is sane, the JSON parses, the ``bitdial``
    metadata is present with a known format version, every tensor's dtype and shape agree with its byte
    range, the ranges tile the data buffer without gaps, and the buffer ends exactly at the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    size = path.stat().st_size
    fix = " Re-run `bitdial quantize` to rebuild it."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: file is {size} bytes, too short to be a .bitdial artifact (truncated?).{fix}")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise ArtifactError(
                f"{path}: header length {hlen} does not fit a file of {size} bytes: not a .bitdial artifact, "
                f"or truncated.{fix}")
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: header is not valid JSON ({e}): not a .bitdial artifact, or corrupt.{fix}") from e
    md = header.pop("__metadata__", None) or {}
    if "bitdial" not in md:
        raise ArtifactError(f"{path}: a safetensors file without bitdial metadata: not a .bitdial artifact "
                            "(quantize a model with `bitdial quantize`)")
    try:
        meta = json.loads(md["bitdial"])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: bitdial metadata is not valid JSON: corrupt header.{fix}") from e
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: metadata format {meta.get('format')!r} is not {FORMAT!r}")
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        newer = isinstance(v, int) and v > FORMAT_VERSION
        raise ArtifactError(
            f"{path}: artifact format version {v} is not supported (this bitdial reads version {FORMAT_VERSION})"
            + ("; upgrade bitdial" if newer else f".{fix}"))
    for key in ("config", "tokenizer", "modules", "checksums"):
        if key not in meta:
            raise ArtifactError(f"{path}: metadata key {key!r} is missing: corrupt header.{fix}")

    data_start = 8 + hlen
    entries = []
    for name, e in header.items():
        try:
            dt, shape, (a, b) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError) as ex:
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed header entry.{fix}") from ex
        if dt not in DTYPES:
            raise ArtifactError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
        n = 1
        for s in shape:
            n *= s
        if b - a != n * DTYPES[dt][0] or a < 0:
            raise ArtifactError(f"{path}: tensor {name!r}: {b - a} bytes do not match {dt} {list(shape)}: corrupt.{fix}")
        entries.append(TensorEntry(name, dt, shape, int(a), int(b)))
    entries.sort(key=lambda t: t.start)
    pos = 0
    for t in entries:
        if t.start != pos:
            raise ArtifactError(f"{path}: tensor {t.name!r} starts at {t.start}, expected {pos}: corrupt header.{fix}")
        pos = t.end
    if data_start + pos != size:
        what = "truncated" if data_start + pos > size else "has trailing bytes"
        raise ArtifactError(
            f"{path}: the file is {size} bytes but its header describes {data_start + pos}: the artifact {what}.{fix}")
    tensors = {t.name: t for t in entries if not t.name.startswith("__pad.")}
    for mod, m in meta["modules"].items():
        for tn in m.get("tensors", []):
            if tn not in tensors:
                raise ArtifactError(f"{path}: module {mod!r} names tensor {tn!r}, which the file lacks: corrupt.{fix}")
    for tn in meta.get("float_tensors", []):
        if tn not in tensors:
            raise ArtifactError(f"{path}: float tensor {tn!r} is missing: corrupt.{fix}")
    return Header(meta=meta, tensors=tensors, data_start=data_start, header_len=hlen)


def encode_header(meta: dict[str, Any], entries: list[TensorEntry], pad_to: int | None = None) -> bytes:
    """Serialize a header (8-byte length + JSON), space-padded so the data starts 64-byte aligned.

    With ``pad_to`` the JSON is padded to exactly that length (used to rewrite the header in place once
    the checksums are known; the caller reserves the length up front).
    """
    h: dict[str, Any] = {"__metadata__": {"bitdial": json.dumps(meta, separators=(",", ":"))}}
    for t in entries:
        h[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    js = json.dumps(h, separators=(",", ":")).encode("utf-8")
    if pad_to is not None:
        if len(js) > pad_to:
            raise ArtifactError("internal: final header is longer than the space reserved for it")
        n = pad_to
    else:
        n = len(js)
        n += (-(8 + n)) % ALIGN
    return struct.pack("<Q", n) + js + b" " * (n - len(js))
