#!/usr/bin/env bash
# Build the sanitised fuzz harness of the runner's untrusted-input code (sdxt.h: the SDXT tensor reader
# and the --serve request parser) into build/fuzz/fuzz_sdxt, with AddressSanitizer (out-of-bounds
# accesses, leaks) and UndefinedBehaviorSanitizer (overflow, misaligned loads), every finding fatal.
# Needs no ExecuTorch: rebuilt only when sdxt.h, fuzz_sdxt.cpp or this script is newer.
#
# Usage: runtimes/native/build_fuzz.sh        (tests/test_fuzz.py runs it)
# Env:   CXX (default g++; clang++ works too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CXX="${CXX:-g++}"
SRC="$ROOT/runtimes/native/fuzz_sdxt.cpp"
HDR="$ROOT/runtimes/native/sdxt.h"
OUT="$ROOT/build/fuzz/fuzz_sdxt"
command -v "$CXX" >/dev/null || { echo "${0##*/}: error: no C++ compiler '$CXX'" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
if [[ ! -x "$OUT" || "$SRC" -nt "$OUT" || "$HDR" -nt "$OUT" || "${BASH_SOURCE[0]}" -nt "$OUT" ]]; then
  tmp="$OUT.tmp-$$"
  "$CXX" -std=c++17 -O1 -g -Wall -Wextra -Werror -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=all "$SRC" -o "$tmp"
  mv "$tmp" "$OUT"
fi
echo "$OUT"
