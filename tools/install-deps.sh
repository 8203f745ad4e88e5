#!/usr/bin/env bash
# Install the Debian packages herald needs when they are missing.
#   tools/install-deps.sh build   what building needs
#   tools/install-deps.sh test    that, plus what the test suite needs, and the browser tests'
#                                 npm packages (npm ci in tests/browser, skipped when up to date)
set -euo pipefail
cd "$(dirname "$0")/.."

build_pkgs=(cmake gcc make pkg-config libev-dev liblua5.4-dev libhiredis-dev libssl-dev zlib1g-dev
            lua-cjson lua-cjson-dev)
test_pkgs=(redis-server python3 python3-pytest python3-websockets clang curl chromium)

mode="${1:-build}"
want=("${build_pkgs[@]}")
if [ "$mode" = test ]; then
  want+=("${test_pkgs[@]}")
  # Node.js and npm for the browser tests. A machine may have them from elsewhere than Debian
  # (whose nodejs package then conflicts with Debian's npm): the commands are what count.
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    want+=(nodejs npm)
  fi
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "herald: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The browser tests' npm packages (playwright-core only: it drives Debian's Chromium and downloads
# no browser). npm ci runs again only when package-lock.json changed since the last install.
if [ "$mode" = test ]; then
  lock=tests/browser/package-lock.json
  stamp=tests/browser/node_modules/.herald-lock-sha256
  sum=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    echo "installing the browser tests' npm packages (npm ci in tests/browser)" >&2
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$sum" >"$stamp"
  fi
fi
