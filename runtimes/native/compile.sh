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
