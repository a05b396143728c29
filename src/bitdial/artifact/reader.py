"""Open a ``.bitdial`` artifact: validate the header, map the data, hand out zero-copy tensors.

Opening reads only the header. Tensors are views of a private (copy-on-write) memory map, so pages
are read from disk when first touched: a k-bit reader touches only the first k planes of each module.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from bitdial.artifact.format import DTYPES, Header, encode_header, read_header
from bitdial.errors import ArtifactError
from bitdial.fileio import atomic_open
from bitdial.loading.config import ModelConfig
from bitdial.loading.source import LazyTensors, LoadedModel
from bitdial.loading.tokenizer import Tokenizer
from bitdial.quant.qtensor import QuantizedTensor

_TORCH = {k: getattr(torch, v[1]) for k, v in DTYPES.items()}


class Artifact:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header: Header = read_header(self.path)
        self.meta = self.header.meta
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self.config = ModelConfig.from_dict(self.meta["config"])
        except Exception as e:
            raise ArtifactError(f"{self.path}: model config in the header is invalid ({e})") from e

    @cached_property
    def tokenizer(self) -> Tokenizer:
        try:
            return Tokenizer.from_json(self.meta["tokenizer"])
        except Exception as e:
            raise ArtifactError(f"{self.path}: tokenizer in the header is invalid ({e})") from e

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.meta["modules"]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of one stored tensor."""
        try:
            e = self.header.tensors[name]
        except KeyError:
            raise ArtifactError(f"{self.path}: no tensor named {name!r}") from None
        n = e.nbytes // DTYPES[e.dtype][0]
        if n == 0:
            return torch.empty(e.shape, dtype=_TORCH[e.dtype])
        t = torch.frombuffer(self._mm, dtype=_TORCH[e.dtype], count=n, offset=self.header.data_start + e.start)
        return t.view(e.shape)

    def qtensor(self, module: str) -> QuantizedTensor:
        m = self.modules[module]
        tensors = {n: self.tensor(n) for n in m["tensors"]}
        return QuantizedTensor.from_tensors(module, tensors, m)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in self.meta.get("float_tensors", [])}

    def verify(self, progress: bool = False) -> list[str]:
        """Recompute every tensor's sha256; return the names whose checksum does not match."""
        bad = []
        names = list(self.meta["checksums"])
        it = names
        if progress:
            from rich.progress import track

            it = track(names, description="verifying", transient=True)
        for n in it:
            e = self.header.tensors.get(n)
            if e is None:
                bad.append(n)
                continue
            a = self.header.data_start + e.start
            h = hashlib.sha256(memoryview(self._mm)[a:a + e.nbytes]).hexdigest()
            if h != self.meta["checksums"][n]:
                bad.append(n)
        return bad

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # tensors still reference the map; it is freed with them
            pass


def open_artifact(path: str | Path) -> Artifact:
    return Artifact(path)


def update_metadata(path: str | Path, key: str, value: Any) -> None:
    """Atomically rewrite the header's ``key`` (e.g. ``plans``) in place of the reserved space, or by
    rewriting the file through a temporary copy when the header outgrows it."""
    path = Path(path)
    h = read_header(path)
    meta = dict(h.meta)
    meta[key] = value
    from bitdial.artifact.format import TensorEntry

    entries = [TensorEntry(n, e.dtype, e.shape, e.start, e.end) for n, e in _all_entries(path).items()]
    try:
        new = encode_header(meta, entries, pad_to=h.header_len)
    except ArtifactError:
        new = None
    if new is None:  # outgrew the reserved space: a longer header, same data
        new = encode_header(meta, entries)
    with atomic_open(path) as out, open(path, "rb") as src:
        out.write(new)
        src.seek(h.data_start)
        while chunk := src.read(1 << 24):
            out.write(chunk)


