#!/usr/bin/env bash
# Set up .venv with the test extras (transformers is the test oracle) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
