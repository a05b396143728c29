"""Native GEMV kernels for uniform any-precision weights (decode and small batches).

``gemv(qt, x, k)`` computes ``x @ qt.dequantize(k).T`` for a uniform :class:`QuantizedTensor` straight
from its bit planes: it reads only ``planes[:k]`` plus the fp16 scales and offsets, never a dequantized
weight. ``x`` is quantized to int8 per block of 64 columns (32 when the group size is 32), the k-bit
codes are rebuilt from the planes in SIMD registers and multiplied with integer dot products; the
offsets use the exact float sums of ``x``. See ``docs/kernels.md`` for the design and measured figures.

The C library (``bitdial.kernels._native``, built by ``setup.py``) holds one kernel per instruction set
(``avx512``, ``avx2``, ``neon``, ``ref`` = portable C), picked at run time for the CPU, and a small
thread pool. A family can have several variants, best first: ``avx512-gfni`` (codes rebuilt by a GFNI
bit-matrix transpose; needs VBMI + GFNI) then ``avx512-mask`` (mask registers; F/BW/VL/VNNI),
``neon-dot`` then ``neon``. ``isa`` arguments accept a family (its best variant) or a variant. Environment:

* ``BITDIAL_ISA=avx512|avx2|neon|ref``: force an instruction set (an error if this CPU or build lacks it).
* ``BITDIAL_KERNELS=0``: set :data:`enabled` to False (``AnyPrecisionLinear`` then uses the torch path).
* ``BITDIAL_THREADS=n``: kernel threads (default: ``torch.get_num_threads()`` at import).
* ``BITDIAL_SPIN_US=us``: how long idle kernel threads spin before sleeping (default 200).

Without the extension (no C compiler at install time) ``available()`` is False and ``gemv`` falls back to
the torch reference, with a warning logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from bitdial.quant.qtensor import QuantizedTensor

__all__ = ["available", "enabled", "generation", "isa", "isas", "variant", "variants", "set_isa", "set_threads", "threads",
           "supports", "gemv", "dequant", "fast_bf16", "read_bandwidth", "MAX_ROWS"]

log = logging.getLogger(__name__)

#: Module-level switch read by ``AnyPrecisionLinear``: False sends every call to the torch reference path.
enabled: bool = os.environ.get("BITDIAL_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")

#: Largest number of rows (tokens) ``AnyPrecisionLinear`` sends to the kernel; bigger inputs (prefill)
#: use dequantize + matmul.
MAX_ROWS = 16

try:
    from bitdial.kernels import _native
except ImportError as e:  # built without a C compiler (setup.py marks the extension optional)
    _native = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

_ISA_IDS: dict[str, int] = {}
_warned = False
_generation = 0  # bumped when the default ISA changes (fused decoders rebuild on it)


def generation() -> int:
    """A counter that changes whenever the default kernel variant changes."""
    return _generation


def _isa_id(name: str) -> int:
    i = _ISA_IDS.get(name)
    if i is None:
        try:
            i = _native.isa_id(name)
        except ValueError as e:
            raise ValueError(f"{e}; available here: {isas()}") from None
        _ISA_IDS[name] = i
    return i


def available() -> bool:
    """True when the native library is built and loadable."""
    return _native is not None


def isa() -> str | None:
    """Instruction-set family used by default (``"avx512"``, ``"avx2"``, ``"neon"`` or ``"ref"``), None
    without the native library."""
    return _native.default_isa()[1] if _native is not None else None


def variant() -> str | None:
    """Kernel variant used by default (e.g. ``"avx512-gfni"``), None without the native library."""
    return _native.default_isa()[2] if _native is not None else None


def isas() -> list[str]:
    """Instruction-set families this build can run on this CPU, best first."""
    out: list[str] = []
    for name, _, ok in (_native.isas() if _native is not None else ()):
        if ok and name not in out:
            out.append(name)
    return out


def variants() -> list[str]:
    """Every kernel variant this build can run on this CPU, best first (each family's first is its default)."""
    return [v for _, v, ok in (_native.isas() if _native is not None else ()) if ok]


def set_isa(name: str) -> None:
    """Use ``name`` (a family or a variant) by default (ValueError if this CPU or build lacks it)."""
    if _native is None:
        raise RuntimeError(f"bitdial native kernels are not built ({_IMPORT_ERROR})")
    global _generation
    _isa_id(name)
    _native.set_default_isa(name)
    _generation += 1


def set_threads(n: int) -> int:
    """Threads per kernel call, the calling thread included; returns the number running."""
    if _native is None:
        return 1
    return _native.set_threads(max(1, int(n)))


def threads() -> int:
    """Threads per kernel call (the calling thread included)."""
    return _native.threads() if _native is not None else 1


def supports(qt: QuantizedTensor) -> bool:
    """True if ``gemv`` runs ``qt`` natively: uniform method, group size a power of two >= 32,
    contiguous planes/scales/offsets, CPU tensors."""
    c = qt.__dict__.get("_bd_native")
    if c is not None and c[0] is qt.planes and c[1] is qt.scales and c[2] is qt.offsets:
        return c[3] is not None
    if _native is None or qt.method != "uniform":
        return False
    G = qt.group_size
    return (G is not None and G >= 32 and G & (G - 1) == 0 and _planes_ok(qt.planes)
            and qt.scales.is_contiguous() and qt.offsets.is_contiguous() and qt.planes.device.type == "cpu")


def _planes_ok(planes: torch.Tensor) -> bool:
    """Planes [B, N, RB] with contiguous plane rows; the planes themselves may be spaced further apart than
    N * RB bytes (a padded plane stride, see :func:`pad_planes`)."""
    if planes.dtype != torch.uint8 or planes.ndim != 3:
        return False
    B, N, RB = planes.shape
    s = planes.stride()
    return (RB <= 1 or s[2] == 1) and (N <= 1 or s[1] == RB) and (B <= 1 or s[0] >= N * RB)


def plane_stride(qt: QuantizedTensor) -> int:
    """Bytes between the starts of consecutive planes of qt (N * RB when the planes are contiguous)."""
    B, N, RB = qt.planes.shape
    return int(qt.planes.stride(0)) if B > 1 else N * RB


def pad_planes(qt: QuantizedTensor, *, force: bool = False) -> QuantizedTensor:
    """qt with its planes copied to a buffer whose plane stride is not a multiple of 4 KiB, when it is.

    A decode pass reads the k plane rows of a weight row together: with a plane stride that is a multiple of
    4 KiB (every Llama shape: N * ceil(K / 8) bytes) their cache lines share one L1 set, all 8 ways at
    k = 8 (docs/kernels.md, "Plane-stride aliasing"). The copy spaces the planes by N * RB rounded up to
    4 KiB plus 2112 bytes (half a page and a line), so the k streams fall into different sets. It costs
    one copy of the planes in RAM (an mmapped artifact is then no longer read for them). Returns qt itself
    when its stride is already off the 4 KiB grid (unless ``force``), or for a single plane.
    """
    B, N, RB = qt.planes.shape
    ps = N * RB
    if B < 2 or (ps % 4096 and not force):
        return qt
    stride = -(-ps // 4096) * 4096 + 2112
    buf = torch.empty((B - 1) * stride + ps, dtype=torch.uint8)
    planes = buf.as_strided((B, N, RB), (stride, RB, 1))
    planes.copy_(qt.planes)
    return dataclasses.replace(qt, planes=planes)


def _reference(qt: QuantizedTensor, x: torch.Tensor, k: int, out: torch.Tensor | None) -> torch.Tensor:
    y = x @ qt.dequantize(k).T
    if out is not None:
        out.copy_(y)
        return out
    return y


def gemv(qt: QuantizedTensor, x: torch.Tensor, k: int, out: torch.Tensor | None = None, *,
         isa: str | None = None) -> torch.Tensor:
    """``y = x @ qt.dequantize(k).T`` from the bit planes (reads ``planes[:k]``, scales and offsets only).

    Args:
        qt: a uniform QuantizedTensor [N, K] (group size a power of two >= 32; see :func:`supports`).
        x: fp32 [M, K], contiguous, CPU; M = 1 (decode) .. 16 (small batch) is what the kernels are
            tuned for (any M >= 1 works).
        k: bits of the view, 1..qt.max_bits.
        out: optional fp32 [M, N] contiguous CPU tensor to write into (no allocation at all then).
        isa: force an instruction set for this call: a family (``"avx512"``, ``"avx2"``, ``"neon"``,
            ``"ref"``) or a variant (``"avx512-mask"``, see :func:`variants`); default: :func:`variant`.

    Returns:
        fp32 [M, N] (``out`` if given). The activations are quantized to int8 per block of 64 (or 32)
        columns, so the result differs from the float reference by at most
        ``sum_j |w_j - a_g| * d_block / 2`` per output (``a_g`` = the group's level offset, ``d_block`` =
        ``max|x_block| / 127``); typically ~0.3-1% of ``|y|``. The activation scratch lives in the native
        library and is reused across calls (it only grows).
    """
    c = _validated(qt)
    N, K, B = c[4], c[5], c[7]
    if not 1 <= k <= B:
        raise ValueError(f"k must be in 1..{B}, got {k}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] != K:
        got = (x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float32 tensor [M, {K}], got {got}")
    if not x.is_contiguous() or not x.is_cpu:
        raise ValueError("x must be a contiguous CPU tensor (call .contiguous())")
    M = x.shape[0]
    if M < 1:
        raise ValueError("x has no rows")
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    elif (out.dtype != torch.float32 or out.shape != (M, N) or not out.is_contiguous() or not out.is_cpu):
        raise ValueError(f"out must be a contiguous float32 CPU tensor [{M}, {N}], got {out.dtype} "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if c[3] is None:  # no native library: torch reference
        global _warned
        if not _warned:
            log.warning("bitdial native kernels are not built (%s); using the torch reference path", _IMPORT_ERROR)
            _warned = True
        return _reference(qt, x, k, out)
    _native.gemv(c[3][0], c[3][1], c[3][2], x.data_ptr(), out.data_ptr(), N, K, c[6], B, k, M,
                 -1 if isa is None else _isa_id(isa), c[3][3])
    return out


def _validated(qt: QuantizedTensor) -> tuple:
    """The validated pointers of qt, cached on it (re-validated if its tensors were replaced)."""
    c = qt.__dict__.get("_bd_native")
    if c is None or c[0] is not qt.planes or c[1] is not qt.scales or c[2] is not qt.offsets:
        c = _prepare(qt)
    return c


def _prepare(qt: QuantizedTensor) -> tuple:
    """Validate qt once: (planes, scales, offsets, data pointers or None, N, K, G, B), cached on qt."""
    if qt.method != "uniform":
        raise ValueError(f"native gemv handles the uniform method only, got {qt.method!r}")
    N, K = qt.shape
    ptrs = None
    if _native is not None:
        if not supports(qt):
            raise ValueError(f"native gemv needs a power-of-two group size >= 32, CPU planes with contiguous rows and "
                             f"contiguous scales and offsets (group_size={qt.group_size})")
        ptrs = (qt.planes.data_ptr(), qt.scales.data_ptr(), qt.offsets.data_ptr(), plane_stride(qt))
    c = (qt.planes, qt.scales, qt.offsets, ptrs, N, K, qt.group_size, qt.max_bits)
    qt.__dict__["_bd_native"] = c
    return c


def dequant(qt: QuantizedTensor, k: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``n0:n1`` of the k-bit view into ``out`` (fp32 or bf16 [n1 - n0, K], contiguous), on the kernel
    threads: the prefill path dequantizes tiles with it and multiplies them with torch's GEMM. fp32 output
    equals ``qt.dequantize(k)[n0:n1]`` up to float rounding; bf16 is rounded to nearest even."""
    c = _validated(qt)
    N, K, G, B = c[4], c[5], c[6], c[7]
    if c[3] is None:
        w = qt.dequantize(k)[n0:n1]
        return out.copy_(w)
    if not 1 <= k <= B:
        raise ValueError(f"k must be in 1..{B}, got {k}")
    if not 0 <= n0 < n1 <= N:
        raise ValueError(f"row range {n0}:{n1} is outside 0:{N}")
    if (out.dtype not in (torch.float32, torch.bfloat16) or out.shape != (n1 - n0, K) or not out.is_contiguous()
            or not out.is_cpu):
        raise ValueError(f"out must be a contiguous fp32 or bf16 CPU tensor [{n1 - n0}, {K}], got {out.dtype} "
                         f"{tuple(out.shape)}")
    _native.dequant(c[3][0], c[3][1], c[3][2], N, K, G, B, k, n0, n1, out.data_ptr(), int(out.dtype == torch.bfloat16),
                    c[3][3])
    return out


def fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16: torch's oneDNN GEMM
    then runs 3-4x faster in bf16 than in fp32, so a generation's prompt uses bf16 tiles by default)."""
    global _FAST_BF16
    if _FAST_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((ln for ln in f if ln.startswith("flags")), "").split()
            _FAST_BF16 = "amx_bf16" in flags or "avx512_bf16" in flags
        except OSError:
            _FAST_BF16 = False
    return _FAST_BF16


_FAST_BF16: bool | None = None


def read_bandwidth(buf: torch.Tensor, isa: str | None = None) -> int:
    """Reduce ``buf`` (uint8, 64-byte aligned, size a multiple of 256) on the kernel threads; returns a
    checksum. Time it to measure the machine's read bandwidth (``benchmarks/bandwidth.py``)."""
    if _native is None:
        raise RuntimeError(f"bitdial native kernels are not built ({_IMPORT_ERROR})")
    if buf.dtype != torch.uint8 or not buf.is_contiguous():
        raise ValueError("buf must be a contiguous uint8 tensor")
    return _native.sum_bytes(buf.data_ptr(), buf.numel(), -1 if isa is None else _isa_id(isa))


def _configure() -> None:
    if _native is None:
        if os.environ.get("BITDIAL_ISA"):
            raise RuntimeError(f"BITDIAL_ISA={os.environ['BITDIAL_ISA']} is set but the bitdial native kernels are "
                               f"not built ({_IMPORT_ERROR}); reinstall with a C compiler or unset BITDIAL_ISA")
        return
    want = os.environ.get("BITDIAL_ISA", "").strip().lower()
    if want:
        try:
            set_isa(want)
        except ValueError as e:
            raise RuntimeError(f"BITDIAL_ISA={want}: {e}") from None
    spin = os.environ.get("BITDIAL_SPIN_US")
    if spin:
        _native.set_spin_us(int(spin))
    n = os.environ.get("BITDIAL_THREADS")
    set_threads(int(n) if n else torch.get_num_threads())


_configure()
