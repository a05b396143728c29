"""Native GEMV kernels (bitdial.kernels) against the torch reference ``x @ qt.dequantize(k).T``.

Every instruction set this build can run here is exercised through the explicit ``isa=`` argument
(and the ``BITDIAL_ISA`` override in a subprocess).

Tolerance (derived, see src/bitdial/kernels/csrc/bitdial_kernels.h): the kernels quantize x to int8 per
block u of QB columns, x_j ~ d_u q_j with d_u = max_u |x| / 127 and |d_u q_j - x_j| <= d_u / 2, and use
that approximation only in the centered term, so for every output

    |y_native - y_ref| <= sum_j |w_j - a_g(j)| * d_u(j) / 2  +  float rounding,

a_g = m_g + s_g ((2^(B-k) - 1) / 2 + 2^(B-k) 2^(k-1)) being the level of the middle k-bit code of the
group. The float rounding term is bounded by the usual summation bound gamma_n * sum |terms| with
n = K + 16 summands on either side (torch's and ours): 4 (K + 16) eps sum_j (|w_j| + |a_j| + |w_j - a_j|) |x_j|.
Different ISAs quantize x identically (same d_u, same rint), so they may differ by float rounding only.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bitdial.kernels as BK
from bitdial.quant.qtensor import QuantizedTensor, expand_groups

pytestmark = pytest.mark.skipif(not BK.available(), reason="bitdial native kernels not built")

ISAS = BK.variants()  # every kernel variant runnable here (e.g. avx512-gfni, avx512-mask, avx2, ref)
EPS = 2.0 ** -23
KS = (40, 72, 200, 576, 1024, 1032, 1536)  # 1024: the longest "short row" (two plane blocks), 1032 one past
NS = (1, 3, 17, 192)
GS = (32, 64, 128)
BS = (8, 6)
MS = (1, 2, 5, 16)
CANARY = 0x7FC0BEEF  # a NaN payload the kernels never write
PAD = 37  # guard words either side of an output


def random_qt(N: int, K: int, G: int, B: int, gen: torch.Generator) -> QuantizedTensor:
    """Uniform QuantizedTensor with random B-bit codes (random planes, zero padding bits) and
    realistic fp16 scales/offsets (a group spans ~[m, m + s 2^B] around 0)."""
    RB = (K + 7) // 8
    planes = torch.randint(0, 256, (B, N, RB), dtype=torch.uint8, generator=gen)
    if K % 8:
        planes[:, :, -1] &= (1 << (K % 8)) - 1
    ng = math.ceil(K / G)
    s = (torch.rand(N, ng, generator=gen) * 0.02 + 0.002) / (1 << B) * 64
    m = -s * (1 << B) / 2 * (0.6 + 0.8 * torch.rand(N, ng, generator=gen))
    return QuantizedTensor("uniform", (N, K), B, G, planes, s.half(), m.half())


def random_x(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(M, K, generator=gen)
    x[:, ::17] *= 6.0  # a few outliers, like real activations
    return x


def error_bound(qt: QuantizedTensor, W: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output bound [M, N] on |y_native - x @ W.T| (module docstring), and its float-rounding part."""
    N, K = qt.shape
    G, B = qt.group_size, qt.max_bits
    QB = 64 if G % 64 == 0 else 32
    L = float(1 << (B - k))
    hmid = (L - 1) / 2 + L * 2 ** (k - 1)
    A = expand_groups(qt.offsets.float() + hmid * qt.scales.float(), G, K)  # [N, K]
    M = x.shape[0]
    nb = math.ceil(K / QB)
    xp = torch.zeros(M, nb * QB)
    xp[:, :K] = x
    d = (xp.abs().view(M, nb, QB).amax(-1) / 127).repeat_interleave(QB, 1)[:, :K]  # [M, K]
    WA = (W - A).abs_()
    quant = WA @ (d * (0.5 * (1 + 1e-4))).T  # [N, M]
    fp = (WA.add_(W.abs()).add_(A.abs_())) @ x.abs().T * (4 * (K + 16) * EPS)
    return (quant + fp).T, fp.T


