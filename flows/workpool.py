"""What a worker needs on the server before it polls, made in one process (infra/worker-entrypoint.sh runs
`python -m vidtune.flows.workpool POOL GPU_SLOTS` before `prefect deploy --all`): the work pool, if missing, as
`prefect work-pool create POOL --type process` makes it, and the `gpu` concurrency limit, if missing. Safe to
repeat: what exists is left as it is (a limit keeps the value its owner set with `prefect gcl update`)."""

from __future__ import annotations

import sys
from pathlib import Path

from vidtune.flows.deployments import find_project_file, load_deployments


def deployed_pools(project_file: Path) -> list[str]:
    """The work pools `project_file`'s deployments use."""
    return sorted({(d.get("work_pool") or {}).get("name") or "" for d in load_deployments(project_file)})


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` with Prefect's default job template unless it exists. Returns
    whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from vidtune.flows.gpu import create_if_missing

    pool = WorkPoolCreate(
        name=name, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template()
    )
    with get_client(sync_client=True) as client:
        return create_if_missing(lambda: client.read_work_pool(name), lambda: client.create_work_pool(pool))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        print("usage: python -m vidtune.flows.workpool POOL GPU_SLOTS (a whole number of at least 1)", file=sys.stderr)
        return 2
    pool, slots = argv[0], int(argv[1])
    used = deployed_pools(find_project_file())
    if pool not in used:  # runs would wait forever for a worker of this pool: say so now
        print(
            f"VIDTUNE_WORK_POOL={pool!r}, but prefect.yaml's deployments use the work pool(s) {used}", file=sys.stderr
        )
        return 2

    from vidtune.flows.gpu import GPU_LIMIT, ensure_concurrency_limit

    if ensure_work_pool(pool):
        print(f"Created work pool {pool!r} (type process)")
    else:
        print(f"work pool {pool!r} exists; left as it is")
    if ensure_concurrency_limit(GPU_LIMIT, slots):
        print(f"Created global concurrency limit {GPU_LIMIT!r} with {slots} slot(s)")
    else:
        print(
            f"global concurrency limit {GPU_LIMIT!r} exists; left as it is (prefect gcl update {GPU_LIMIT} --limit N changes it)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
