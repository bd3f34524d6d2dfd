"""Start a flow run as soon as it is scheduled, not at the worker's next poll.

A Prefect worker finds new flow runs by polling its work pool (``PREFECT_WORKER_QUERY_SECONDS``,
whole seconds), so every job would wait half a poll on average before it started. The server
already announces each new flow run as a ``prefect.flow-run.Scheduled`` event naming its work
pool; here the worker subscribes to those of its pool (Prefect's public events client) and
polls at once for each. The poll stays the fallback (a lost event, a reconnecting
subscriber), and a flow run found twice is submitted once: the worker skips runs it is
already submitting, and Prefect's state rules let only one Scheduled -> Pending through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

log = logging.getLogger(__name__)

SCHEDULED = "prefect.flow-run.Scheduled"
RETRY_S = 5.0


def scheduled_runs_in(work_pool_id: UUID) -> EventFilter:
    """New flow runs of this work pool (the event names its pool as a related resource)."""
    related = EventRelatedFilter(
        resources_in_roles=[(f"prefect.work-pool.{work_pool_id}", "work-pool")]
    )
    return EventFilter(event=EventNameFilter(name=[SCHEDULED]), related=related)


async def poll_when_scheduled(
    work_pool_id: UUID, poll: Callable[[], Awaitable[object]], stopping: asyncio.Event
) -> None:
    """Until ``stopping`` is set: run ``poll`` whenever the pool gets a flow run.

    Events that arrive while a poll runs are answered by one more poll, not one each: a
    subscriber that (re)connects is sent a backfill of recent events."""
    wanted = asyncio.Event()
    poller = asyncio.create_task(_poll_when_wanted(poll, wanted))
    try:
        await _listen(scheduled_runs_in(work_pool_id), wanted, stopping)
    finally:
        poller.cancel()


async def _listen(events: EventFilter, wanted: asyncio.Event, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            async with get_events_subscriber(filter=events) as subscriber:
                async for _ in subscriber:
                    wanted.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server restarting: the poll covers the gap
            log.warning("flow-run events unavailable (%s); retrying in %.0f s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)


async def _poll_when_wanted(poll: Callable[[], Awaitable[object]], wanted: asyncio.Event) -> None:
    while True:
        await wanted.wait()
        wanted.clear()
        try:
            await poll()
        except Exception:  # the regular poll will try again
            log.warning("polling for new flow runs failed", exc_info=True)
