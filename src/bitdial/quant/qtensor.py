"""``QuantizedTensor``: one weight matrix, every precision 2..B, in the ``planes-v1`` layout.

A QuantizedTensor holds the B-bit codes of an [N, K] matrix as B bit planes (see ``bitplanes.py``) plus
the per-group or per-row metadata that turns a k-bit view of the codes back into weights:

* ``method="uniform"``: per (row, group of G columns) an fp16 offset ``m`` and scale ``s``; the k-bit
  code ``c`` dequantizes to ``m + s * (c * 2**(B-k) + (2**(B-k) - 1) / 2)``, the middle of the
  interval of B-bit codes it covers (``m + s * q`` at k = B).
* ``method="nonuniform"``: per row and per bit width k (``min_bits..B``) an fp16 look-up table of
  ``2**k`` values; the k-bit code ``c`` dequantizes to ``luts[k][row, c]``.

At k bits a reader touches ``planes[:k]`` (a contiguous prefix) plus the scales/offsets or the one LUT
of width k; ``bits_per_weight(k)`` counts exactly those bytes. The tensors are plain torch tensors so an
artifact writer can put them in safetensors (``to_tensors``/``meta``) and read them back
(``from_tensors``); nothing is pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bitdial.errors import ArtifactError
from bitdial.quant.bitplanes import row_bytes, unpack_planes

__all__ = ["QuantizedTensor", "LAYOUT", "dequantize_uniform_codes", "expand_groups"]

LAYOUT = "planes-v1"
METHODS = ("uniform", "nonuniform")


def expand_groups(per_group: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    """Repeat a per-group tensor [N, n_groups] along columns to [N, K] (the last group may be partial)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :K]


def dequantize_uniform_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, k: int,
                             max_bits: int, group_size: int) -> torch.Tensor:
    """Dequantize k-bit views ``codes`` [N, K] of B-bit nested uniform codes to fp32 [N, K].

    ``w = m + s * (c * 2**(B-k) + (2**(B-k) - 1) / 2)`` with the fp16 ``scales``/``offsets`` [N, n_groups]
    widened to fp32, so the values used are exactly the values stored.
    """
    K = codes.shape[1]
    per = float(1 << (max_bits - k))
    level = codes.to(torch.float32).mul_(per).add_((per - 1.0) / 2.0)  # [N, K], in B-bit code units
    s = expand_groups(scales.to(torch.float32), group_size, K)  # [N, K]
    m = expand_groups(offsets.to(torch.float32), group_size, K)  # [N, K]
    return level.mul_(s).add_(m)


