#!/usr/bin/env bash
# Build runtimes/native/runner.cpp for this machine (x86-64 or aarch64 Linux) against the ExecuTorch
# runtime libraries of the installed executorch wheel: a runner with no PyTorch in its process, for
# `python -m benchmarks.native_runner`. The wheel's libexecutorch*, kernel and XNNPACK libraries do not
# link libtorch (only its Python bindings do). Rebuilt when runner.cpp or this script is newer.
#
#   build/host/sdxs_runner    (RUNPATH: the wheel's executorch/lib)
#
# Usage: runtimes/native/build_host.sh      (`make host-runner` runs it)
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
log "ok: $RUNNER"
