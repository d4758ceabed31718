#!/usr/bin/env bash
# Set up .venv with the test extras (transformers is the test oracle) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The web page's tests drive Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >/dev/null \
    || { echo "installing Chromium (apt-get install chromium) failed" >&2; exit 1; }
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
