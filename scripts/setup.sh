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
# Debian packages, each installed once (skipped when on PATH); apt needs root, as in CI, else sudo.
#   bwrap: bubblewrap, the jail evaluation runs generated code in (training/eval/sandbox.py).
#   --dev adds chromium + chromedriver: tests/e2e/test_playground_browser.py drives a real one.
apt_install() {
  local missing=() pkg cmd
  while [ $# -gt 0 ]; do
    cmd="$1" pkg="$2"; shift 2
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if ! sudo -n true 2>/dev/null; then
      echo "note: cannot apt-get install ${missing[*]} without root; evaluation needs bubblewrap (or --unsafe-sandbox)" >&2
      return 0
    fi
    SUDO="sudo -n"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
}
if [ "${1:-}" = "--dev" ]; then
  apt_install bwrap bubblewrap chromium chromium chromedriver chromium-driver
  command -v bwrap >/dev/null 2>&1 || { echo "error: the tests need bubblewrap (apt-get install bubblewrap)" >&2; exit 1; }
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  apt_install bwrap bubblewrap
  .venv/bin/python -m pip install -q -e .
fi
