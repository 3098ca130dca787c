#!/usr/bin/env bash
# Build (once) the virtual environment the XLA tests run the trainer in, and print its python's path.
#
#   bash hack/xla/venv.sh            # -> /path/to/repo/.venv-xla/bin/python  (the only line on stdout)
#
# Why a second environment: torch_xla is built against one torch release (torch_xla 2.9.0 <-> torch 2.9.0),
# while the project's main .venv carries a newer torch. This one holds hack/xla/requirements.txt plus the
# working tree's operator/ and trainer_image/ on its path (a .pth file: what `pip install --no-deps -e .`
# gives, without rebuilding the optional C extension in the source tree, where the main .venv's running
# processes may have it loaded).
#
# Idempotent: a stamp inside the environment records the hash of requirements.txt, the repo path and the
# interpreter's version; when it matches, nothing is installed and the script only prints the path.
# A different hash re-runs the installs into the same environment (the pins converge it); a different
# interpreter version, or a broken environment, recreates it. Concurrent callers wait on a lock.
#
# Environment:
#   PYTHON                    interpreter to build from (default python3; torch_xla 2.9 has wheels for 3.10-3.13)
#   JEST_XLA_VENV             where to build (default <repo>/.venv-xla)
#   JEST_XLA_TORCH_INDEX_URL  take torch from this index first, e.g. https://download.pytorch.org/whl/cpu
#                             (the CPU-only build, ~0.2 GB instead of PyPI's ~3 GB of CUDA libraries);
#                             default: torch from PyPI like everything else
# All pip output goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${JEST_XLA_VENV:-$root/.venv-xla}
requirements=$here/requirements.txt
base_python=${PYTHON:-python3}
torch_index=${JEST_XLA_TORCH_INDEX_URL:-}

py_version=$("$base_python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
key=$( { cat "$requirements"; echo "root=$root"; echo "python=$py_version"; \
         echo "torch_index=$torch_index"; } | sha256sum | cut -c1-32)
stamp=$venv/.jest-xla-stamp
python=$venv/bin/python

if [[ -f $stamp && $(cat "$stamp") == "$key" && -x $python ]]; then
  echo "$python"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
# another caller may have finished the build while this one waited
if [[ -f $stamp && $(cat "$stamp") == "$key" && -x $python ]]; then
  echo "$python"
  exit 0
fi

{
  if [[ -x $python ]] && [[ $("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) == "$py_version" ]]; then
    echo "venv.sh: updating $venv (requirements changed)"
  else
    echo "venv.sh: creating $venv with $base_python ($py_version)"
    rm -rf "$venv"
    "$base_python" -m venv "$venv"
  fi
  rm -f "$stamp"
  start=$SECONDS
  "$python" -m pip install -q --disable-pip-version-check --upgrade pip
  if [[ -n $torch_index ]]; then
    torch_pin=$(grep -E '^torch==' "$requirements")
    "$python" -m pip install -q --disable-pip-version-check --index-url "$torch_index" "$torch_pin"
  fi
  "$python" -m pip install -q --disable-pip-version-check -r "$requirements"
  # the project from the working tree, without its dependencies (the main .venv's torch pin would win)
  site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n%s\n' "$root/operator" "$root/trainer_image" > "$site/jest-operator-src.pth"
  PJRT_DEVICE=CPU "$python" -c 'import torch, torch_xla, jest_trainer.train; print("venv.sh: torch", torch.__version__, "torch_xla", torch_xla.__version__, "device", torch_xla.device())'
  echo "venv.sh: built in $((SECONDS - start)) s"
} >&2

echo "$key" > "$stamp"
echo "$python"