def rewrite_tensors(path: str | Path, *, add: dict[str, torch.Tensor] | None = None,
                    drop: set[str] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Atomically rewrite an artifact with tensors dropped and added (e.g. a policy's estimator matrices)
    and metadata keys replaced. Quantized modules and float tensors cannot be dropped; added tensors
    get checksums like every other. The data of kept tensors is copied unchanged."""
    from bitdial.artifact.format import ALIGN, TORCH_TO_ST, TensorEntry

    path = Path(path)
    h = read_header(path)
    add, drop = dict(add or {}), set(drop or ())
    new_meta = dict(h.meta)
    new_meta.update(meta or {})
    protected = set(h.meta.get("float_tensors", [])) | {t for m in h.meta["modules"].values() for t in m["tensors"]}
    if drop & protected or set(add) & protected:
        raise ArtifactError(f"{path}: model tensors cannot be dropped or replaced: {sorted((drop | set(add)) & protected)[:3]}")
    keep = [e for n, e in sorted(h.tensors.items(), key=lambda kv: kv[1].start) if n not in drop and n not in add]
    entries, copies, pos, pad_i = [], [], 0, 0

    def place(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        nonlocal pos, pad_i
        if pos % ALIGN:
            p = ALIGN - pos % ALIGN
            entries.append(TensorEntry(f"__pad.{pad_i}", "U8", (p,), pos, pos + p))
            pad_i, pos = pad_i + 1, pos + p
        entries.append(TensorEntry(name, dtype, shape, pos, pos + nbytes))
        pos += nbytes

    for e in keep:
        place(e.name, e.dtype, e.shape, e.nbytes)
        copies.append(("old", e))
    blobs: dict[str, bytes] = {}
    for name, t in add.items():
        st = TORCH_TO_ST.get(str(t.dtype))
        if st is None:
            raise ArtifactError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        b = t.detach().contiguous().cpu().numpy().tobytes()
        blobs[name] = b
        place(name, st, tuple(t.shape), len(b))
        copies.append(("new", name))
    sums = {n: v for n, v in h.meta["checksums"].items() if n not in drop and n not in add}
    sums.update({n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()})
    new_meta["checksums"] = sums
    header = encode_header(new_meta, entries)
    reserve = len(header) - 8 + 4096  # room for later metadata changes in place
    reserve += (-(8 + reserve)) % ALIGN
    header = encode_header(new_meta, entries, pad_to=reserve)
    by_name = {e.name: e for e in entries}
    with atomic_open(path) as out, open(path, "rb") as src:
        out.write(header)
        written = 0
        for kind, item in copies:
            name = item.name if kind == "old" else item
            e = by_name[name]
            out.write(b"\0" * (e.start - written))
            if kind == "old":
                src.seek(h.data_start + item.start)
                left = item.nbytes
                while left:
                    chunk = src.read(min(left, 1 << 24))
                    if not chunk:
                        raise ArtifactError(f"{path}: truncated while copying {name}")
                    out.write(chunk)
                    left -= len(chunk)
            else:
                out.write(blobs[name])
            written = e.end


def _all_entries(path: Path):
    import struct

    from bitdial.artifact.format import TensorEntry

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: TensorEntry(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in h.items()}


def load_artifact_source(path: str | Path) -> LoadedModel:
    """An artifact as a plain model source: fp32 tensors dequantized at each module's maximum bits."""
    art = open_artifact(path)
    names = list(art.meta.get("float_tensors", []))
    qnames = {f"{m}.weight": m for m in art.modules}
    names = list(qnames) + names

    def get(name: str) -> torch.Tensor:
        if name in qnames:
            return art.qtensor(qnames[name]).dequantize()
        return art.tensor(name).clone()

    shapes = {n: tuple(art.modules[qnames[n]]["shape"]) if n in qnames else art.header.tensors[n].shape for n in names}
    return LoadedModel(config=art.config, tensors=LazyTensors(names, get, shapes), tokenizer=art.tokenizer,
                       source=str(art.path), files=[art.path], kind="bitdial")
