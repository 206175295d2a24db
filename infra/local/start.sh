#!/usr/bin/env bash
# Start the local stack: a Ray head with the job server (and, with RAY_WORKER_CPUS, a second Ray node), an
# `mlflow server` (sqlite backend, artifacts in the S3 bucket) and an S3-compatible server (moto). Writes .local-stack/env to source:
#   bash infra/local/start.sh && source .local-stack/env
#   ray job submit --working-dir . -- python jobs/encode_latents.py --input s3://ldm/shards/train ...
#   bash infra/local/stop.sh
#
# What listens where (checked by tests/infra/test_cluster_e2e.py with `ss -ltn`): every port of the stack is
# bound to 127.0.0.1 only. Ray runs in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which
# keeps GCS (RAY_PORT), the raylet, the object manager, the dashboard agent, the runtime-env agent and the Ray
# client server (10001) on loopback; the dashboard and job server listen on 127.0.0.1:DASHBOARD_PORT, MLflow on
# 127.0.0.1:MLFLOW_PORT, S3 on 127.0.0.1:S3_PORT. Ray's token authentication is on: the token lives in
# .local-stack/ray_token (mode 600), and drivers and `ray job submit` read it through RAY_AUTH_TOKEN_PATH in the
# env file; a driver or job submission without it is refused. Every process runs in this script's own process
# group and carries LDM_STACK_ID, by which stop.sh stops exactly this stack (nothing else on the machine),
# workers and job drivers included.
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000), S3_PORT (9000); RAY_CLIENT_PORT (10001);
# DASHBOARD_AGENT_PORT (52365, the head's dashboard agent, which runs submitted jobs); WORKER_AGENT_PORT (52366,
# the second node's agent).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
# a session (and process group) of its own: every service and every process Ray forks stays in it, so stop.sh
# can find them all (Ray's setproctitle clobbers some processes' environment, and orphans lose their parent)
if [ -z "${LDM_STACK_SETSID:-}" ] && [ "${DRY_RUN:-0}" != 1 ] && command -v setsid >/dev/null; then
  LDM_STACK_SETSID=1 exec setsid --wait bash "$0" "$@"
fi
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
STACK="${STACK_DIR:-$ROOT/.local-stack}"
BIN="${VENV:-$ROOT/.venv}/bin"
RAY_PORT="${RAY_PORT:-6379}"; DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"; S3_PORT="${S3_PORT:-9000}"; RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
DASHBOARD_AGENT_PORT="${DASHBOARD_AGENT_PORT:-52365}"
BUCKET="${BUCKET:-ldm}"
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }
mkdir -p "$STACK/logs"
chmod 700 "$STACK"

# one id for every process of this stack (stop.sh finds them by it); a failed start stops what did start
export LDM_STACK_ID="${LDM_STACK_ID:-ldm-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(8))')}"
echo "$LDM_STACK_ID" > "$STACK/stack_id"
ps -o pgid= $$ | tr -d ' ' > "$STACK/pgid"
if [ "${DRY_RUN:-0}" != 1 ]; then
  trap 'rc=$?; if [ "$rc" != 0 ]; then echo "[stack] start failed: stopping what was started" >&2
        STACK_DIR="$STACK" VENV="${BIN%/bin}" bash "$ROOT/infra/local/stop.sh"; fi' EXIT
fi

wait_http() {  # url, name, timeout seconds
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  for _ in $(seq 1 "$3"); do
    # any HTTP answer means up (Ray's job server answers 401 to a request without the token)
    if "$BIN/python" -c "import urllib.request as u, urllib.error as e
try: u.urlopen('$1', timeout=2)
except e.HTTPError: pass" 2>/dev/null; then
      echo "[stack] $2 is up at $1"; return 0; fi
    sleep 1
  done
  echo "[stack] $2 did not come up at $1; see $STACK/logs" >&2; return 1
}

echo "[stack] S3-compatible server (moto) on 127.0.0.1:$S3_PORT"
run bash -c "nohup '$BIN/moto_server' -H 127.0.0.1 -p $S3_PORT > '$STACK/logs/s3.log' 2>&1 &"
wait_http "http://127.0.0.1:$S3_PORT/" "S3" 30

