"""The NEON kernels (plain and dot-product) on an x86 host: cross-compiled with Debian's
gcc-aarch64-linux-gnu and run under qemu-aarch64 (skipped when either is missing). The standalone
checker src/bitdial/kernels/csrc/tools/selfcheck.c compares them with the portable C path over odd
shapes, every k and several batch sizes; the C path itself is checked against torch in test_kernels.py
(which also covers the x86 paths)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "src" / "bitdial" / "kernels" / "csrc"
FLAGS = ["-O2", "-std=c11", "-fno-strict-aliasing", "-D_GNU_SOURCE", f"-I{CSRC}", "-DSELFCHECK_QUICK"]


def _build(cc: str, units: list[tuple[str, list[str]]], out: Path, extra: list[str]) -> None:
    objs = []
    for src, flags in units:
        obj = out.parent / (Path(src).stem + ".o")
        subprocess.run([cc, *FLAGS, *flags, "-c", str(CSRC / src), "-o", str(obj)], check=True, capture_output=True)
        objs.append(str(obj))
    subprocess.run([cc, *FLAGS, *extra, str(CSRC / "tools" / "selfcheck.c"), *objs, "-lm", "-o", str(out)], check=True,
                   capture_output=True)


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user")
def test_neon_paths_under_qemu(tmp_path: Path) -> None:
    exe = tmp_path / "selfcheck"
    _build("aarch64-linux-gnu-gcc", [("gemv_neon.c", []), ("gemv_neon_dot.c", ["-march=armv8.2-a+dotprod"]),
                                     ("gemv_ref.c", [])], exe, ["-DBITDIAL_HAVE_NEON_DOT", "-static"])
    r = subprocess.run(["qemu-aarch64", "-cpu", "max", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " 0 failures" in r.stdout, r.stdout + r.stderr
