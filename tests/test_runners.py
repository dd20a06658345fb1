"""The local clusters the curate flow starts bind to loopback only and serve no dashboard (README: scaling out)."""

from __future__ import annotations

import urllib.error
import urllib.request

import psutil
import pytest

from vidtune.flows.runners import make_task_runner


def _listening(process: psutil.Process) -> list[str]:
    return [conn.laddr.ip for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_local_dask_cluster_listens_on_loopback_only_without_a_dashboard():
    pytest.importorskip("prefect_dask")
    with make_task_runner("dask", None, workers=1) as runner:
        client = runner.client
        assert client.wait_for_workers(1, timeout=60) is None
        port = client.scheduler_info()["services"]["dashboard"]  # distributed's name for its HTTP server
        assert (
            _get(f"http://127.0.0.1:{port}/health") == 200 and _get(f"http://127.0.0.1:{port}/status") == 404
        )  # no dashboard page
        me = psutil.Process()
        addresses = _listening(me) + [ip for child in me.children(recursive=True) for ip in _listening(child)]
        assert addresses and set(addresses) == {"127.0.0.1"}, addresses
