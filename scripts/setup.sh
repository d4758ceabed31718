#!/usr/bin/env bash
# Create .venv (if missing) and install janusvl into it. Usage: scripts/setup.sh [extra]
# torch is installed first and pinned to 2.13.0: on machines that carry its CPU wheel, pip takes
# it from disk in seconds, where an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, janusvl" || { echo "installing torch or janusvl into .venv failed" >&2; exit 1; }
