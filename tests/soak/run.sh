#!/usr/bin/env bash
# The soak and fault test (tests/soak/soak.py): builds herald, then runs it under many clients with
# churn and a Redis restart, and checks exact delivery, descriptors and memory.
#
#   tests/soak/run.sh           reduced form, as ./test.sh runs it: 1,000 clients, about 20 s
#   tests/soak/run.sh --full    10,000 clients, a 30 s warm-up and a 5-minute soak
#   tests/soak/run.sh -n 3000 -d 60 -r 300    any other size (see --help)
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/install-deps.sh test
cmake -S . -B build >/dev/null
cmake --build build -j"$(nproc)" --target herald >/dev/null
HERALD_BIN=${HERALD_BIN:-$PWD/build/herald} exec /usr/bin/python3 tests/soak/soak.py "$@"
