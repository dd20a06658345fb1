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

wait_for_server
# The pool and the `gpu` limit, each only if missing (an existing limit keeps the value its owner set with
# `prefect gcl update gpu --limit N`); refuses a pool prefect.yaml's deployments do not use. One process, not
# four `prefect` commands: each of those spends seconds importing Prefect.
python -m vidtune.flows.workpool "$pool" "$gpu_slots"
prefect deploy --all
exec prefect worker start --pool "$pool" --type process --limit "$worker_limit"
