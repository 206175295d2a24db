#!/usr/bin/env bash
# Refresh infra/local/constraints.txt: the exact versions of everything in the set-up's environment, which
# infra/local/setup.sh installs (so two set-ups install the same thing). Run it in an environment that passed the
# tests (e.g. after `bash infra/local/setup.sh` with UNLOCKED=1 and a green `pytest tests`):
#   bash infra/local/lock.sh            # reads ./.venv
#   VENV=/opt/ldm bash infra/local/lock.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
OUT=infra/local/constraints.txt
{
  echo "# Exact versions the tests passed with; written by infra/local/lock.sh on $(date -u +%Y-%m-%d), used by setup.sh."
  "$VENV/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
    | grep -v -E '^(ldm-ray|pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "[lock] wrote $OUT ($(grep -vc '^#' "$OUT") packages)"
