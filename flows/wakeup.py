"""Start a served flow run as soon as it is scheduled, not at the runner's next poll.

Prefect's runner finds new flow runs by polling the API (``PREFECT_RUNNER_POLL_FREQUENCY``,
whole seconds), so every job waited half a poll on average before it started. The server
already announces each new flow run as a ``prefect.flow-run.Scheduled`` event; here the
runner's process subscribes to those of its own deployments and runs the runner's poll at
once for each. The poll stays the fallback (a lost event, a reconnecting subscriber), and a
flow run found twice is submitted once: the runner skips runs it is already submitting,
and Prefect's state rules let only one Scheduled -> Pending transition through.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.runner import Runner

log = logging.getLogger(__name__)

SCHEDULED = "prefect.flow-run.Scheduled"
RETRY_S = 5.0


def scheduled_runs_of(deployment_ids: set[UUID]) -> EventFilter:
    """New flow runs of these deployments (the event names its deployment as related)."""
    related = EventRelatedFilter(
        resources_in_roles=[(f"prefect.deployment.{d}", "deployment") for d in deployment_ids]
    )
    return EventFilter(event=EventNameFilter(name=[SCHEDULED]), related=related)


async def submit_when_scheduled(runner: Runner) -> None:
    """Run until cancelled: poll ``runner`` whenever one of its deployments gets a flow run.

    Events that arrive while a poll runs are answered by one more poll, not one each: a
    subscriber that (re)connects is sent a backfill of recent events."""
    while not runner.started:  # its deployments are registered and its poller exists then
        await asyncio.sleep(0.05)
    wanted = asyncio.Event()
    poller = asyncio.create_task(_poll_when_wanted(runner, wanted))
    try:
        await _listen(runner, wanted)
    finally:
        poller.cancel()


async def _listen(runner: Runner, wanted: asyncio.Event) -> None:
    ids = runner._deployment_registry.get_deployment_ids()  # Prefect-internal: no public accessor
    while not runner.stopping:
        try:
            async with get_events_subscriber(filter=scheduled_runs_of(ids)) as events:
                async for _ in events:
                    wanted.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server restarting: the poll covers the gap
            log.warning("flow-run events unavailable (%s); retrying in %.0f s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)


async def _poll_when_wanted(runner: Runner, wanted: asyncio.Event) -> None:
    while True:
        await wanted.wait()
        wanted.clear()
        try:
            await runner._get_and_submit_flow_runs()  # the poll itself (Prefect-internal)
        except Exception:  # the regular poll will try again
            log.warning("polling for new flow runs failed", exc_info=True)