# Ray's token: made once per stack directory, readable by this user only
if [ ! -s "$STACK/ray_token" ]; then
  (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$STACK/ray_token")
fi

cat > "$STACK/env" <<ENV
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_TOKEN_PATH=$STACK/ray_token
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-testing}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_DEFAULT_REGION=\${AWS_DEFAULT_REGION:-us-east-1}
export AWS_REGION=\${AWS_REGION:-us-east-1}
ENV
# shellcheck disable=SC1091
[ "${DRY_RUN:-0}" = 1 ] || source "$STACK/env"

echo "[stack] bucket s3://$BUCKET"
run "$BIN/python" -c "import s3fs; fs = s3fs.S3FileSystem(); fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"

# MLflow's artifacts live in the same S3 bucket (the server proxies them: clients only talk to MLflow), so S3 is
# the stack's only shared storage, as on a real cluster
echo "[stack] mlflow server on 127.0.0.1:$MLFLOW_PORT (sqlite $STACK/mlflow.db, artifacts s3://$BUCKET/mlartifacts)"
run bash -c "MLFLOW_S3_ENDPOINT_URL='http://127.0.0.1:$S3_PORT' nohup '$BIN/mlflow' server \
  --backend-store-uri 'sqlite:///$STACK/mlflow.db' --artifacts-destination 's3://$BUCKET/mlartifacts' \
  --host 127.0.0.1 --port $MLFLOW_PORT --workers 1 > '$STACK/logs/mlflow.log' 2>&1 &"
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "MLflow" 120

# jobs run `python ...` with the head's PATH: put this project's environment first
export PATH="$BIN:$PATH"
echo "[stack] Ray head on 127.0.0.1:$RAY_PORT (token auth), dashboard + job server on 127.0.0.1:$DASHBOARD_PORT"
# The S3 settings are in the head's environment, so every worker and job inherits them (no runtime_env holds a
# secret). Its own short temp dir (unix socket paths must stay short) keeps its logs apart from other Rays.
RAY_TMP="/tmp/ldm-ray-$RAY_PORT"
echo "$RAY_TMP" > "$STACK/ray_temp_dir"
run env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --temp-dir "$RAY_TMP" --ray-client-server-port "$RAY_CLIENT_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" \
  --dashboard-agent-listen-port "$DASHBOARD_AGENT_PORT" \
  --object-store-memory "${RAY_OBJECT_STORE_BYTES:-536870912}" --disable-usage-stats
wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" "Ray job server" 60
# the job server hands each submission to the head's dashboard agent and waits only 10 s for one to register: on a
# busy machine the agent comes up later than the job server ("No available agent to submit job"), so wait for it too
# (it registers right after its HTTP server starts)
wait_http "http://127.0.0.1:$DASHBOARD_AGENT_PORT/api/healthz" "Ray dashboard agent (runs submitted jobs)" 120
# RAY_WORKER_CPUS > 0: a second Ray node on this machine (its own CPUs, the custom resource second_node), joined
# over 127.0.0.1 like the head (infra/local/join_node.py); a job's work can then be placed on two nodes
if [ "${RAY_WORKER_CPUS:-0}" != 0 ]; then
  echo "[stack] second Ray node: $RAY_WORKER_CPUS CPU(s), resource second_node, agent on 127.0.0.1:${WORKER_AGENT_PORT:-52366}"
  run "$BIN/python" "$ROOT/infra/local/join_node.py" --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 \
    --num-cpus "$RAY_WORKER_CPUS" --resources '{"second_node": 1}' --temp-dir "$RAY_TMP" \
    --dashboard-agent-listen-port "${WORKER_AGENT_PORT:-52366}" \
    --object-store-memory "${RAY_WORKER_OBJECT_STORE_BYTES:-268435456}" --disable-usage-stats
fi
echo "[stack] ready. source $STACK/env, then use ray job submit (see README)."
