#!/usr/bin/env bash
# arm_ref (C integer kernels, DDQ_SPEC.md Section 5) checks, a few minutes on 2 cores:
#   1. gcc and clang builds with ASan + UBSan, running the C test program (adversarial cases, every
#      error status, argument fuzz, file-reader fuzz);
#   2. an -O3 gcc build (no sanitizers) of the same tests;
#   3. aarch64 cross builds (static) with gcc and with clang, run under qemu-aarch64: NEON path against the
#      scalar path (the two compilers need different target attributes for the dot-product path);
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

aarch64_under_qemu() {  # $1: build name, $2: compiler command
    make --no-print-directory test CC="$2" BUILD="$build_root/$1" LDFLAGS=-static RUN=qemu-aarch64 \
        | tee "$build_root/$1.log"
    if ! grep -Eq "cases per path: scalar=[1-9][0-9]* neon=[1-9]" "$build_root/$1.log"; then
        echo "the NEON path of the $1 build did not run under qemu-aarch64" >&2
        exit 1
    fi
}
echo "== aarch64 gcc under qemu (NEON vs scalar)"
aarch64_under_qemu aarch64-gcc aarch64-linux-gnu-gcc
echo "== aarch64 clang under qemu (NEON vs scalar)"
aarch64_under_qemu aarch64-clang "clang --target=aarch64-linux-gnu"

echo "== bounded fuzz (argument and file checks) under ASan/UBSan"
"$build_root/gcc-asan/test_arm_ref" 40000
"$build_root/clang-asan/test_arm_ref" 20000
echo "arm_ref checks passed"
