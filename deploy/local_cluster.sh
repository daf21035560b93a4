#!/usr/bin/env bash
# Start a one-machine Ray cluster, submit a campaign to it with `ray job submit`, wait for the job,
# and stop the cluster again: the cluster workflow of deploy/README.md without a cloud.
#
#     deploy/local_cluster.sh                                   # the smoke campaign (minutes)
#     deploy/local_cluster.sh --config default --set train.epochs=3
#     NUM_CPUS=8 deploy/local_cluster.sh --config default
#
# Arguments go to orchestrator/run.py (default: --config smoke). Runs land in runs/ as usual.
# Only the Ray processes this script starts are stopped at the end (`ray start --block` is ended
# by its process id), so other Ray clusters on the machine are left alone; `ray stop` would end
# every Ray process of every user it is allowed to signal.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || { echo "no $PYTHON: run 'make test' or 'make demo' once to create the venv" >&2; exit 2; }
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # the job runs it from another dir
RAY=$(dirname "$PYTHON")/ray
NUM_CPUS=${NUM_CPUS:-2}
# Ray's default ports; set these to run beside another Ray on the same machine (keep CLIENT_PORT
# outside 10002-19999, Ray's worker port range).
GCS_PORT=${GCS_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}
AGENT_PORT=${AGENT_PORT:-52365}
ADDRESS=http://127.0.0.1:$DASHBOARD_PORT

# Ray 2.60 turns token authentication on for local clusters; this cluster gets its own token,
# which `ray start`, `ray job submit` and the job's driver all read from the environment.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')}
unset RAY_ADDRESS
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # on Ctrl-C or the end, stop at once (no 30 s drain)

# A temp dir of our own keeps this cluster out of /tmp/ray, where `ray.init()` elsewhere would
# find it and join. Short, because Ray's socket paths must fit in 107 bytes.
RAY_TMP=$(mktemp -d /tmp/cryoal-ray-XXXXXX)
"$RAY" start --head --block --num-cpus="$NUM_CPUS" --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" \
    --temp-dir="$RAY_TMP" --disable-usage-stats >"$RAY_TMP/ray-start.log" 2>&1 &
RAY_PID=$!

stop_cluster() {
    if kill -0 "$RAY_PID" 2>/dev/null; then
        echo "stopping the Ray cluster (pid $RAY_PID)"
        kill -TERM "$RAY_PID"
        wait "$RAY_PID" 2>/dev/null || true
    fi
    rm -rf "$RAY_TMP"
}
trap stop_cluster EXIT

echo "starting Ray (log: $RAY_TMP/ray-start.log) ..."
if ! "$PYTHON" - "$ADDRESS" "$RAY_PID" <<'EOF'
import os, sys, time, urllib.request
address, pid = sys.argv[1], int(sys.argv[2])
request = urllib.request.Request(address + "/api/jobs/",
                                 headers={"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("ray start exited")
    try:
        urllib.request.urlopen(request, timeout=2).read()
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit("the Ray dashboard did not answer within 120 s")
EOF
then
    cat "$RAY_TMP/ray-start.log" >&2
    exit 1
fi
echo "Ray is up: dashboard $ADDRESS"

[ $# -gt 0 ] || set -- --config smoke
# --working-dir uploads the repository (Ray skips what .gitignore lists: .venv/, runs/, pools/);
# the job then runs in that copy, so run directories are given absolute paths. The job's workers
# get Ray Train's faster defaults from where the project keeps them (distributed/connect.py).
RUNTIME_ENV=$("$PYTHON" -c 'import json
from orchestrator.distributed.connect import RAY_ENV_DEFAULTS
print(json.dumps({"excludes": [".git", ".hypothesis", ".pytest_cache"],
                  "env_vars": {"PYTHONUNBUFFERED": "1", **RAY_ENV_DEFAULTS}}))')
"$RAY" job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
    -- "$PYTHON" orchestrator/run.py --set "run_root=$PWD/runs" "$@"
