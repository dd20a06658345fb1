"""The task runner for per-source work: threads on one machine, Dask or Ray on a cluster."""

from __future__ import annotations

from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

Runner = Literal["threads", "dask", "ray"]


def make_task_runner(runner: Runner, address: str | None, workers: int) -> TaskRunner:
    """threads: a pool of `workers` threads. dask/ray: the cluster at `address`, or a local one of `workers`
    single-threaded processes (each loads the models once)."""
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        # The scheduler always serves HTTP (health, metrics): on a random loopback port, and without the dashboard pages.
        local = dict(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": False},
        )
        return DaskTaskRunner(cluster_kwargs=local)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ValueError("runner: 'ray' needs prefect-ray; install it with: pip install 'vidtune[ray]'") from exc
    if address:
        return RayTaskRunner(address=address)
    local = {"num_cpus": workers, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    return RayTaskRunner(init_kwargs=local)
