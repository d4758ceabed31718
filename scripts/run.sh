#!/usr/bin/env bash
# The main job: set up .venv (torch==2.13.0 first, then janusvl; see setup.sh) and answer a
# question about a generated picture. Usage: scripts/run.sh [MODEL] [demo options]
# Without MODEL the checkpoint is tiny and random (gibberish answer, no download); MODEL is a
# checkpoint directory or a Hub id such as deepseek-ai/Janus-Pro-1B.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/janusvl demo "$@"
