#!/usr/bin/env bash
# Create the environment for vidlang on a fresh Debian machine (run as root, Python >= 3.10).
#   bash tools/setup.sh            # runtime: system FFmpeg + .venv with vidlang
#   bash tools/setup.sh --test     # the same plus the test extras (pytest, ruff)
# Idempotent: re-running reuses what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}

# torchcodec loads FFmpeg's shared libraries from the system; PyAV and decord bundle their own.
if ! ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, as a matched pair (a mismatched torchvision breaks Lightning and transformers imports).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c "import vidlang, torch, torchcodec; print('vidlang', vidlang.__version__, '| torch', torch.__version__)"
