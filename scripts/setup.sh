#!/usr/bin/env bash
# Create .venv and install the project. `--dev` adds the test tools.
# torch goes in first, pinned: pip then keeps it, and never pulls a multi-GB CUDA build
# onto a CPU machine. On a GPU machine, install a CUDA build of torch 2.13.0 before this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  # tests/e2e/test_playground_browser.py drives a real headless Chromium: Debian's chromium + chromium-driver.
  # Installed once (skipped when both are on PATH); apt needs root, as in CI, else sudo.
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
  fi
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  .venv/bin/python -m pip install -q -e .
fi
