#!/usr/bin/env bash
# Stop what infra/local/start.sh started: its Ray head (only that one: other Ray instances on this machine,
# e.g. an embedded ray.init(), are left alone), the mlflow server and the S3 server. Data under the stack
# directory stays.
set -uo pipefail
cd "$(dirname "$0")/../.."
STACK="${STACK_DIR:-$(pwd)/.local-stack}"
BIN="${VENV:-$(pwd)/.venv}/bin"
if [ -f "$STACK/ray_temp_dir" ]; then
  "$BIN/python" - "$(cat "$STACK/ray_temp_dir")" <<'PY'
import sys, psutil
temp = sys.argv[1]
roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in (p.info["cmdline"] or []))]
procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
for p in procs.values():
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(list(procs.values()), timeout=15)
for p in alive:
    p.kill()
print(f"[stack] Ray head stopped ({len(procs)} processes)")
PY
  rm -f "$STACK/ray_temp_dir"
fi
for name in mlflow s3; do
  if [ -f "$STACK/$name.pid" ]; then
    pid=$(cat "$STACK/$name.pid")
    pkill -TERM -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null && echo "[stack] $name stopped (pid $pid)"
    rm -f "$STACK/$name.pid"
  fi
done
exit 0
