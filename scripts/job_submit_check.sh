#!/usr/bin/env bash
# Scripted check: `ray job submit` of pipelines/two_stage.py against a local Ray head.
#
#   scripts/job_submit_check.sh [STORAGE_DIR] [extra pipeline args / dotted overrides ...]
#
# Starts a private head (own temp dir, free ports, dashboard on 127.0.0.1 only, 2 CPUs), submits
# the smoke pipeline with token auth (RAY_AUTH_MODE=token: Ray 2.59+ keeps the token in
# ~/.ray/auth_token), checks the job's summary.json and MLflow store under STORAGE_DIR (not the
# job's temporary copy of the working dir), then stops that head. Only the processes of this
# head are stopped, found by its own temp dir: `ray stop` would stop every Ray on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${KDRAY_VENV_BIN:-$ROOT/.venv/bin}
STORAGE=$(realpath -m "${1:-$(mktemp -d /tmp/kdray-job-XXXXXX)}")
shift || true
mkdir -p "$STORAGE"
RAY_TMP=$(mktemp -d /tmp/kdray-ray-XXXXXX)   # short path: Ray's socket names have a length limit
export RAY_AUTH_MODE=token

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GCS_PORT=$(free_port); DASH_PORT=$(free_port); CLIENT_PORT=$(free_port)
AGENT_PORT=$(free_port); AGENT_GRPC=$(free_port); METRICS_PORT=$(free_port); RTENV_PORT=$(free_port)

stop_head() {
  # This head's processes carry RAY_TMP in their command line; stop them by pid.
  local pids
  pids=$(pgrep -f -- "$RAY_TMP" || true)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(pgrep -f -- "$RAY_TMP" || true)
      [ -z "$pids" ] && break
      sleep 1
    done
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  fi
  rm -rf "$RAY_TMP"
}
trap stop_head EXIT

echo "== ray start --head (temp dir $RAY_TMP, dashboard 127.0.0.1:$DASH_PORT)"
"$BIN/ray" start --head --num-cpus=2 --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
  --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
  --dashboard-agent-grpc-port="$AGENT_GRPC" --metrics-export-port="$METRICS_PORT" \
  --runtime-env-agent-port="$RTENV_PORT" --temp-dir="$RAY_TMP" --disable-usage-stats

echo "== ray job submit (outputs under $STORAGE)"
# The working dir is uploaded (100 MiB limit, .gitignore honoured: data/, runs/, mlruns/ and
# mlflow.db stay behind); --storage makes every output land outside the job's temp copy.
"$BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir . -- \
  "$BIN/python" pipelines/two_stage.py --config configs/smoke.yaml --storage "$STORAGE" "$@"

echo "== check outputs"
"$BIN/python" - "$STORAGE" <<'PY'
import json, sys
from pathlib import Path
storage = Path(sys.argv[1])
summary = json.loads((storage / "runs" / "two_stage" / "summary.json").read_text())
assert summary["pipeline"] == "two_stage" and summary["mlflow_run_id"], summary
assert (storage / "runs" / "smoke" / "mlflow.db").is_file(), "no MLflow store under the storage dir"
print("job summary:", json.dumps(summary["metrics"]))
print("OK: ray job submit ran pipelines/two_stage.py; outputs in", storage)
PY
