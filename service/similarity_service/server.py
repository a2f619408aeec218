"""uvicorn, with a signal handler that drains the service before the server stops.

On SIGTERM (or Ctrl-C) readiness turns 503 at once and new scoring requests get 503 + Retry-After
while every admitted request is finished; only then does uvicorn stop listening and exit. uvicorn's
own handler would stop listening at once and re-raise the signal after shutdown (exit status 143
instead of 0), so it is replaced. A second signal forces the exit. A model that fails to load stops
the server too (the service cannot serve).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from similarity_service.lifespan import Phase, ServiceState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains `service` before stopping."""

    def __init__(self, config: uvicorn.Config, service: ServiceState) -> None:
        super().__init__(config)
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self.forced = False  # a second signal cut the drain short

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 10 Hz main-loop check: also stop once the model failed to load."""
        return await super().on_tick(counter) or self._service.phase is Phase.FAILED

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: hand the work to the loop; never recorded for re-raising.
        if self._loop is None or self._drain is not None or self.should_exit:
            self.should_exit = self.force_exit = self.forced = True
            return
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain is None:
            log.info("signal received: draining (readiness is now 503)")
            self._drain = asyncio.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        await self._service.drain(self._service.settings.drain_timeout_s)
        log.info("drained: stopping")
        self.should_exit = True