def guarded_out(M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An [M, N] output view with PAD canary words before and after it."""
    buf = torch.full((M * N + 2 * PAD,), CANARY, dtype=torch.int32)
    return buf, buf[PAD:PAD + M * N].view(torch.float32).view(M, N)


def check_canaries(buf: torch.Tensor, what: str) -> None:
    assert (buf[:PAD] == CANARY).all() and (buf[-PAD:] == CANARY).all(), f"{what}: wrote outside its output"


@pytest.fixture
def one_torch_thread():
    """The reference computations are many tiny ops: one torch thread is faster (and leaves the kernels'
    threads alone)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("K", KS)
def test_gemv_all_isas_against_reference(K: int, one_torch_thread) -> None:
    gen = torch.Generator().manual_seed(K)
    worst = 0.0
    for N in NS:
        for G in GS:
            for B in BS:
                qt = random_qt(N, K, G, B, gen)
                x16 = random_x(max(MS), K, gen)
                for k in range(1, B + 1):
                    W = qt.dequantize(k)  # [N, K]
                    ref16 = x16 @ W.T
                    bound16, fp16 = error_bound(qt, W, x16, k)
                    for M in MS:
                        ys = {}
                        for isa in ISAS:
                            buf, out = guarded_out(M, N)
                            y = BK.gemv(qt, x16[:M], k, out=out, isa=isa)
                            ctx = f"isa={isa} N={N} K={K} G={G} B={B} k={k} M={M}"
                            check_canaries(buf, ctx)
                            assert y.data_ptr() == out.data_ptr()
                            err = (y - ref16[:M]).abs()
                            assert torch.isfinite(y).all(), ctx
                            assert (err <= bound16[:M]).all(), (
                                f"{ctx}: |err| {err.max():.3g} exceeds the derived bound "
                                f"(worst ratio {(err / bound16[:M]).max():.3f})")
                            worst = max(worst, float((err / bound16[:M]).max()))
                            ys[isa] = y.clone()
                        for isa, y in ys.items():  # same quantized x everywhere: float rounding only
                            assert ((y - ys["ref"]).abs() <= fp16[:M] + 1e-30).all(), f"{isa} vs ref, {ctx}"
    assert worst > 0.01, "the bound is so loose that it tests nothing"


@pytest.mark.parametrize("K", (2056, 4104))
def test_long_rows_prefetch_path(K: int, one_torch_thread) -> None:
    """Rows of >= 256 bytes per plane take the decode's software-prefetch path (rows ahead, 2x further at
    k <= 2; docs/kernels.md "Spread software prefetch"), which KS above never reach: every ISA against the
    reference, partial last block, the prefetched row past the end of the matrix."""
    gen = torch.Generator().manual_seed(K)
    for N, G in ((37, 64), (9, 128)):
        qt = random_qt(N, K, G, 8, gen)
        x = random_x(2, K, gen)
        for k in range(1, 9):
            W = qt.dequantize(k)
            ref = x @ W.T
            bound, fp = error_bound(qt, W, x, k)
            ys = {}
            for isa in ISAS:
                for M in (1, 2):
                    buf, out = guarded_out(M, N)
                    y = BK.gemv(qt, x[:M], k, out=out, isa=isa)
                    ctx = f"isa={isa} N={N} K={K} G={G} k={k} M={M}"
                    check_canaries(buf, ctx)
                    assert ((y - ref[:M]).abs() <= bound[:M]).all(), ctx
                    if M == 1:
                        ys[isa] = y.clone()
            for isa, y in ys.items():
                assert ((y - ys["ref"]).abs() <= fp[:1] + 1e-30).all(), f"{isa} vs ref, N={N} K={K} G={G} k={k}"


def test_relative_error_realistic_weights() -> None:
    """On quantize_uniform output with a Gaussian x the error is a small fraction of |y|: the expected
    relative error is ~ rms(w - a) / rms(w) * (max|x_block| / 127) / sqrt(12) ~ 0.3-0.6%."""
    from bitdial.quant.uniform import quantize_uniform

    gen = torch.Generator().manual_seed(1)
    W = torch.randn(256, 1024, generator=gen) / 32
    qt = quantize_uniform(W, 8, 64, clip="none")
    x = torch.randn(4, 1024, generator=gen)
    for k in (2, 4, 8):
        ref = x @ qt.dequantize(k).T
        for isa in ISAS:
            y = BK.gemv(qt, x, k, isa=isa)
            rel = float((y - ref).norm() / ref.norm())
            assert rel < 1e-2, f"{isa} k={k}: relative error {rel:.4f}"


def test_reads_only_first_k_planes() -> None:
    gen = torch.Generator().manual_seed(2)
    qt = random_qt(33, 200, 64, 8, gen)
    x = random_x(3, 200, gen)
    for k in (1, 3, 7):
        junk = qt.planes.clone()
        junk[k:] = torch.randint(0, 256, junk[k:].shape, dtype=torch.uint8, generator=gen)
        qt2 = QuantizedTensor("uniform", qt.shape, 8, 64, junk, qt.scales, qt.offsets)
        for isa in ISAS:
            assert torch.equal(BK.gemv(qt, x, k, isa=isa), BK.gemv(qt2, x, k, isa=isa)), (isa, k)


def test_threads_give_identical_results() -> None:
    gen = torch.Generator().manual_seed(3)
    qt = random_qt(1000, 1536, 64, 8, gen)  # large enough to be split across threads
    old = BK.threads()
    try:
        for M in (1, 5):
            x = random_x(M, 1536, gen)
            BK.set_threads(1)
            y1 = {isa: BK.gemv(qt, x, 3, isa=isa) for isa in ISAS}
            assert BK.set_threads(2) == 2
            for isa in ISAS:
                assert torch.equal(BK.gemv(qt, x, 3, isa=isa), y1[isa]), isa
    finally:
        BK.set_threads(old)


def test_validation_errors() -> None:
    gen = torch.Generator().manual_seed(4)
    qt = random_qt(8, 64, 32, 6, gen)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="k must be"):
        BK.gemv(qt, x, 7)
    with pytest.raises(ValueError, match="float32"):
        BK.gemv(qt, x.double(), 3)
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        BK.gemv(qt, torch.randn(2, 65), 3)
    with pytest.raises(ValueError, match="contiguous"):
        BK.gemv(qt, torch.randn(64, 2).T, 3)
    with pytest.raises(ValueError, match="out must be"):
        BK.gemv(qt, x, 3, out=torch.empty(8, 2))
    with pytest.raises(ValueError, match="not compiled|not supported"):
        BK.gemv(qt, x, 3, isa="sse2")
    small = random_qt(8, 64, 16, 6, gen)  # group size 16: not a native layout
    assert not BK.supports(small)
    with pytest.raises(ValueError, match="group size"):
        BK.gemv(small, x, 3)


