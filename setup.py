"""Build of the optional native kernels, ``bitdial.kernels._native`` (metadata lives in pyproject.toml).

One translation unit per instruction set, each compiled with its own flags (never -march=native, so
the build runs on any CPU of the architecture; the ISA is picked at run time):

    gemv_avx512_gfni.c  -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi -mgfni -mf16c -mfma
    gemv_avx512.c       -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi -mf16c -mfma   (x86-64)
    gemv_avx2.c         -mavx2 -mfma -mf16c                                                 (x86-64)
    dequant_avx512.c    dequant.c again with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c     (x86-64)
    decode_avx512.c     decode.c again, the same flags                                        (x86-64)
    dequant_avx2.c      dequant.c again with -mavx2 -mfma -mf16c                              (x86-64)
    decode_avx2.c       decode.c again, the same flags                                        (x86-64)
    gemv_neon.c    baseline NEON, and again with +dotprod when the compiler knows it        (aarch64)
    gemv_ref.c, pool.c, decode.c, dequant.c, module.c: portable C

The extension is optional: without a working C compiler the package still installs and
``bitdial.kernels`` falls back to the torch reference path (with a warning).
Rebuild in place after editing the C sources:  python setup.py build_ext --inplace
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = os.path.join("src", "bitdial", "kernels", "csrc")
# -fno-trapping-math: the fused step's float loops (SwiGLU, softmax: exp_fast's clamp) vectorize in every build,
# not only with AVX-512 (nothing here uses floating-point traps); -ffp-contract=off: no implicit FMA contraction,
# so the plain, AVX2 and AVX-512 builds give the same bits (-std=c11 implies it for gcc, not for clang)
COMMON_FLAGS = ["-O3", "-g0", "-std=c11", "-fno-strict-aliasing", "-fno-trapping-math", "-ffp-contract=off",
                "-D_GNU_SOURCE", "-Wall"]


def _machine() -> str:
    m = platform.machine().lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "aarch64"
    return m


def isa_units() -> list[tuple[str, list[str]]]:
    """(source, extra flags) for each ISA-specific translation unit of this machine."""
    m = _machine()
    if m == "x86_64":
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi", "-mf16c", "-mfma"]
        return [
            ("gemv_avx512_gfni.c", avx512 + ["-mgfni"]),
            ("gemv_avx512.c", avx512),
            ("gemv_avx2.c", ["-mavx2", "-mfma", "-mf16c"]),
            ("dequant_avx512.c", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"]),
            ("decode_avx512.c", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"]),
            ("dequant_avx2.c", ["-mavx2", "-mfma", "-mf16c"]),
            ("decode_avx2.c", ["-mavx2", "-mfma", "-mf16c"]),
        ]
    if m == "aarch64":
        return [
            ("gemv_neon.c", []),
            ("gemv_neon_dot.c", ["-march=armv8.2-a+dotprod"]),
        ]
    return []


class BuildNative(build_ext):
    """Compile each ISA unit with its own flags, then link them into the extension."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "bitdial.kernels._native":
            return super().build_extension(ext)
        objects, macros = [], []
        for src, flags in isa_units():
            path = os.path.join(CSRC, src)
            try:
                objects += self.compiler.compile([path], output_dir=self.build_temp, include_dirs=[CSRC],
                                                 extra_postargs=COMMON_FLAGS + flags, macros=macros)
            except Exception as e:  # an old compiler without e.g. +dotprod: drop that unit only
                if src == "gemv_neon_dot.c":
                    print(f"bitdial: skipping {src} ({e})", file=sys.stderr)
                    continue
                raise
            if src == "gemv_neon_dot.c":
                ext.define_macros.append(("BITDIAL_HAVE_NEON_DOT", "1"))
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


native = Extension(
    "bitdial.kernels._native",
    sources=[os.path.join(CSRC, f) for f in ("module.c", "pool.c", "decode.c", "dequant.c", "gemv_ref.c")],
    include_dirs=[CSRC],
    depends=[os.path.join(CSRC, f) for f in ("bitdial_kernels.h", "pool.h", "decode.h", "dequant.h", "dequant.c", "decode.c", "avx512_common.h", "gemv_avx512.c",
                                              "gemv_avx512_gfni.c", "gemv_avx2.c", "gemv_neon.c", "gemv_neon_dot.c")],
    extra_compile_args=COMMON_FLAGS,
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildNative})
