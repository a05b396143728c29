"""Bitplane packing: every precision of a weight matrix in one array (layout ``planes-v1``).

A matrix of B-bit codes ``codes`` [N, K] (uint8, values < 2**B) is stored as B bit planes, plane-major:

* ``planes[p]`` holds bit ``B-1-p`` of every code, so plane 0 is the most significant bit;
* each plane is [N, RB] bytes with ``RB = ceil(K / 8)``; byte ``j`` of a row holds columns ``8j..8j+7``,
  column ``8j+i`` in bit ``i`` (LSB first); padding bits of the last byte are 0.

The k-bit view of a code is its top k bits, ``codes >> (B - k)``, and is rebuilt from ``planes[:k]``
alone, a contiguous prefix of the array: reading k planes reads k/B of the plane bytes. See
``docs/bitplanes.md`` for a worked example.

This is the pure numpy/torch reference; native kernels are tested against it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_planes", "unpack_planes", "row_bytes"]


def row_bytes(K: int) -> int:
    """Bytes per plane row for K columns: ``ceil(K / 8)``."""
    return (K + 7) // 8


def _as_numpy_u8(t: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.uint8:
            raise TypeError(f"{what} must be uint8, got {t.dtype}")
        return t.detach().cpu().contiguous().numpy()
    a = np.asarray(t)
    if a.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8, got {a.dtype}")
    return np.ascontiguousarray(a)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack B-bit codes into B plane-major bit planes.

    Args:
        codes: uint8 [N, K], every value < 2**bits.
        bits: B, 1..8.

    Returns:
        uint8 [B, N, ceil(K/8)]: ``planes[p]`` is bit ``B-1-p`` of each code (plane 0 = MSB), columns
        packed LSB-first within each byte, padding bits 0.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    c = _as_numpy_u8(codes, "codes")
    if c.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(c.shape)}")
    if bits < 8 and c.size and int(c.max()) >= (1 << bits):
        raise ValueError(f"codes must be < 2**{bits}; found {int(c.max())}")
    N, K = c.shape
    out = np.empty((bits, N, row_bytes(K)), dtype=np.uint8)  # [B, N, RB]
    bit = np.empty_like(c)  # [N, K] scratch
    for p in range(bits):  # loop over planes only; each step is vectorized over the whole matrix
        np.right_shift(c, bits - 1 - p, out=bit)
        np.bitwise_and(bit, 1, out=bit)
        out[p] = np.packbits(bit, axis=1, bitorder="little")  # zero-pads the last byte
    return torch.from_numpy(out)


def unpack_planes(planes: torch.Tensor, k: int, K: int) -> torch.Tensor:
    """Rebuild the top-k view of the codes from the first k planes.

    Args:
        planes: uint8 [B, N, RB] from :func:`pack_planes` (only ``planes[:k]`` is read; a tensor holding
            just those k planes works too).
        k: number of planes to read, 1..B.
        K: number of columns (RB must equal ceil(K/8)).

    Returns:
        uint8 [N, K]: ``codes >> (B - k)``.
    """
    if planes.ndim != 3:
        raise ValueError(f"planes must be 3-D [B, N, RB], got shape {tuple(planes.shape)}")
    if not 1 <= k <= planes.shape[0]:
        raise ValueError(f"k must be in 1..{planes.shape[0]} (planes available), got {k}")
    if planes.shape[2] != row_bytes(K):
        raise ValueError(f"planes have {planes.shape[2]} bytes per row but K={K} needs {row_bytes(K)}")
    pl = _as_numpy_u8(planes[:k], "planes")  # [k, N, RB]
    N = pl.shape[1]
    out = np.zeros((N, K), dtype=np.uint8)  # [N, K]
    for p in range(k):
        bit = np.unpackbits(pl[p], axis=1, count=K, bitorder="little")  # [N, K] of 0/1
        if k - 1 - p:
            np.left_shift(bit, k - 1 - p, out=bit)
        np.bitwise_or(out, bit, out=out)
    return torch.from_numpy(out)
