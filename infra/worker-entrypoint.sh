#!/usr/bin/env bash
# Worker start-up, safe to repeat: wait for the Prefect server, make sure the work pool, the `gpu` concurrency
# limit and the deployments of prefect.yaml exist, then poll the pool.
set -euo pipefail

pool="${VIDTUNE_WORK_POOL:-vidtune}"
gpu_slots="${VIDTUNE_GPU_SLOTS:-1}"
worker_limit="${VIDTUNE_WORKER_LIMIT:-1}"
export PREFECT_CLI_PROMPT=false  # never wait on a question nobody can answer
cd "$(dirname "$0")/.."          # the project root, where prefect.yaml lives

wait_for_server() {
    local health="${PREFECT_API_URL:?PREFECT_API_URL is not set}"
    health="${health%/}/health"
    for _ in $(seq 1 60); do
        if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$health" 2>/dev/null; then
            return 0
        fi
        echo "waiting for the Prefect server at $health"
        sleep 2
    done
    echo "the Prefect server at $health did not answer in 2 minutes" >&2
    return 1
}

# Runs for a pool name prefect.yaml does not use would wait forever: say so now instead.
check_pool_is_deployed() {
    python - "$pool" <<'PY'
import sys, yaml
pool = sys.argv[1]
used = sorted({(d.get("work_pool") or {}).get("name") or "" for d in yaml.safe_load(open("prefect.yaml"))["deployments"]})
if pool not in used:
    sys.exit(f"VIDTUNE_WORK_POOL={pool!r}, but prefect.yaml's deployments use the work pool(s) {used}")
PY
}

# `inspect` first so that a restart changes nothing; `inspect` again if another worker created it meanwhile.
ensure_work_pool() {
    prefect work-pool inspect "$pool" >/dev/null 2>&1 && return 0
    prefect work-pool create "$pool" --type process || prefect work-pool inspect "$pool" >/dev/null
}

# An existing limit keeps the value its owner set (`prefect gcl update gpu --limit N`).
ensure_gpu_limit() {
    prefect gcl inspect gpu >/dev/null 2>&1 && return 0
    prefect gcl create gpu --limit "$gpu_slots" || prefect gcl inspect gpu >/dev/null
}

wait_for_server
check_pool_is_deployed
ensure_work_pool
ensure_gpu_limit
prefect deploy --all
exec prefect worker start --pool "$pool" --type process --limit "$worker_limit"