def test_fallback_without_native(monkeypatch, caplog) -> None:
    gen = torch.Generator().manual_seed(5)
    qt = random_qt(8, 64, 32, 6, gen)
    x = torch.randn(2, 64)
    monkeypatch.setattr(BK, "_native", None)
    monkeypatch.setattr(BK, "_warned", False)
    with caplog.at_level("WARNING", logger="bitdial.kernels"):
        y = BK.gemv(qt, x, 4)
    assert torch.allclose(y, x @ qt.dequantize(4).T)
    assert "not built" in caplog.text
    assert not BK.available() and BK.isa() is None


def test_env_isa_override_and_guard_pages() -> None:
    """A process started with BITDIAL_ISA set to a non-default ISA uses it; and no path (all run through
    isa=) reads past the end of the planes prefix planes[:k], the scales/offsets or x: each ends right
    before a PROT_NONE page, so a stray read kills the subprocess with SIGSEGV."""
    code = """
    import ctypes, mmap, os, sys, torch
    import bitdial.kernels as BK
    from bitdial.quant.qtensor import QuantizedTensor
    assert BK.isa() == os.environ["BITDIAL_ISA"], (BK.isa(), os.environ["BITDIAL_ISA"])
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    P = mmap.PAGESIZE
    keep = []
    def guarded(nbytes, tail=0):
        # nbytes readable bytes that end exactly at a PROT_NONE region; `tail` more bytes inside it
        off = (-nbytes) % P
        prot = -(-tail // P) * P + P
        mm = mmap.mmap(-1, off + nbytes + prot)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert libc.mprotect(base + off + nbytes, prot, 0) == 0
        keep.append(mm)
        return torch.frombuffer(mm, dtype=torch.uint8)[off:off + nbytes + tail]
    g = torch.Generator().manual_seed(0)
    for (N, K, G, B, k, M) in [(5, 40, 32, 8, 3, 1), (3, 200, 64, 6, 6, 2), (9, 72, 128, 8, 8, 5),
                               (6, 1000, 64, 8, 2, 1), (4, 136, 32, 8, 1, 16), (7, 8, 32, 8, 8, 3)]:
        RB = (K + 7) // 8; ng = -(-K // G)
        codes = torch.randint(0, 256, (B, N, RB), dtype=torch.uint8, generator=g)
        if K % 8: codes[:, :, -1] &= (1 << (K % 8)) - 1
        pl = guarded(k * N * RB, (B - k) * N * RB)  # planes[k:] lie in the protected pages
        pl[:k * N * RB] = codes[:k].reshape(-1)
        planes = pl.view(B, N, RB)
        s = guarded(N * ng * 2).view(torch.float16).view(N, ng); s.copy_(torch.rand(N, ng) * 0.01)
        m = guarded(N * ng * 2).view(torch.float16).view(N, ng); m.copy_(-torch.rand(N, ng))
        x = guarded(M * K * 4).view(torch.float32).view(M, K); x.copy_(torch.randn(M, K))
        qt = QuantizedTensor("uniform", (N, K), B, G, planes, s, m)
        ref = x @ qt.dequantize(k).T
        for isa in BK.variants():
            y = BK.gemv(qt, x, k, isa=isa)
            assert ((y - ref).abs() <= 0.05 * ref.abs().max() + 1e-3).all(), (isa, N, K, G, B, k, M)
    print("ok", BK.isa())
    """
    families = BK.isas()
    isa = families[1] if len(families) > 1 else families[0]  # not the default one
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, BITDIAL_ISA=isa),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"ok {isa}" in r.stdout, f"BITDIAL_ISA={isa}: rc={r.returncode}\n{r.stderr[-2000:]}"


