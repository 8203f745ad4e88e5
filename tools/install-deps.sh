#!/usr/bin/env bash
# Install the Debian packages herald needs when they are missing.
#   tools/install-deps.sh build   what building needs
#   tools/install-deps.sh test    that, plus what the test suite needs
set -euo pipefail

build_pkgs=(cmake gcc make pkg-config libev-dev liblua5.4-dev libhiredis-dev libssl-dev zlib1g-dev
            lua-cjson lua-cjson-dev)
test_pkgs=(redis-server python3 python3-pytest python3-websockets clang curl)

want=("${build_pkgs[@]}")
[ "${1:-build}" = test ] && want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "herald: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
