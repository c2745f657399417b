#!/usr/bin/env bash
# Build runtimes/native/runner.cpp for this machine (x86-64 or aarch64 Linux) against the ExecuTorch
# runtime libraries of the installed executorch wheel: a runner with no PyTorch in its process, for
# `python -m benchmarks.native_runner`. The wheel's libexecutorch*, kernel and XNNPACK libraries do not
# link libtorch (only its Python bindings do). Also libsdxs and sdxs-run (sdxs.h, docs/c-api.md). Each
# output is rebuilt when one of its sources or this script is newer.
#
#   build/host/sdxs_runner    (RUNPATH: the wheel's executorch/lib)
#   build/host/libsdxs.so     (RUNPATH: the wheel's executorch/lib)
#   build/host/sdxs-run       (RUNPATH: $ORIGIN)
#   build/host/asan/          with --asan only: libsdxs.so, sdxs-run and test_capi (test_capi.c) built
#                             with -fsanitize=address, for tests/test_capi.py
#
# Usage: runtimes/native/build_host.sh [--asan]     (`make host-runner` runs it without --asan)
# Env:   PY (python with executorch installed; default .venv/bin/python), CXX (default g++).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
CXX="${CXX:-g++}"
SRC="$ROOT/runtimes/native/runner.cpp"
OUT="$ROOT/build/host"
RUNNER="$OUT/sdxs_runner"
source "$ROOT/runtimes/native/compile.sh"  # LIBS, compile_runner, die, log, apt_install

# The compiler: Debian's g++ when there is none (as build_arm64.sh installs its cross compiler).
if ! command -v "$CXX" >/dev/null; then
  [[ "$CXX" == g++ ]] || die "no C++ compiler '$CXX'"
  apt_install g++
  command -v g++ >/dev/null || die "g++ still missing after apt-get install g++"
fi
[[ -x "$PY" ]] || die "no python at $PY (run 'make install' first, or set PY)"
ET_DIR="$("$PY" -c 'import executorch; print(list(executorch.__path__)[0])')" || die "executorch is not installed for $PY"
[[ -d "$ET_DIR/include/executorch" && -f "$ET_DIR/lib/libexecutorch.so" ]] || die "$ET_DIR has no runtime headers and libraries"

mkdir -p "$OUT"
if [[ ! -x "$RUNNER" || "$SRC" -nt "$RUNNER" || "${SRC%/*}/sdxt.h" -nt "$RUNNER" || "${BASH_SOURCE[0]}" -nt "$RUNNER" ]]; then
  log "compiling $RUNNER"
  compile_runner "$CXX" "$ET_DIR" "$SRC" "$RUNNER" "$ET_DIR/lib"
fi
if ldd "$RUNNER" | grep -q 'libtorch'; then die "$RUNNER links libtorch"; fi
[[ -f /usr/include/nlohmann/json.hpp && -f /usr/include/stb/stb_image_write.h ]] || apt_install nlohmann-json3-dev libstb-dev
compile_capi "$CXX" "$ET_DIR" "$OUT" "$ET_DIR/lib"
if [[ "${1:-}" == --asan ]]; then
  ASAN=(-fsanitize=address -fno-omit-frame-pointer -g -O1)
  compile_capi "$CXX" "$ET_DIR" "$OUT/asan" "$ET_DIR/lib" "${ASAN[@]}"
  if stale "$OUT/asan/test_capi" "$ROOT/runtimes/native/test_capi.c" "$ROOT/runtimes/native/sdxs.h" "$OUT/asan/libsdxs.so"; then
    log "compiling $OUT/asan/test_capi"
    "${CC:-gcc}" -std=c11 -Wall -Wextra "${ASAN[@]}" -I"$ROOT/runtimes/native" "$ROOT/runtimes/native/test_capi.c" \
      -o "$OUT/asan/test_capi.tmp" -L"$OUT/asan" -lsdxs -Wl,-rpath,'$ORIGIN'
    mv "$OUT/asan/test_capi.tmp" "$OUT/asan/test_capi"
  fi
fi
log "ok: $RUNNER $OUT/libsdxs.so $OUT/sdxs-run"
