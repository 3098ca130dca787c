#!/usr/bin/env bash
# One-shot streaming benchmark on a GPU machine (never run by CI):
#   1. writes 224 px JPEG WebDataset shards on this machine (bench/gpu_stream.py shards; no network needed),
#   2. trains open_clip ViT-B-32 from random init, bf16, streaming, JEST at f = 0.8 through `jestctl run`,
#      while bench/gpu_stream.py monitor samples NVML (utilisation, memory, power, total-energy counter),
#   3. writes $OUT/gpu_stream.json: examples/s, data-wait fraction, GPU utilisation, peak memory, and the
#      NVML energy counter against the integral of the sampled power.
#
# usage: bash bench/gpu_stream.sh [--out DIR] [--steps N] [--batch-size B] [--pool N] [--loader-workers W]
#        bash bench/gpu_stream.sh --cpu-smoke [--out DIR]   # 3 steps of the tiny towers on CPU, 64 px (tests)
# env:   PY=/path/to/python (default: .venv/bin/python, else python3). The interpreter needs torch, open_clip,
#        webdataset, pillow, pynvml; the repo is installed into it (or into .venv-gpu) without network if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=/tmp/jest-gpu-stream
SMOKE=0
STEPS=300
BATCH=256
POOL=200000
WORKERS=8
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke|--dry-run) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --batch-size) BATCH=$2; shift ;;
    --pool) POOL=$2; shift ;;
    --loader-workers) WORKERS=$2; shift ;;
    *) echo "gpu_stream.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

. bench/gpu_python.sh
gpu_python gpu_stream.sh "import torch, open_clip, webdataset, PIL" "torch/open_clip/webdataset/pillow (pip install -e '.[trainer]')"

mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  SIZE=64; STEPS=3; BATCH=16; POOL=240; CURATED=64; EVAL=48; SHARD=80; WORKERS=1
  ARCH=tiny; PRECISION=fp32; ACCEL=cpu; REF_STEPS=2; PROCS=1; IMAGE_SIZE=(--image-size 64)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_stream.sh: no CUDA device (use --cpu-smoke on CPU)" >&2; exit 4; }
  SIZE=224; CURATED=5000; EVAL=2000; SHARD=2000; ARCH=openclip:ViT-B-32; PRECISION=bf16; ACCEL=gpu
  REF_STEPS=50; PROCS=$(nproc); IMAGE_SIZE=()
fi

started=$(date +%s)
"$PY" bench/gpu_stream.py shards --out "$OUT/shards" --pool "$POOL" --curated "$CURATED" --eval "$EVAL" \
  --size "$SIZE" --shard-size "$SHARD" --processes "$PROCS"
echo "gpu_stream.sh: shards written in $(( $(date +%s) - started )) s"
"$PY" bench/gpu_stream.py manifest --urls "$OUT/shards/urls.json" --out "$OUT/job.yaml" --arch "$ARCH" \
  --steps "$STEPS" --batch-size "$BATCH" --filter-ratio 0.8 --loader-workers "$WORKERS" \
  --precision "$PRECISION" --accelerator "$ACCEL" --reference-steps "$REF_STEPS" "${IMAGE_SIZE[@]}"

"$PY" bench/gpu_stream.py monitor --out "$OUT/monitor.json" --interval 0.2 &
MONITOR=$!
trap 'kill -TERM "$MONITOR" 2>/dev/null || true' EXIT
rm -rf "$OUT/run"
set +e
"$BIN/jestctl" run "$OUT/job.yaml" --workdir "$OUT/run" --json "$OUT/summary.json" --no-progress
RC=$?
set -e
kill -TERM "$MONITOR" 2>/dev/null || true
wait "$MONITOR" || true
trap - EXIT

SETTINGS=$(printf '{"arch": "%s", "precision": "%s", "image_px": %s, "steps": %s, "batch_size": %s, "filter_ratio": 0.8, "pool": %s, "loader_workers": %s, "smoke": %s}' \
  "$ARCH" "$PRECISION" "$SIZE" "$STEPS" "$BATCH" "$POOL" "$WORKERS" "$([ "$SMOKE" = 1 ] && echo true || echo false)")
"$PY" bench/gpu_stream.py report --summary "$OUT/summary.json" --monitor "$OUT/monitor.json" \
  --checkpoints "$OUT/run/checkpoints" --settings "$SETTINGS" --out "$OUT/gpu_stream.json"
echo "gpu_stream.sh: wrote $OUT/gpu_stream.json (jestctl run exit $RC)"
exit "$RC"
