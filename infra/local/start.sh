#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: a Ray head with the job server, an `mlflow server` (sqlite backend +
# local artifact store) and an S3-compatible server (moto). Writes .local-stack/env to source:
#   bash infra/local/start.sh && source .local-stack/env
#   ray job submit --working-dir . -- python jobs/encode_latents.py --input s3://ldm/shards/train ...
#   bash infra/local/stop.sh
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000), S3_PORT (9000). Nothing listens beyond
# 127.0.0.1. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
STACK="${STACK_DIR:-$ROOT/.local-stack}"
BIN="${VENV:-$ROOT/.venv}/bin"
RAY_PORT="${RAY_PORT:-6379}"; DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"; S3_PORT="${S3_PORT:-9000}"
BUCKET="${BUCKET:-ldm}"
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }
mkdir -p "$STACK/logs" "$STACK/mlartifacts"

wait_http() {  # url, name, timeout seconds
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  for _ in $(seq 1 "$3"); do
    if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$1', timeout=2)" 2>/dev/null; then
      echo "[stack] $2 is up at $1"; return 0; fi
    sleep 1
  done
  echo "[stack] $2 did not come up at $1; see $STACK/logs" >&2; return 1
}

echo "[stack] S3-compatible server (moto) on 127.0.0.1:$S3_PORT"
run bash -c "nohup '$BIN/moto_server' -H 127.0.0.1 -p $S3_PORT > '$STACK/logs/s3.log' 2>&1 & echo \$! > '$STACK/s3.pid'"
wait_http "http://127.0.0.1:$S3_PORT/" "S3" 30

echo "[stack] mlflow server on 127.0.0.1:$MLFLOW_PORT (sqlite $STACK/mlflow.db, artifacts $STACK/mlartifacts)"
run bash -c "nohup '$BIN/mlflow' server --backend-store-uri 'sqlite:///$STACK/mlflow.db' \
  --artifacts-destination '$STACK/mlartifacts' --host 127.0.0.1 --port $MLFLOW_PORT --workers 1 \
  > '$STACK/logs/mlflow.log' 2>&1 & echo \$! > '$STACK/mlflow.pid'"
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "MLflow" 120

cat > "$STACK/env" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-testing}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_DEFAULT_REGION=\${AWS_DEFAULT_REGION:-us-east-1}
export AWS_REGION=\${AWS_REGION:-us-east-1}
export RAY_AUTH_MODE=disabled
ENV
# shellcheck disable=SC1091
[ "${DRY_RUN:-0}" = 1 ] || source "$STACK/env"

echo "[stack] bucket s3://$BUCKET"
run "$BIN/python" -c "import s3fs; fs = s3fs.S3FileSystem(); fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"

# jobs run `python ...` with the head's PATH: put this project's environment first
export PATH="$BIN:$PATH"
echo "[stack] Ray head on 127.0.0.1:$RAY_PORT, dashboard + job server on 127.0.0.1:$DASHBOARD_PORT"
# The S3 settings go into the head's environment so every worker (and job) inherits them; token auth is off
# because an earlier embedded ray.init() on this machine would otherwise switch it on (DESIGN.md).
# its own short temp dir (unix socket paths must stay short) lets stop.sh stop exactly this head
RAY_TMP="/tmp/ldm-ray-$RAY_PORT"
echo "$RAY_TMP" > "$STACK/ray_temp_dir"
run env RAY_AUTH_MODE=disabled "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --temp-dir "$RAY_TMP" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" \
  --object-store-memory "${RAY_OBJECT_STORE_BYTES:-536870912}" --disable-usage-stats
wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" "Ray job server" 60
echo "[stack] ready. source $STACK/env, then use ray job submit (see README)."
