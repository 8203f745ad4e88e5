#!/usr/bin/env bash
# Build herald and run the whole test suite through ctest: once on a normal build, once under
# AddressSanitizer and UndefinedBehaviorSanitizer, and the fuzz targets for a fixed number of runs.
set -euo pipefail
cd "$(dirname "$0")"
tools/install-deps.sh test
jobs=$(nproc)

echo "== build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs" >/dev/null
echo "== tests"
(cd build && ctest --output-on-failure -j"$jobs")

echo "== tests under ASan + UBSan"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DHERALD_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs" >/dev/null
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j"$jobs")

echo "== fuzz targets"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DHERALD_FUZZ=ON >/dev/null
cmake --build build-fuzz -j"$jobs" --target fuzz_ws fuzz_http fuzz_json fuzz_deflate fuzz_config fuzz_pubsub fuzz_pattern >/dev/null
(cd build-fuzz && ctest --output-on-failure -R '^fuzz_')
