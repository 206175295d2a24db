#!/usr/bin/env bash
# Stop what infra/local/start.sh started, and only that: every process whose environment carries this stack's
# LDM_STACK_ID (the Ray head's GCS, raylet, dashboard, monitor, agents, client server, workers and job drivers,
# the mlflow server, the S3 server). Other Ray instances on this machine are left alone. Data under the stack
# directory stays. Exits non-zero, keeping the stack id for a rerun, if anything survived.
set -uo pipefail
cd "$(dirname "$0")/../.."
STACK="${STACK_DIR:-$(pwd)/.local-stack}"
BIN="${VENV:-$(pwd)/.venv}/bin"
[ -f "$STACK/stack_id" ] || { echo "[stack] nothing to stop ($STACK/stack_id not found)"; exit 0; }
"$BIN/python" - "$(cat "$STACK/stack_id")" "$(cat "$STACK/pgid" 2>/dev/null || echo 0)" <<'PY'
import os, sys, psutil
stack_id, pgid = sys.argv[1], int(sys.argv[2])
me = psutil.Process()
spared = {me.pid, *(p.pid for p in me.parents())}  # this script and the shells that called it


def ours():
    found = []
    for p in psutil.process_iter():
        if p.pid in spared:
            continue
        try:
            if p.status() != psutil.STATUS_ZOMBIE and ((pgid > 1 and os.getpgid(p.pid) == pgid)
                                                        or p.environ().get("LDM_STACK_ID") == stack_id):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError):
            pass
    return found


procs = {p.pid: p for p in ours()}
for p in list(procs.values()):  # children too, before their parents die and they become orphans
    try:
        procs.update({c.pid: c for c in p.children(recursive=True) if c.pid not in spared})
    except psutil.NoSuchProcess:
        pass
procs = list(procs.values())
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(procs, timeout=15)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(alive, timeout=5)
left = ours()
if left:
    print(f"[stack] {len(left)} process(es) of stack {stack_id} still running: {[p.pid for p in left]}",
          file=sys.stderr)
    sys.exit(1)
print(f"[stack] stopped stack {stack_id} ({len(procs)} processes)")
PY
rc=$?
if [ "$rc" = 0 ]; then rm -f "$STACK/stack_id" "$STACK/pgid" "$STACK/ray_temp_dir"; fi
exit "$rc"