@dataclass
class QuantizedTensor:
    """A weight matrix [N, K] quantized once at ``max_bits`` and readable at every k <= max_bits.

    Attributes:
        method: ``"uniform"`` or ``"nonuniform"``.
        shape: (N, K) of the original matrix.
        max_bits: B, the bits of the stored codes (2..8).
        group_size: G, columns per (row, group) scale/offset (uniform); None for nonuniform (per row).
        planes: uint8 [B, N, ceil(K/8)], plane 0 = most significant bit (see ``bitplanes.py``).
        scales: fp16 [N, n_groups] (uniform only).
        offsets: fp16 [N, n_groups] (uniform only).
        luts: {k: fp16 [N, 2**k]} for k = min_bits..B (nonuniform only).
    """

    method: str
    shape: tuple[int, int]
    max_bits: int
    group_size: int | None
    planes: torch.Tensor
    scales: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    luts: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        N, K = self.shape
        if tuple(self.planes.shape) != (self.max_bits, N, row_bytes(K)) or self.planes.dtype != torch.uint8:
            raise ValueError(f"planes must be uint8 {(self.max_bits, N, row_bytes(K))}, got "
                             f"{self.planes.dtype} {tuple(self.planes.shape)}")
        if self.method == "uniform":
            if self.group_size is None or self.group_size <= 0:
                raise ValueError("uniform QuantizedTensor needs a positive group_size")
            want = (N, self.n_groups)
            for name in ("scales", "offsets"):
                t = getattr(self, name)
                if t is None or tuple(t.shape) != want or t.dtype != torch.float16:
                    got = None if t is None else (t.dtype, tuple(t.shape))
                    raise ValueError(f"uniform {name} must be fp16 {want}, got {got}")
        else:
            for k in range(self.min_bits, self.max_bits + 1):
                t = self.luts.get(k)
                if t is None or tuple(t.shape) != (N, 1 << k) or t.dtype != torch.float16:
                    got = None if t is None else (t.dtype, tuple(t.shape))
                    raise ValueError(f"nonuniform luts[{k}] must be fp16 {(N, 1 << k)}, got {got}")

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def min_bits(self) -> int:
        """Smallest readable view: 1 for uniform (any prefix of planes), 2 for nonuniform (lowest LUT)."""
        return 1 if self.method == "uniform" else 2

    @property
    def n_groups(self) -> int:
        """Scale/offset groups per row (uniform); 1 for nonuniform."""
        if self.method != "uniform":
            return 1
        return math.ceil(self.shape[1] / self.group_size)

    def _check_k(self, k: int) -> None:
        if not self.min_bits <= k <= self.max_bits:
            raise ValueError(f"k must be in {self.min_bits}..{self.max_bits} for this {self.method} tensor, got {k}")

    def bytes_read(self, k: int) -> int:
        """Bytes a k-bit reader touches: k planes plus the scales/offsets (uniform) or LUT k (nonuniform)."""
        self._check_k(k)
        N, K = self.shape
        plane_bytes = k * N * row_bytes(K)
        if self.method == "uniform":
            return plane_bytes + self.scales.numel() * 2 + self.offsets.numel() * 2
        return plane_bytes + self.luts[k].numel() * 2

    def bits_per_weight(self, k: int) -> float:
        """Bits actually read per weight at k bits, scales/offsets or LUT included."""
        N, K = self.shape
        return self.bytes_read(k) * 8 / (N * K)

    @property
    def nbytes(self) -> int:
        """Total stored bytes: all planes plus all scales/offsets or all LUTs."""
        n = self.planes.numel()
        if self.method == "uniform":
            return n + 2 * (self.scales.numel() + self.offsets.numel())
        return n + sum(2 * t.numel() for t in self.luts.values())

    # ---- reading --------------------------------------------------------------------------------
    def codes(self, k: int) -> torch.Tensor:
        """The k-bit view of the codes, uint8 [N, K] (top k bits of the B-bit codes)."""
        self._check_k(k)
        return unpack_planes(self.planes, k, self.shape[1])

    def dequantize(self, k: int | None = None) -> torch.Tensor:
        """The k-bit view of the weights, fp32 [N, K] (torch reference path; default k = max_bits)."""
        k = self.max_bits if k is None else k
        c = self.codes(k)  # [N, K]
        if self.method == "uniform":
            return dequantize_uniform_codes(c, self.scales, self.offsets, k, self.max_bits, self.group_size)
        return torch.gather(self.luts[k].to(torch.float32), 1, c.to(torch.int64))  # [N, K]

    # ---- (de)serialization ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """JSON-able description needed, with ``to_tensors``, to rebuild this tensor."""
        return {
            "method": self.method,
            "shape": list(self.shape),
            "group_size": self.group_size,
            "max_bits": self.max_bits,
            "min_bits": self.min_bits,
            "layout": LAYOUT,
        }

    @staticmethod
    def _key(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named contiguous tensors: ``{prefix}.planes`` [B, N, RB] uint8, then ``{prefix}.scales`` and
        ``{prefix}.offsets`` fp16 [N, n_groups] (uniform) or ``{prefix}.lut{k}`` fp16 [N, 2**k]
        (nonuniform), one per k so a k-bit reader maps only its own LUT."""
        out = {self._key(prefix, "planes"): self.planes.contiguous()}
        if self.method == "uniform":
            out[self._key(prefix, "scales")] = self.scales.contiguous()
            out[self._key(prefix, "offsets")] = self.offsets.contiguous()
        else:
            for k in sorted(self.luts):
                out[self._key(prefix, f"lut{k}")] = self.luts[k].contiguous()
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedTensor:
        """Rebuild from ``to_tensors(prefix)`` output and ``meta()``; raises ArtifactError if inconsistent.

        ``planes`` must hold all ``max_bits`` planes; a reader that wants fewer slices ``planes[:k]``.
        """
        if meta.get("layout") != LAYOUT:
            raise ArtifactError(f"{prefix}: layout {meta.get('layout')!r} is not {LAYOUT!r}; this bitdial "
                                "cannot read it: upgrade bitdial or re-quantize the model")
        try:
            method = meta["method"]
            shape = tuple(int(x) for x in meta["shape"])
            max_bits = int(meta["max_bits"])
            group_size = meta["group_size"]
            group_size = None if group_size is None else int(group_size)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{prefix}: quantized-tensor metadata is incomplete or malformed ({e!r}): "
                                "the artifact is corrupt; re-quantize the model") from e

        def get(name: str) -> torch.Tensor:
            key = cls._key(prefix, name)
            if key not in tensors:
                raise ArtifactError(f"{prefix}: tensor {key!r} is missing: the artifact is truncated or "
                                    "corrupt; re-quantize the model")
            return tensors[key]

        kwargs: dict[str, Any] = {"planes": get("planes")}
        if method == "uniform":
            kwargs["scales"], kwargs["offsets"] = get("scales"), get("offsets")
        elif method == "nonuniform":
            kwargs["luts"] = {k: get(f"lut{k}") for k in range(2, max_bits + 1)}
        try:
            return cls(method=method, shape=shape, max_bits=max_bits, group_size=group_size,
                       **kwargs)
        except ValueError as e:
            raise ArtifactError(f"{prefix}: stored tensors do not match their metadata ({e}): the artifact "
                                "is corrupt; re-quantize the model") from e
