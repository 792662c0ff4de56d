#!/usr/bin/env bash
# The GPU check of issue 19, for a fresh CUDA machine (one H200: about 5-8 minutes after the install).
#   bash tools/gpu_check.sh OUT_DIR
# 1. installs what it needs from the package registries (tools/setup.sh --test: system FFmpeg, .venv, vidlang
#    with the test extras; torch's default Linux wheels carry CUDA);
# 2. runs the GPU-marked tests (NVDEC decoding, bf16 and fused attention on the device, GPU transforms);
# 3. runs the GPU benchmarks (`vidlang bench gpu`: NVDEC vs CPU decode, B/16 bf16 tower vs transformers, a B/16
#    training step fed by the NVDEC loader with its data-wait share) and the B/16 tower rows of `bench model`;
# 4. prints one table and writes OUT_DIR/{summary.txt, gpu_bench.json, pytest_gpu.xml, *.log}.
# It stops at the first missing prerequisite (no GPU, no nvidia-smi) with a one-line reason.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: not a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

log "install (tools/setup.sh --test)"
bash tools/setup.sh --test > "$OUT/setup.log" 2>&1 || { echo "gpu_check: setup failed, see $OUT/setup.log" >&2; exit 3; }
PY=.venv/bin/python
$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', ok); sys.exit(0 if ok else 1)" || { echo "gpu_check: torch sees no CUDA device" >&2; exit 4; }

status=0
log "GPU-marked tests"
timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
  > "$OUT/pytest_gpu.log" 2>&1 || status=1
tail -3 "$OUT/pytest_gpu.log"

log "vidlang bench gpu"
timeout 240 $PY -m vidlang.cli bench gpu --device cuda --arch vit_b16 --batch 8 --frames 8 --steps 10 \
  --json "$OUT" > "$OUT/bench_gpu.log" 2>&1 || status=1

log "vidlang bench model (B/16 and B/32 towers on the GPU, fp32)"
timeout 120 $PY -m vidlang.cli bench model --device cuda --arch vit_b32,vit_b16 --batch 4 --frames 8 --iters 5 \
  --skip-blocks > "$OUT/bench_model.log" 2>&1 || status=1

{
  echo "vidlang GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(cat "$OUT/gpu.txt"), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "== GPU-marked tests"; tail -1 "$OUT/pytest_gpu.log"
  echo "== vidlang bench gpu"; grep -v '^bench\|Warning' "$OUT/bench_gpu.log"
  echo "== vidlang bench model (fp32 towers)"; grep -v '^bench\|Warning' "$OUT/bench_model.log"
  echo "total $(( $(date +%s) - START )) s; exit status $status"
} | tee "$OUT/summary.txt"
exit $status
