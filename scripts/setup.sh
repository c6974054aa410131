#!/usr/bin/env bash
# Install what fusefs needs on a fresh Debian 12: FUSE 3 and a toolchain for pyfuse3 (apt),
# then a virtualenv in .venv with fusefs and its test tools (pip). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -E '^WARNING: (Location|Running pip)' || true
.venv/bin/python -c 'import pyfuse3, boto3, diskcache, google.cloud.storage, moto' \
    || { echo "setup: dependency install failed" >&2; exit 1; }
echo "setup: ready (.venv/bin/fusefs)" >&2
