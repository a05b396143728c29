#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize for side-by-side runs (benchmarks/e2e.py --llama-bin).
#
#   bash benchmarks/build_llama_cpp.sh [OUT_DIR]      # default /tmp/llama.cpp-<version>; prints the bin dir
#
# The source is the llama.cpp vendored in llama-cpp-python's source distribution on PyPI (the package
# registry is reachable, GitHub is not): CPU-only Release, native flags (AVX-512, VNNI, AMX where the CPU
# has them), OpenMP, static libraries. About 6 minutes on 2 cores.
#
# One patch: GCC 12 drops the stores that fill ggml's AMX tile configuration (ggml_tile_config_init in
# ggml-cpu/amx/mmq.cpp) because it does not see that `ldtilecfg` reads them. The tiles are then loaded
# with zero rows and the first `tileloadd` of a Q4_0/Q4_1/Q8_0 matmul dies with SIGILL (ILL_ILLOPN) on
# AMX machines (Sapphire Rapids and later). A compiler barrier before the load keeps the stores.
set -euo pipefail
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
OUT="${1:-/tmp/llama.cpp-$VER}"
mkdir -p "$OUT"
SRC="$OUT/llama_cpp_python-$VER/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$OUT" >&2
    tar xzf "$OUT/llama_cpp_python-$VER.tar.gz" -C "$OUT"
fi
python3 - "$SRC/ggml/src/ggml-cpu/amx/mmq.cpp" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = "    _tile_loadconfig(&tc);\n"
fix = '    __asm__ __volatile__("" : : "r"(&tc) : "memory");  // bitdial: keep the stores above (GCC 12)\n'
if fix not in s:
    if s.count(old) != 1:
        sys.exit(f"{p}: the AMX tile-config code is not where this script expects it; patch it by hand")
    open(p, "w").write(s.replace(old, fix + old))
PY
GEN=(); if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
cmake -S "$SRC" -B "$SRC/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$SRC/build" -j"$(nproc)" --target llama-bench llama-quantize >&2
echo "$SRC/build/bin"
