#!/usr/bin/env bash
# The errno-deciding tests again on the lowest trio pyproject.toml allows (a fresh install gets
# the newest; both must agree): trio 0.25 installed beside .venv, found first through PYTHONPATH
# by the tests and by the mount daemons they start.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/.*"trio>=\([0-9.]*\)".*/\1/p' pyproject.toml)
target=".venv/trio-floor"
if [ ! -f "$target/trio/__init__.py" ]; then
    .venv/bin/python -m pip install -q --no-deps --target "$target" "trio==${floor}.*" >/dev/null
fi
PYTHONPATH="$PWD/$target" .venv/bin/python -c 'import trio; print("trio floor:", trio.__version__)'
PYTHONPATH="$PWD/$target" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_review.py tests/test_core.py tests/test_listing.py -k "not 5000"
