"""One GPU job at a time: a Prefect global concurrency limit held while a flow uses the GPU (finetune: from
precompute to evaluation; evaluate on its own), so two runs scheduled together queue instead of sharing a GPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field

GPU_LIMIT = "gpu"  # the limit's name; `prefect gcl update gpu --limit N` for a box with N GPUs


class GpuSlotParams(BaseModel):
    """The parameter of every flow that uses the GPU (finetune, evaluate)."""

    gpu_limit: str | None = Field(
        GPU_LIMIT,
        description="Prefect global concurrency limit held while the GPU is in use (null: none; inside finetune, finetune's own covers evaluation).",
    )


def create_if_missing(read: Callable[[], object], create: Callable[[], object]) -> bool:
    """Call `create` unless `read` finds the Prefect object (raising ObjectNotFound when it does not). Returns
    whether this call created it; losing a race to another process that created it meanwhile counts as found."""
    try:
        read()
        return False
    except ObjectNotFound:
        pass
    try:
        create()
        return True
    except ObjectAlreadyExists:
        return False


def ensure_concurrency_limit(name: str, slots: int = 1) -> bool:
    """Create the global concurrency limit `name` with `slots` unless it exists (an existing one keeps the
    limit its owner set). Returns whether it was created."""
    with get_client(sync_client=True) as client:
        return create_if_missing(
            lambda: client.read_global_concurrency_limit_by_name(name),
            lambda: client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots)),
        )


def _slots_in_use(name: str) -> tuple[int, int] | None:
    """(active, limit) when every slot of `name` is taken right now, else None."""
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return (limit.active_slots, limit.limit) if limit.active_slots >= limit.limit else None


@contextmanager
def gpu_slot(limit: str | None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `limit` (created with one slot if missing); None: no limit.

    The slot is a lease the holder keeps renewing: a run killed outright frees it when the lease lapses."""
    if not limit:
        yield
        return
    logger = get_run_logger()
    if ensure_concurrency_limit(limit):
        logger.info("created the global concurrency limit %r with 1 slot (one GPU job at a time)", limit)
    busy = _slots_in_use(limit)
    if busy is not None:
        logger.info("waiting for a slot of concurrency limit %r (%d of %d in use by other runs)", limit, *busy)
    # A transient failure to renew the lease must not kill hours of training; the slot is still released at the end.
    with concurrency(limit, occupy=1, raise_on_lease_renewal_failure=False):
        logger.info("holding a slot of %r", limit)
        yield
