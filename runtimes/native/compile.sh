# Sourced by build_arm64.sh and build_host.sh: the runtime libraries a model needs, the one way the
# runner is compiled against them, and the Debian packages they install when missing.
# kernels_optimized carries the portable ops too; the quantized kernels run the quantize/dequantize ops
# an int8 program keeps outside the XNNPACK delegate.
LIBS=(executorch executorch_threadpool executorch_kernels_optimized executorch_kernels_quantized executorch_backend_xnnpack)

# compile_runner CXX ET_DIR SRC OUT RPATH: compile SRC into OUT (via OUT.tmp, renamed into place).
# The definitions are those the wheel's libraries were compiled with (share/cmake/executorch-config.cmake):
# without ET_EVENT_TRACER_ENABLED the profiling classes would have another layout. --no-as-needed: the
# kernel and XNNPACK libraries only register themselves from static initializers; the runner references
# none of their symbols, so --as-needed would drop them and every program would fail with
# "Missing operator" / "backend XnnpackBackend is not registered".
compile_runner() {
  local cxx="$1" et_dir="$2" src="$3" out="$4" rpath="$5" link=() n
  for n in "${LIBS[@]}"; do link+=("-l$n"); done
  "$cxx" -std=c++17 -O2 -Wall -Wextra \
    -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL \
    -isystem "$et_dir/include" -isystem "$et_dir/include/executorch/runtime/core/portable_type/c10" \
    "$src" -o "$out.tmp" \
    -L"$et_dir/lib" -Wl,--push-state,--no-as-needed "${link[@]}" -Wl,--pop-state \
    -Wl,-rpath,"$rpath" -lpthread
  mv "$out.tmp" "$out"
}

# Messages name the script that sourced this file.
die() { echo "${0##*/}: error: $*" >&2; exit 1; }
log() { echo "${0##*/}: $*"; }

# apt_install PKG...: install Debian packages (as root, or through sudo); one error line and exit where
# there is no apt-get or no way to become root.
apt_install() {
  local sudo=""
  command -v apt-get >/dev/null || die "missing $* and no apt-get here; install them with your package manager"
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "missing $*; run as root or install: apt-get install $*"
    sudo=sudo
  fi
  log "installing $* (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- libsdxs (sdxs.h) and sdxs-run -----------------------------------------------------------------
CAPI_SRC=(sdxs.cpp sdxs_tokenizer.cpp)
CAPI_HEADERS=(sdxs.h sdxs_tokenizer.h sdxs_noise.h unicode_tables.inc)

# stale OUT DEP...: true when OUT is missing or older than any DEP.
stale() {
  local out="$1" d
  shift
  [[ -e "$out" ]] || return 0
  for d in "$@"; do [[ "$d" -nt "$out" ]] && return 0; done
  return 1
}

# compile_capi CXX ET_DIR OUT_DIR ET_RPATH [FLAGS...]: OUT_DIR/libsdxs.so (RUNPATH ET_RPATH, the ExecuTorch
# libraries, linked --no-as-needed as for the runner) and OUT_DIR/sdxs-run (RUNPATH $ORIGIN). Header-only
# nlohmann/json and stb_image_write come from Debian's nlohmann-json3-dev and libstb-dev, through a
# folder of links so a cross compiler sees those two and nothing else of /usr/include. -ffp-contract=off:
# the noise and the one-step rule round once per operation, as numpy and PyTorch do.
compile_capi() {
  local cxx="$1" et_dir="$2" out="$3" rpath="$4" link=() n s objs=()
  shift 4
  local flags=("$@") here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  for n in "${LIBS[@]}"; do link+=("-l$n"); done
  mkdir -p "$out/obj" "$out/include"
  ln -sfn /usr/include/nlohmann "$out/include/nlohmann"
  ln -sfn /usr/include/stb "$out/include/stb"
  local cflags=(-std=c++17 -O2 -Wall -Wextra -fPIC -ffp-contract=off "${flags[@]}"
    -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL
    -isystem "$out/include" -isystem "$et_dir/include" -isystem "$et_dir/include/executorch/runtime/core/portable_type/c10")
  local deps=("${CAPI_HEADERS[@]/#/$here/}" "$here/compile.sh")
  for s in "${CAPI_SRC[@]}"; do
    objs+=("$out/obj/${s%.cpp}.o")
    if stale "$out/obj/${s%.cpp}.o" "$here/$s" "${deps[@]}"; then
      log "compiling $s -> $out/obj/${s%.cpp}.o"
      "$cxx" "${cflags[@]}" -c "$here/$s" -o "$out/obj/${s%.cpp}.o.tmp"
      mv "$out/obj/${s%.cpp}.o.tmp" "$out/obj/${s%.cpp}.o"
    fi
  done
  if stale "$out/libsdxs.so" "${objs[@]}"; then
    log "linking $out/libsdxs.so"
    "$cxx" -shared "${flags[@]}" "${objs[@]}" -o "$out/libsdxs.so.tmp" -Wl,-soname,libsdxs.so \
      -L"$et_dir/lib" -Wl,--push-state,--no-as-needed "${link[@]}" -Wl,--pop-state -Wl,-rpath,"$rpath" -lpthread
    mv "$out/libsdxs.so.tmp" "$out/libsdxs.so"
  fi
  if stale "$out/sdxs-run" "$here/sdxs_run.cpp" "$here/sdxs.h" "$out/libsdxs.so"; then
    log "compiling $out/sdxs-run"
    "$cxx" "${cflags[@]}" "$here/sdxs_run.cpp" -o "$out/sdxs-run.tmp" -L"$out" -lsdxs -Wl,-rpath,'$ORIGIN'
    mv "$out/sdxs-run.tmp" "$out/sdxs-run"
  fi
}
