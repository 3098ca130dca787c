#!/usr/bin/env bash
# The advertised GPU configurations in one go, on a GPU machine (never run by CI):
#   1. the quickstart (examples/quickstart.yaml) through `jestctl run` on CUDA, once per loss (sigmoid, softmax):
#      bf16, one pod with numProcPerNode = the GPU count (torchrun when > 1), energy.backend nvml, selection at
#      b = 1024 (global) and filter ratio 0.8, so B = 5b = 5120 candidates per step;
#   2. during each run bench/gpu_configs.py monitor reads every board's NVML total-energy counter (measured) and
#      power (integrated), to compare the two over the same window (goal: within 5%);
#   3. times the selection arithmetic (select_batch "jest", both losses) on the GPU at one rank's shape
#      (B/N, b/N) and reports it as a fraction of the run's step time;
#   4. writes $OUT/gpu_configs.json (and per loss: summary.json, monitor.json, run/progress.json, run/logs).
#
# usage: bash bench/gpu_configs.sh [--out DIR] [--steps N] [--batch-size B]
#        bash bench/gpu_configs.sh --cpu-smoke [--out DIR] [--steps N]   # the same on CPU: 2 torchrun workers,
#                                                                         # bf16, a few steps (tests)
# env:   PY=/path/to/python (default: .venv/bin/python, else python3). The interpreter needs torch, pynvml (package
#        nvidia-ml-py) and the trainer's dependencies; the repo is installed into it (or into .venv-gpu, without
#        network) when jestctl is missing.
# exit:  0 when every run Succeeded, 1 when one did not, 2 bad arguments, 3 missing packages, 4 no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=/tmp/jest-gpu-configs
SMOKE=0
STEPS=
BATCH=1024
LOSSES=(sigmoid softmax)
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke|--dry-run) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --batch-size) BATCH=$2; shift ;;
    *) echo "gpu_configs.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

. bench/gpu_python.sh
gpu_python gpu_configs.sh "import torch, jest_trainer, jest_operator" "torch or the repo (pip install -e '.[trainer]')"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "$SMOKE" = 1 ]; then
  # CPU stand-in: the same commands, 2 torchrun workers (gloo), tiny shapes; NVML is absent, energy modelled
  STEPS=${STEPS:-3}; BATCH=64; PROCS=2; DEVICE=cpu; REPEATS=3; WARMUP=1; BACKEND=auto; SETTLE=0.2
  ACCEL=(--set spec.accelerator.type=cpu)
  EXTRA=(--set spec.training.reference.train.steps=2 --set spec.training.eval.intervalSteps="$STEPS"
         --set spec.training.checkpoint.intervalSteps="$STEPS")
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_configs.sh: no CUDA device (use --cpu-smoke on CPU)" >&2; exit 4; }
  "$PY" -c "import pynvml" \
    || { echo "gpu_configs.sh: $PY lacks pynvml (pip install nvidia-ml-py)" >&2; exit 3; }
  STEPS=${STEPS:-1000}; PROCS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  DEVICE=cuda; REPEATS=30; WARMUP=5; BACKEND=nvml; SETTLE=3
  ACCEL=(--set spec.accelerator.type=gpu --set spec.accelerator.count="$PROCS")
  EXTRA=()
fi
SETS=("${ACCEL[@]}" "${EXTRA[@]}"
      --set spec.numNodes=1 --set spec.numProcPerNode="$PROCS" --set spec.training.precision=bf16
      --set spec.training.selection.batchSize="$BATCH" --set spec.training.selection.filterRatio=0.8
      --set spec.training.steps="$STEPS" --set spec.energy.backend="$BACKEND" --set spec.runPolicy.backoffLimit=0)
SUPER=$(( BATCH * 5 ))
echo "gpu_configs.sh: $PROCS process(es) on $DEVICE, b = $BATCH, B = $SUPER, $STEPS steps, losses ${LOSSES[*]}"

for loss in "${LOSSES[@]}"; do  # fail fast on a configuration the API rejects (e.g. b not divisible by N x chunks)
  "$BIN/jestctl" validate examples/quickstart.yaml "${SETS[@]}" --set spec.training.selection.loss="$loss" >/dev/null \
    || { echo "gpu_configs.sh: the $loss configuration is invalid for $PROCS processes" >&2; exit 2; }
done

MONITOR=
trap '[ -n "$MONITOR" ] && kill -TERM "$MONITOR" 2>/dev/null || true' EXIT
for loss in "${LOSSES[@]}"; do
  mkdir -p "$OUT/$loss"
  rm -rf "$OUT/$loss/run"
  "$PY" bench/gpu_configs.py monitor --out "$OUT/$loss/monitor.json" --devices "$PROCS" --interval 0.1 &
  MONITOR=$!
  sleep "$SETTLE"  # the monitor finds its boards and takes its first reading before the run starts
  started=$(date +%s)
  set +e
  "$BIN/jestctl" run examples/quickstart.yaml "${SETS[@]}" --set spec.training.selection.loss="$loss" \
    --workdir "$OUT/$loss/run" --json "$OUT/$loss/summary.json" --no-progress
  rc=$?
  set -e
  kill -TERM "$MONITOR" 2>/dev/null || true
  wait "$MONITOR" || true
  MONITOR=
  echo "gpu_configs.sh: $loss run exit $rc in $(( $(date +%s) - started )) s"
done
trap - EXIT

"$PY" bench/gpu_configs.py arithmetic --out "$OUT/arithmetic.json" --device "$DEVICE" --super-batch "$SUPER" \
  --batch-size "$BATCH" --world-size "$PROCS" --losses "$(IFS=,; echo "${LOSSES[*]}")" --repeats "$REPEATS" \
  --warmup "$WARMUP"

SETTINGS=$(printf '{"device": "%s", "processes": %s, "precision": "bf16", "steps": %s, "batch_size": %s, "super_batch": %s, "filter_ratio": 0.8, "energy_backend": "%s", "smoke": %s}' \
  "$DEVICE" "$PROCS" "$STEPS" "$BATCH" "$SUPER" "$BACKEND" "$([ "$SMOKE" = 1 ] && echo true || echo false)")
set +e
"$PY" bench/gpu_configs.py report --out-dir "$OUT" --out "$OUT/gpu_configs.json" --batch-size "$BATCH" \
  --losses "$(IFS=,; echo "${LOSSES[*]}")" --settings "$SETTINGS"
RC=$?
set -e
echo "gpu_configs.sh: wrote $OUT/gpu_configs.json (every run succeeded: $([ "$RC" = 0 ] && echo yes || echo no))"
exit "$RC"
