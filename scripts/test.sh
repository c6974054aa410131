#!/usr/bin/env bash
# The whole test suite: set up, lint (ruff), type-check (mypy), then every test (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check fusefs tests scripts
mypy
exec python -m pytest -q "$@"
