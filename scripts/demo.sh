#!/usr/bin/env bash
# Set up, then run the demo: an embedded S3-compatible server seeded with sample files is
# mounted with fusefs, read through (cold, then warm), stats are shown, and it is unmounted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m fusefs.demo "$@"
