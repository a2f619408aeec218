"""Several serving processes on one port: `structsim serve --workers N`.

One Python process runs the event loop, the tokenizer's joins and the batcher's runner under one GIL,
and on a fast GPU that caps HTTP throughput well before the GPU is busy (docs/performance.md). With
`workers` > 1 the parent spawns that many workers, each a whole service (HTTP, tokenizer, batcher, its
own engine on the same device), whose kernels share the GPU.

Each worker listens on a socket of its own bound with SO_REUSEPORT, so that the kernel spreads new
connections over the workers evenly (by a hash of their addresses). One socket shared by all would give
each burst of connections to whichever worker woke first: uvloop accepts every pending connection at
once, and a client's keep-alive connection then stays with that worker.

The parent only supervises. SIGTERM/SIGINT go to every worker, which drains as a lone process does (a
second signal forces the exit). A worker that exits on its own (a crash, a failed load) makes the parent
drain the others and exit 1, so Kubernetes restarts the pod rather than leaving it short of workers.
Readiness and the workers' running passes are shared through `WorkerPeers`; metrics through
prometheus_client's multiprocess mode, in a directory the parent makes and removes.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from types import FrameType
from typing import NamedTuple

from similarity_service.host import Gpus, cgroup_memory_limit, usable_cores, visible_gpus
from similarity_service.settings import Settings

log = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when a worker imports it
EXIT_WORKER_FAILED = 1
LISTEN_BACKLOG = 2048  # uvicorn's default
# `workers: auto` on a GPU. On an H200 with a 16-core host, 32-pair requests from 16 clients: 1, 2 and 3
# workers served 19.1k, 26.9k and 29.2k pairs/s (docs/performance.md); under such load a worker keeps
# ~3 cores busy (event loop, tokenizer pool, runner), so more workers than cores/4 would only contend.
AUTO_CORES_PER_WORKER = 4
AUTO_MAX_WORKERS = 3  # the most measured
# Each worker held 7.4 GB of GPU memory there (model, CUDA graphs, allocator cache), and its process with
# Inductor's compile workers 7.7 GB of host memory: room for twice that per worker on the GPU, and for that
# under a memory limit, or `auto` means fewer.
AUTO_GPU_MEMORY_PER_WORKER = 16 << 30
AUTO_HOST_MEMORY_PER_WORKER = 8 << 30

# A worker: `target(settings, peers, sockets)` serves until drained and returns its exit status.
WorkerTarget = Callable[[Settings, "WorkerPeers", list[socket.socket]], int]


class WorkerPeers:
    """One worker's view of the pod's workers, in memory shared by all: which are warm, and which are running a
    forward pass.

    Readiness is the pod's: a Service picks pods by their readiness probe, which lands on any one worker; one
    that answered ready while a sibling still warms up would let requests reach the sibling and get 503.

    Passes are counted so that a worker runs a lone request on its event loop (batching.py's
    `inline_max_pairs`) only while no sibling's pass runs: the GPU time-slices processes, so beside one the
    pass would wait with the loop held.
    """

    def __init__(
        self, ready: SynchronizedArray[ctypes.c_bool], passes: SynchronizedArray[ctypes.c_int], index: int
    ) -> None:
        self._ready = ready
        self._passes = passes
        self.index = index
        self.count = len(ready)

    def set_ready(self, ready: bool) -> None:
        self._ready[self.index] = ready

    def warming(self) -> int:
        """How many workers are not ready (loading, draining or failed)."""
        return len(self._ready) - sum(self._ready[:])

    def pass_started(self) -> None:
        with self._passes.get_lock():  # one worker may run passes on several GPUs' threads at once
            self._passes[self.index] += 1

    def pass_ended(self) -> None:
        with self._passes.get_lock():
            self._passes[self.index] -= 1

    def others_running(self) -> bool:
        """Whether a sibling worker is running a forward pass now."""
        return any(running for index, running in enumerate(self._passes[:]) if index != self.index)


class HostResources(NamedTuple):
    """What `workers: auto` weighs."""

    cores: int  # usable by this process (affinity, cgroup CPU quota)
    gpus: Gpus
    memory_limit_bytes: int | None  # the cgroup's; None: unlimited

    @classmethod
    def read(cls) -> HostResources:
        return cls(usable_cores(), visible_gpus(), cgroup_memory_limit())


def worker_count(settings: Settings, host: HostResources | None = None) -> int:
    """`settings.workers`, with `auto` resolved for `host` (read from this one if None)."""
    if settings.workers != "auto":
        return settings.workers
    host = host or HostResources.read()
    devices = settings.devices or settings.device
    if devices.startswith("cpu") or host.gpus.count == 0:
        return 1  # CPU forwards take the cores themselves
    fits = [
        AUTO_MAX_WORKERS,
        host.cores // AUTO_CORES_PER_WORKER,
        host.gpus.smallest_memory_bytes // AUTO_GPU_MEMORY_PER_WORKER,
    ]
    if host.memory_limit_bytes is not None:
        fits.append(host.memory_limit_bytes // AUTO_HOST_MEMORY_PER_WORKER)
    return max(1, min(fits))


def run_workers(settings: Settings, target: WorkerTarget, count: int) -> int:
    """Serve with `count` processes; 0 once all drained cleanly."""
    context = multiprocessing.get_context("spawn")  # no fork: CUDA and threads do not survive one
    ready, passes = context.Array(ctypes.c_bool, count), context.Array(ctypes.c_int, count)
    metrics_dir = tempfile.mkdtemp(prefix="structsim-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    processes = [
        context.Process(target=_worker_main, args=(target, settings, ready, passes, index), name=f"structsim-worker-{index}")
        for index in range(count)
    ]
    try:
        log.info("serving on %s:%d with %d workers", settings.host, settings.port, count)
        return _Supervisor(processes, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        del os.environ[METRICS_DIR_ENV]


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` that other processes of this user may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(
    target: WorkerTarget,
    settings: Settings,
    ready: SynchronizedArray[ctypes.c_bool],
    passes: SynchronizedArray[ctypes.c_int],
    index: int,
) -> None:
    # Signals come from the parent only: a terminal's Ctrl-C reaches its whole process group, and a worker
    # counts a second signal as "force". A worker whose parent died (SIGKILL) drains and exits too.
    os.setpgrp()
    threading.Thread(target=_drain_when_orphaned, name="structsim-parent-watch", daemon=True).start()
    try:
        sock = reuse_port_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("worker %d cannot listen on %s:%d: %s", index, settings.host, settings.port, exc)
        raise SystemExit(EXIT_WORKER_FAILED) from None
    raise SystemExit(target(settings, WorkerPeers(ready, passes, index), [sock]))


def _drain_when_orphaned() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)


class _Supervisor:
    """Relays signals to the workers and decides the exit status once all have exited."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess], metrics_dir: str) -> None:
        self._processes = processes
        self._metrics_dir = metrics_dir
        self._stopping = False  # a signal came: workers exiting is expected
        self._failed = False  # a worker exited unasked, or not with 0

    def run(self) -> int:
        """Start the workers and wait for all of them to exit; the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for process in self._processes:
                process.start()
            running = list(self._processes)
            while running:
                ended = multiprocessing.connection.wait([process.sentinel for process in running])
                for process in [p for p in running if p.sentinel in ended]:
                    process.join()
                    running.remove(process)
                    self._on_exit(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_WORKER_FAILED if self._failed else 0

    def _on_exit(self, process: multiprocessing.process.BaseProcess) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(process.pid, self._metrics_dir)  # its live gauges leave the sums
        if process.exitcode == 0 and self._stopping:
            return
        self._failed = True
        if not self._stopping:
            log.error("%s exited with status %s: draining the others", process.name, process.exitcode)
            self._stopping = True
            self._terminate_all()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._terminate_all()  # the first drains; a second forces, in each worker as in a lone server

    def _terminate_all(self) -> None:
        for process in self._processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
