#!/usr/bin/env bash
# Install what fusefs needs on a fresh Debian 12: FUSE 3 and a toolchain for pyfuse3 (apt),
# then a virtualenv in .venv with fusefs and its test tools (pip), and Azurite (the Azure Blob
# emulator the tests use: nodejs and npm from apt, azurite from npm into .node/) and PyPI's
# torch CPU build for the DataLoader test. Safe to run again; set FUSEFS_NO_AZURITE=1 to skip
# Azurite, FUSEFS_NO_TORCH=1 to skip torch (their tests are then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
updated=""
apt_install() {  # apt_install PKG...: install those not installed yet
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "setup: installing ${missing[*]}" >&2
    [ -n "$updated" ] || { $SUDO apt-get update -qq && updated=1; }
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}
apt_install fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# programs tests/test_programs.py runs on real mounts (each test skips if its program is missing)
apt_install sqlite3 rsync git vim || echo "setup: test programs not installed; their tests will be skipped" >&2
if [ -z "${FUSEFS_NO_AZURITE:-}" ] && ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm || echo "setup: nodejs/npm not installed; the Azure tests will be skipped" >&2
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -E '^WARNING: (Location|Running pip)' || true
.venv/bin/python -c 'import pyfuse3, boto3, diskcache, google.cloud.storage, azure.storage.blob, moto' \
    || { echo "setup: dependency install failed" >&2; exit 1; }
# PyTorch's CPU build, for the torch DataLoader test only (never a dependency of fusefs): the
# explicit "+cpu" takes the wheel that lies on these machines' disk (pip's find-links) and never
# a CUDA build of several GB from the index; where it is missing the test is skipped, with why.
# Set FUSEFS_NO_TORCH=1 to skip it.
if [ -z "${FUSEFS_NO_TORCH:-}" ] && ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0+cpu (for the DataLoader test)" >&2
    .venv/bin/python -m pip install -q 'torch==2.13.0+cpu' 2>&1 \
        | grep -v -E '^WARNING: (Location|Running pip)' >&2 || true
    .venv/bin/python -c 'import torch' >/dev/null 2>&1 \
        || echo "setup: torch not installed; the torch DataLoader test will be skipped" >&2
fi
if [ -z "${FUSEFS_NO_AZURITE:-}" ] && command -v npm >/dev/null 2>&1 \
        && [ ! -x .node/node_modules/.bin/azurite-blob ]; then
    echo "setup: installing azurite (npm) into .node/" >&2
    mkdir -p .node
    npm install --prefix .node --no-audit --no-fund --loglevel=error --no-save azurite@3 >/dev/null \
        || echo "setup: azurite install failed; the Azure tests will be skipped" >&2
fi
echo "setup: ready (.venv/bin/fusefs)" >&2
