#!/usr/bin/env bash
# Builds and runs the host emulation of the fast CUDA GEMM kernels (check.cpp).
# Needs only a C++20 compiler; no CUDA toolkit, no GPU.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${TMPDIR:-/tmp}/candle-moe-kernel-emu
${CXX:-g++} -std=c++20 -O2 -pthread -fno-strict-aliasing -I"$here/include" -I"$here/.." \
  "$here/check.cpp" -o "$out"
"$out"
