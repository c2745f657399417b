#!/usr/bin/env bash
# Cross-compile runtimes/native/runner.cpp for aarch64 Linux (glibc) against the prebuilt ExecuTorch
# runtime of the executorch==$ET_VERSION manylinux_2_28_aarch64 wheel, for running under
# `qemu-aarch64-static -cpu cortex-a76 -L /usr/aarch64-linux-gnu` (runtimes/arm64_emulated.py) or on
# an aarch64 Linux board. Idempotent: every step is skipped when its output is already there.
#
#   build/arm64/wheel/executorch-*.whl     the downloaded wheel (cache)
#   build/arm64/executorch/{include,lib}   headers and the runtime libraries extracted from it
#   build/arm64/sdxs_runner                the runner (RUNPATH $ORIGIN/executorch/lib)
#   build/arm64/libsdxs.so, sdxs-run       the C API and its CLI (sdxs.h; RUNPATH $ORIGIN/executorch/lib, $ORIGIN)
#
# Usage: runtimes/native/build_arm64.sh      (from anywhere; `make arm64-runner` runs it)
# Env:   PY (python with pip; default .venv/bin/python, else python3), ET_VERSION (default 1.5.1).
# Needs root or sudo only when qemu-user-static / g++-aarch64-linux-gnu are not installed yet.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ET_VERSION="${ET_VERSION:-1.5.1}"
OUT="$ROOT/build/arm64"
WHEEL_DIR="$OUT/wheel"
ET_DIR="$OUT/executorch"
RUNNER="$OUT/sdxs_runner"
SRC="$ROOT/runtimes/native/runner.cpp"
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
source "$ROOT/runtimes/native/compile.sh"  # LIBS, compile_runner, die, log, apt_install


if [[ -z "${PY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
[[ -n "$PY" ]] || die "no python found (set PY=/path/to/python with pip)"

# 1. Debian packages: the cross compiler (with the aarch64 glibc/libstdc++ under /usr/aarch64-linux-gnu)
#    and the user-mode emulator.
missing=()
command -v "$CXX" >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
  command -v "$CXX" >/dev/null || die "$CXX still missing after installing g++-aarch64-linux-gnu"
fi

# 2. The aarch64 wheel (cached). --only-binary and --platform make pip fetch the wheel for aarch64
#    without resolving or installing anything into this environment.
mkdir -p "$WHEEL_DIR"
shopt -s nullglob
wheels=("$WHEEL_DIR"/executorch-"$ET_VERSION"-*manylinux*aarch64.whl)
if ((${#wheels[@]} == 0)); then
  log "downloading executorch==$ET_VERSION (manylinux_2_28_aarch64) from PyPI"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 "executorch==$ET_VERSION" -d "$WHEEL_DIR"
  wheels=("$WHEEL_DIR"/executorch-"$ET_VERSION"-*manylinux*aarch64.whl)
  ((${#wheels[@]} == 1)) || die "pip download left no executorch-$ET_VERSION aarch64 wheel in $WHEEL_DIR"
fi
WHEEL="${wheels[0]}"

# 3. Headers and runtime libraries only (the wheel's Python parts are of no use to a C++ program).
#    Extracted into a temporary folder and renamed, so an interrupted run leaves no half tree.
stamp="$ET_DIR/.extracted-$(basename "$WHEEL")"
if [[ ! -f "$stamp" ]]; then
  log "extracting headers and libraries from $(basename "$WHEEL")"
  rm -rf "$ET_DIR" "$ET_DIR.partial"
  "$PY" - "$WHEEL" "$ET_DIR.partial" "${LIBS[@]}" <<'EOF'
import sys, zipfile, pathlib
wheel, dest, libs = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
want_libs = {f"executorch/lib/lib{n}.so" for n in libs}
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("executorch/include/") or n in want_libs]
    absent = sorted(want_libs - set(names))
    if absent:
        sys.exit(f"build_arm64.sh: error: {wheel} lacks {', '.join(absent)}")
    for n in names:
        target = dest / n[len("executorch/"):]
        if n.endswith("/"):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(n))
        if n.endswith(".so"):
            target.chmod(0o755)
EOF
  mv "$ET_DIR.partial" "$ET_DIR"
  touch "$ET_DIR/.extracted-$(basename "$WHEEL")"
fi
for n in "${LIBS[@]}"; do
  # ELF e_machine (offset 18) 183 = EM_AARCH64.
  [[ "$(od -An -j18 -N2 -tu2 "$ET_DIR/lib/lib$n.so" | tr -d ' ')" == 183 ]] \
    || die "$ET_DIR/lib/lib$n.so is not an aarch64 ELF library"
done

# 4. The runner. Rebuilt when runner.cpp or this script is newer than the binary.
if [[ ! -x "$RUNNER" || "$SRC" -nt "$RUNNER" || "${SRC%/*}/sdxt.h" -nt "$RUNNER" || "${BASH_SOURCE[0]}" -nt "$RUNNER" || "$stamp" -nt "$RUNNER" ]]; then
  log "compiling $RUNNER"
  compile_runner "$CXX" "$ET_DIR" "$SRC" "$RUNNER" '$ORIGIN/executorch/lib'
fi

# 5. Check the registrations really landed: every runtime library must be a DT_NEEDED entry.
needed="$(aarch64-linux-gnu-readelf -d "$RUNNER")"
for n in "${LIBS[@]}"; do
  grep -q "\[lib$n.so\]" <<<"$needed" || die "$RUNNER does not load lib$n.so (its registrations would never run)"
done
# 6. libsdxs and sdxs-run (rebuilt when a source is newer), with the same registration check.
[[ -f /usr/include/nlohmann/json.hpp && -f /usr/include/stb/stb_image_write.h ]] || apt_install nlohmann-json3-dev libstb-dev
compile_capi "$CXX" "$ET_DIR" "$OUT" '$ORIGIN/executorch/lib'
needed="$(aarch64-linux-gnu-readelf -d "$OUT/libsdxs.so")"
for n in "${LIBS[@]}"; do
  grep -q "\[lib$n.so\]" <<<"$needed" || die "$OUT/libsdxs.so does not load lib$n.so (its registrations would never run)"
done
log "ok: $RUNNER (run: qemu-aarch64-static -cpu cortex-a76 -L /usr/aarch64-linux-gnu $RUNNER --help)"
