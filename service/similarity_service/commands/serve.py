"""`structsim serve`: the HTTP scoring service (Litestar under uvicorn), draining on SIGTERM.

Exit status: 0 after a clean drain, 1 if the model failed to load or a second signal forced the
exit, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys

from similarity_service.settings import Settings, SettingsError, add_arguments, load_settings
from similarity_service.workers import WorkerPeers, run_workers, worker_count

SHUTDOWN_GRACE_S = 5  # after draining: for responses still being written to finish
# The runner thread gives up the GIL at every device sync; with Python's default 5 ms switch interval it
# then waits up to 5 ms for the event loop to hand it back, on every batch. 0.5 ms bounds that wait
# (measured on an H100: twice the request rate held under a 50 ms p99; docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.0005
# A young collection runs every GC_GEN0_THRESHOLD net allocations (Python's default: 700). One of 10,000
# objects costs 0.25 ms on a 2-core CPU; the larger young generation lets short-lived request objects die
# before a collection, so fewer are promoted and full collections stay rare (bench/serve_gc.py below).
GC_GEN0_THRESHOLD = 10_000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Precedence: flags > STRUCTSIM_* environment variables > --profile file > defaults. "
        "Every setting is described in docs/configuration.md."
    )
    add_arguments(parser)


def settle_heap() -> None:
    """Once loaded and warm: collect the load's garbage, freeze what survives, make young collections rarer.

    The heap then holds torch, the model and the app (~310k objects with the tiny model), alive as long
    as the process. Unfrozen, a full collection scans them all (240 ms on a 2-core CPU) while every
    request in flight waits; frozen, it scans only what requests allocated.
    """
    # bench/serve_gc.py, tiny model on a busy 2-core CPU, rounds interleaved. Below capacity the collector
    # hardly runs (60 req/s: 15 young collections and no full one in ~100 s), so p99 is the same within
    # the noise (medians of 6 rounds: 31.6 ms as is, 34.7 ms settled; rounds spread 27-40 ms). Over
    # capacity a backlog keeps objects alive and full collections come: at 200 req/s, 4 of up to 288 ms
    # as is, none settled, and collection time over the run fell from 1.56 s to 0.32 s. Bursts above
    # capacity build such backlogs: those pauses are what this removes.
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(vars(args), os.environ)
    except SettingsError as exc:
        print(f"structsim serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    count = worker_count(settings)
    return serve(settings) if count == 1 else run_workers(settings, serve_worker, count)


def configure_logging(settings: Settings, worker: int | None = None) -> None:
    name = "%(name)s" if worker is None else f"worker {worker} %(name)s"
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s")


def serve(
    settings: Settings, sockets: list[socket.socket] | None = None, workers: WorkerPeers | None = None
) -> int:
    """Serve until drained; the exit status. `sockets` and `workers`: in one of several serving processes."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    import uvicorn

    from similarity_service.app import create_app
    from similarity_service.server import DrainingServer

    app = create_app(settings, on_ready=settle_heap, workers=workers)
    service = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, service)
    server.run(sockets)
    return 1 if service.error is not None or server.forced else 0


def serve_worker(settings: Settings, workers: WorkerPeers, sockets: list[socket.socket]) -> int:
    """One of several serving processes (workers.py), in a freshly spawned interpreter."""
    configure_logging(settings, workers.index)
    return serve(settings, sockets, workers)
