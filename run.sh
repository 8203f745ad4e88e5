#!/usr/bin/env bash
# Build herald and start it on the demo configuration. Extra arguments go to the binary.
set -euo pipefail
cd "$(dirname "$0")"
tools/install-deps.sh build
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target herald >/dev/null
mkdir -p logs
port=8080
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = --port ] && port="${args[$((i + 1))]:-$port}"
done
echo "herald: open http://127.0.0.1:${port}/"
exec build/herald --config herald.lua "$@"
