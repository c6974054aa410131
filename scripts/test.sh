#!/usr/bin/env bash
# The whole test suite: set up, lint (ruff), type-check (mypy), import circles (none allowed),
# the errno tests on the lowest trio allowed, then every test (pytest) on the trio a fresh
# install resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check fusefs tests scripts
mypy
python scripts/import_cycles.py
[ $# -gt 0 ] || scripts/test-trio-floor.sh   # the lowest trio allowed, on the errno tests
exec python -m pytest -q "$@"
