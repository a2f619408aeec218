"""A real uvicorn server on a loopback port, in a thread of the test process, for HTTP tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import uvicorn
from litestar import Litestar
from prometheus_client.parser import text_string_to_metric_families

from similarity_service.lifespan import ServiceState

T = TypeVar("T")


class LiveServer:
    """The running server: its URL, its app's service state, and a way to run code on its loop."""

    def __init__(self, app: Litestar, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.url = url
        self.loop = loop

    @property
    def service(self) -> ServiceState:
        return self.app.state.service  # type: ignore[no-any-return]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run `coro` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout} s")
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@contextmanager
def live_server(app: Litestar) -> Iterator[LiveServer]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port> until the block ends."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # every answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    started = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        started.set()
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name=f"uvicorn-{port}", daemon=True)
    thread.start()
    started.wait(10)
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(app, f"http://127.0.0.1:{port}", loops[0])
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
