"""React to the work pool's flow-run events at once, not at the worker's next poll.

A Prefect worker finds new flow runs by polling its work pool (``PREFECT_WORKER_QUERY_SECONDS``),
so every job would wait half a poll on average before it started. The server already
announces each new flow run as a ``prefect.flow-run.Scheduled`` event, and each cancellation
as ``prefect.flow-run.Cancelling``, both naming the run's work pool; here the worker
subscribes to those of its pool (Prefect's public events client): a Scheduled event polls at
once, a Cancelling event stops that run's process. Polls stay the fallback (a lost event, a
reconnecting subscriber), and a flow run found twice is submitted once: the worker skips runs
it is already submitting, and Prefect's state rules let only one Scheduled -> Pending through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

log = logging.getLogger(__name__)

SCHEDULED = "prefect.flow-run.Scheduled"
CANCELLING = "prefect.flow-run.Cancelling"
FLOW_RUN_PREFIX = "prefect.flow-run."
RETRY_S = 5.0


def pool_events(work_pool_id: UUID) -> EventFilter:
    """New and cancelling flow runs of this work pool."""
    return EventFilter(
        event=EventNameFilter(name=[SCHEDULED, CANCELLING]),
        any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{work_pool_id}"]),
    )


async def follow_pool_events(
    work_pool_id: UUID,
    poll: Callable[[], Awaitable[object]],
    cancel: Callable[[UUID], Awaitable[None]],
    stopping: asyncio.Event,
) -> None:
    """Until ``stopping`` is set: ``poll`` when the pool gets a flow run, ``cancel(id)`` when
    one of its runs is being cancelled.

    Scheduled events that arrive while a poll runs are answered by one more poll, not one
    each: a subscriber that (re)connects is sent a backfill of recent events."""
    wanted = asyncio.Event()
    poller = asyncio.create_task(_poll_when_wanted(poll, wanted))
    try:
        while not stopping.is_set():
            try:
                async with get_events_subscriber(filter=pool_events(work_pool_id)) as events:
                    async for event in events:
                        if event.event == SCHEDULED:
                            wanted.set()
                        elif event.resource.id.startswith(FLOW_RUN_PREFIX):
                            await cancel(UUID(event.resource.id.removeprefix(FLOW_RUN_PREFIX)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server restarting: the polls cover the gap
                log.warning("flow-run events unavailable (%s); retrying in %.0f s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
    finally:
        poller.cancel()


async def _poll_when_wanted(poll: Callable[[], Awaitable[object]], wanted: asyncio.Event) -> None:
    while True:
        await wanted.wait()
        wanted.clear()
        try:
            await poll()
        except Exception:  # the regular poll will try again
            log.warning("polling for new flow runs failed", exc_info=True)
