#!/usr/bin/env bash
# arm_ref (C integer kernels, DDQ_SPEC.md Section 5) checks, a few minutes on 2 cores:
#   1. gcc and clang builds with ASan + UBSan, running the C test program (adversarial cases, every
#      error status, argument fuzz, file-reader fuzz);
#   2. an -O3 gcc build (no sanitizers) of the same tests;
#   3. an aarch64 cross build (static) run under qemu-aarch64: NEON path against the scalar path;
#   4. a longer bounded fuzz of the argument and file checks under the sanitizers.
# Needs apt packages: gcc clang make gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user.
set -euo pipefail
cd "$(dirname "$0")/../arm_ref"
build_root=$(mktemp -d)
trap 'rm -rf "$build_root"' EXIT
sanitize="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

echo "== gcc ASan/UBSan"
make --no-print-directory test CC=gcc BUILD="$build_root/gcc-asan" OPT="-O1 -g" SANITIZE="$sanitize"
echo "== clang ASan/UBSan"
make --no-print-directory test CC=clang BUILD="$build_root/clang-asan" OPT="-O2 -g" SANITIZE="$sanitize"
echo "== gcc -O3"
make --no-print-directory test CC=gcc BUILD="$build_root/gcc-O3" OPT="-O3"

echo "== aarch64 under qemu (NEON vs scalar)"
make --no-print-directory test CC=aarch64-linux-gnu-gcc BUILD="$build_root/aarch64" LDFLAGS=-static \
    RUN=qemu-aarch64 | tee "$build_root/aarch64.log"
if ! grep -Eq "cases per path: scalar=[1-9][0-9]* neon=[1-9]" "$build_root/aarch64.log"; then
    echo "the NEON path did not run under qemu-aarch64" >&2
    exit 1
fi

echo "== bounded fuzz (argument and file checks) under ASan/UBSan"
"$build_root/gcc-asan/test_arm_ref" 40000
"$build_root/clang-asan/test_arm_ref" 20000
echo "arm_ref checks passed"
