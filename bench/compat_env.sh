#!/usr/bin/env bash
# The GPU machine's versions on the CPU: build .venv-compat (Python 3.12, torch 2.11.0, triton 3.6.0,
# numpy < 2.3: Triton 3.6's interpreter fails with numpy >= 2.3) and run in it the Triton interpreter tests
# and the sm_90 ahead-of-time compile tests (with ptxas -v: no register spills).
#
#   bash bench/compat_env.sh             # build once (~5 GB: torch's CUDA wheels), then test
#   COMPAT_PYTHON=/path/python3.12 ...   # the interpreter to build it from (default: python3.12 on PATH or pyenv)
#   COMPAT_VENV=DIR ...                  # where (default: .venv-compat in the repository, ignored by git)
# Extra arguments go to pytest (e.g. -k compile).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${COMPAT_VENV:-$ROOT/.venv-compat}
TORCH=2.11.0
TRITON=3.6.0

find_python() {
  local cand
  for cand in "${COMPAT_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$cand" ] || continue
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  echo "compat_env: no Python 3.12 found (set COMPAT_PYTHON)" >&2
  return 1
}

ready() {
  "$VENV/bin/python" - "$TORCH" "$TRITON" <<'EOF' 2>/dev/null
import sys
import numpy, torch, triton
assert torch.__version__.split("+")[0] == sys.argv[1] and triton.__version__ == sys.argv[2], "versions"
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 3), "numpy"
EOF
}

if ! ready; then
  PY=$(find_python)
  echo "compat_env: building $VENV from $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$TORCH" "triton==$TRITON" "numpy<2.3" pytest ninja
  ready || { echo "compat_env: $VENV does not have the expected versions" >&2; exit 1; }
fi
"$VENV/bin/python" -c 'import sys, torch, triton, numpy; print("compat_env: python", sys.version.split()[0],
  "torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'

cd "$ROOT"
# The interpreter tests (kernels, CEMLoss parity, launch count) and the ahead-of-time sm_90 compile tests.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CEM_FAST_CACHE=${CEM_FAST_CACHE:-$VENV/cem-fast-cache}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
  -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
  tests/test_triton_backend.py tests/test_launch_count.py tests/test_loss_triton.py "$@"
