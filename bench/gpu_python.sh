# Sourced by bench/gpu_stream.sh and bench/gpu_configs.sh: pick the interpreter a one-shot GPU script runs in.
#
#   gpu_python <script name> <python import check> <hint>    # sets PY and BIN, or exits 3 with the hint
#
# Why: a lent GPU machine has torch and the trainer's packages but no network, and jestctl launches the
# `jest-trainer` (and `torchrun`) console scripts, so the checkout must be installed into the interpreter.
# PY defaults to .venv/bin/python, else python3; when its bin directory lacks jestctl or jest-trainer, the repo
# is installed (no deps, no network) into .venv-gpu over the system site-packages.
gpu_python() {
  local name=$1 check=$2 hint=$3
  if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
  fi
  BIN=$(dirname "$PY")
  if [ ! -x "$BIN/jestctl" ] || [ ! -x "$BIN/jest-trainer" ]; then
    "$PY" -m venv --system-site-packages .venv-gpu
    PY=.venv-gpu/bin/python
    BIN=.venv-gpu/bin
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
      || { echo "$name: cannot install the repo into .venv-gpu" >&2; exit 3; }
  fi
  "$PY" -c "$check" || { echo "$name: $PY lacks $hint" >&2; exit 3; }
}