def test_env_isa_selection(monkeypatch) -> None:
    """BITDIAL_ISA (read by bitdial.kernels at import, re-read here by its _configure) picks any available
    family or variant and is an error for one this CPU or build lacks."""
    old = BK.variant()
    try:
        for fam in BK.isas():
            monkeypatch.setenv("BITDIAL_ISA", fam)
            BK._configure()
            assert BK.isa() == fam and BK.variant() == next(v for v in ISAS if v.startswith(fam))
        for var in ISAS:
            monkeypatch.setenv("BITDIAL_ISA", var)
            BK._configure()
            assert BK.variant() == var
        missing = next(i for i in ("neon", "avx512", "avx2") if i not in BK.isas())
        monkeypatch.setenv("BITDIAL_ISA", missing)
        with pytest.raises(RuntimeError, match=f"BITDIAL_ISA={missing}"):
            BK._configure()
    finally:
        BK.set_isa(old)
        BK.set_threads(torch.get_num_threads())


def test_anyprec_linear_uses_kernel_for_small_batches(monkeypatch) -> None:
    from bitdial.runtime.anyprec import AnyPrecisionLinear

    gen = torch.Generator().manual_seed(6)
    qt = random_qt(48, 200, 64, 8, gen)
    bias = torch.randn(48, generator=gen)
    lin = AnyPrecisionLinear("t", qt, bias, bits=5)
    calls = []
    real = BK.gemv
    monkeypatch.setattr(BK, "gemv", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    for shape in ((200,), (1, 200), (2, 3, 200), (16, 200), (17, 200)):
        x = random_x(math.prod(shape[:-1]), 200, gen).view(*shape)
        monkeypatch.setattr(BK, "enabled", True)
        calls.clear()
        y = lin(x)
        monkeypatch.setattr(BK, "enabled", False)
        y_ref = lin(x)
        assert y.shape == y_ref.shape == (*shape[:-1], 48)
        rows = math.prod(shape[:-1])
        if rows <= BK.MAX_ROWS:
            assert calls == [(rows, 200)]
            W = qt.dequantize(5)
            bound, _ = error_bound(qt, W, x.reshape(-1, 200), 5)
            assert ((y - y_ref).reshape(-1, 48).abs() <= bound + 1e-5).all()
        else:  # prefill-sized input: the dequantize + matmul path
            assert calls == [] and torch.equal(y, y_ref)


def test_pool_jobs_with_a_busy_core() -> None:
    """Jobs that helpers may skip (gemv slices) interleaved with jobs every thread must run (the bandwidth
    probe's static split), while another process keeps a core busy: results stay bit-identical and the
    probe's checksum exact (no helper runs a job twice or misses an all-threads job)."""
    gen = torch.Generator().manual_seed(11)
    qt = random_qt(512, 1024, 64, 4, gen)
    x = random_x(1, 1024, gen)
    buf = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    before = BK.threads()
    BK.set_threads(1)
    want_sum = BK.read_bandwidth(buf)  # the checksum of one thread reading everything
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        BK.set_threads(2)
        ref = BK.gemv(qt, x, 4).clone()
        for i in range(400):
            assert torch.equal(BK.gemv(qt, x, 4), ref), f"call {i} differs"
            if i % 50 == 0:
                assert BK.read_bandwidth(buf) == want_sum
    finally:
        busy.kill()
        BK.set_threads(before)


def test_padded_plane_stride_gives_identical_results(one_torch_thread) -> None:
    """pad_planes spaces the planes off the 4 KiB grid; every kernel reads them through the plane stride."""
    gen = torch.Generator().manual_seed(5)
    for N, K, G in ((192, 576, 32), (17, 200, 64), (64, 512, 64)):
        qt = random_qt(N, K, G, 8, gen)
        pq = BK.pad_planes(qt, force=True)
        RB = (K + 7) // 8
        assert BK.plane_stride(qt) == N * RB
        assert BK.plane_stride(pq) > N * RB and BK.plane_stride(pq) % 4096 and not pq.planes.is_contiguous()
        assert torch.equal(pq.planes, qt.planes) and BK.supports(pq)
        for M in (1, 5):
            x = random_x(M, K, gen)
            for k in (1, 3, 5, 8):
                for isa in ISAS:
                    assert torch.equal(BK.gemv(pq, x, k, isa=isa), BK.gemv(qt, x, k, isa=isa)), (isa, N, K, k, M)
        for k in (2, 8):
            a, b = torch.empty(N, K), torch.empty(N, K)
            assert torch.equal(BK.dequant(pq, k, 0, N, a), BK.dequant(qt, k, 0, N, b))
        assert torch.equal(pq.dequantize(4), qt.dequantize(4))
    on_grid = random_qt(64, 512, 64, 8, gen)  # N * RB = 4096: padded without force
    assert BK.plane_stride(BK.pad_planes(on_grid)) % 4096
    off_grid = random_qt(17, 200, 64, 8, gen)
    assert BK.pad_planes(off_grid) is off_grid


def test_plane_stride_below_the_planes_is_refused() -> None:
    qt = random_qt(8, 64, 32, 8, torch.Generator().manual_seed(1))
    x, y = torch.randn(1, 64), torch.empty(1, 8)
    with pytest.raises(ValueError, match="plane stride"):
        BK._native.gemv(qt.planes.data_ptr(), qt.scales.data_ptr(), qt.offsets.data_ptr(), x.data_ptr(),
                        y.data_ptr(), 8, 64, 32, 8, 3, 1, -1, 8 * 8 - 1)


def test_import_sets_a_passive_omp_wait_policy():
    """`import bitdial` before torch makes torch's OpenMP threads sleep at once (docs/kernels.md, Threads);
    a policy the user set is kept, and importing torch first leaves the environment alone."""
    import os
    import subprocess
    import sys

    code = ("import os, {first}, {second}; "
            "print(os.environ.get('OMP_WAIT_POLICY'), bitdial.OMP_WAIT_POLICY_SET_BY_BITDIAL)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(first: str, second: str, **extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    # the flag tells child processes (benchmarks/e2e.py's llama-bench) whether the user chose the policy
    assert policy("bitdial", "torch") == "PASSIVE True"
    assert policy("bitdial", "torch", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"
    assert policy("torch", "bitdial") == "None False"
