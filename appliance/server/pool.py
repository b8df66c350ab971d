"""The supervisor's worker processes: start them, restart one that dies, message them, drain them.

Secrets (the issuer PIN, the TLS key) reach a worker over its control pipe, never in arguments or
files; the pool keeps them only while workers run, to restart one that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import structlog

from appliance.config import CaConfig
from appliance.errors import ApplianceError
from appliance.server.dispatch import channel_pair
from appliance.server.worker import DRAIN_SECONDS, worker_main

log = structlog.get_logger("appliance.server")

READY_TIMEOUT = 120.0
RESTARTS_PER_MINUTE = 5  # more deaths than this: give up, so that systemd restarts the service
Conn = multiprocessing.connection.Connection


@dataclass
class WorkerProcess:
    index: int
    process: BaseProcess
    control: Conn
    channel: socket.socket  # the supervisor's end of the connection hand-over channel
    cpu: int | None  # the CPU the worker runs on (pinWorkers), None when not pinned
    ready: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                       .create_future())


class WorkerPool:
    """The worker processes of one supervisor; `start` them per unsealed phase, `shutdown` after."""

    def __init__(self, config_path: Path, resolver: str | None, workers: int | None,
                 config: Callable[[], CaConfig], on_ready: Callable[[], None],
                 on_give_up: Callable[[], None]) -> None:
        self._config_path = config_path
        self._resolver = resolver
        self._workers_option = workers  # --workers, ahead of ca.json's
        self._config = config  # the current ca.json (a reload replaces it)
        self._on_ready = on_ready
        self._on_give_up = on_give_up
        self._mp = multiprocessing.get_context("spawn")
        self._workers: dict[int, WorkerProcess] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._pin: str | None = None
        self._tls: tuple[bytes, bytes] | None = None
        self._cpus = sorted(os.sched_getaffinity(0))  # the CPUs this server may use

    def __len__(self) -> int:
        return len(self._workers)

    def count(self) -> int:
        # One per CPU this process may run on (a cpuset or CPUAffinity= can allow fewer than
        # the machine has).
        return self._workers_option or self._config().workers or len(self._cpus) or 1

    async def start(self, pin: str, tls_chain: bytes, tls_key: bytes) -> None:
        """Spawn the workers and wait until every one is ready (TimeoutError, ApplianceError)."""
        self._stopping = False
        self._pin = pin
        self._tls = (tls_chain, tls_key)
        for i in range(self.count()):
            self._spawn(i)
        await asyncio.wait_for(
            asyncio.gather(*(w.ready for w in self._workers.values())), READY_TIMEOUT)

    def send(self, *message: Any) -> None:
        """Send MESSAGE to every worker's control pipe (one gone away is skipped)."""
        for w in self._workers.values():
            with contextlib.suppress(OSError):
                w.control.send(message)

    def renewed_tls(self, tls_chain: bytes, tls_key: bytes) -> None:
        """Hand a renewed server certificate to the workers (and to those restarted later)."""
        self._tls = (tls_chain, tls_key)
        self.send("tls", tls_chain, tls_key)

    def all_alive(self) -> bool:
        return all(w.process.is_alive() for w in self._workers.values())

    def channels(self) -> list[socket.socket]:
        """Hand-over channels of the workers that serve (started, not known to have exited)."""
        return [w.channel for w in self._workers.values()
                if w.ready.done() and not w.ready.cancelled() and w.ready.exception() is None
                and w.channel.fileno() >= 0]

    def _worker_cpu(self, index: int) -> int | None:
        """Worker i runs on the i-th CPU of those allowed (round robin); None: not pinned."""
        if not self._config().pin_workers or len(self._cpus) < 2:
            return None
        return self._cpus[index % len(self._cpus)]

    def _spawn(self, index: int) -> None:
        assert self._tls is not None and self._pin is not None
        parent, child = self._mp.Pipe()
        ours, theirs = channel_pair()
        cpu = self._worker_cpu(index)
        process = self._mp.Process(
            target=worker_main, name=f"appliance-worker-{index}",
            args=(index, str(self._config_path), self._config().logger.format,
                  self._resolver, child, theirs, cpu))
        process.start()
        child.close()
        theirs.close()
        worker = WorkerProcess(index, process, parent, ours, cpu)
        self._workers[index] = worker
        parent.send(("start", self._pin, self._tls[0], self._tls[1]))
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._on_message, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)

    def _on_message(self, worker: WorkerProcess) -> None:
        try:
            message: Any = worker.control.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
            return
        if message[0] == "ready" and not worker.ready.done():
            worker.ready.set_result(message[1])
            log.info("worker_ready", worker=worker.index, pid=message[1], cpu=worker.cpu)
            self._on_ready()
        elif message[0] == "error" and not worker.ready.done():
            worker.ready.set_exception(ApplianceError(message[1]))

    def _on_exit(self, worker: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(worker.control.fileno())
        worker.process.join(0)
        worker.channel.close()
        if not worker.ready.done():
            worker.ready.set_exception(ApplianceError(
                f"worker {worker.index} exited during start (code {worker.process.exitcode})"))
            return
        if self._stopping or self._workers.get(worker.index) is not worker:
            return
        log.error("worker_died", worker=worker.index, code=worker.process.exitcode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        if len(self._restarts) > RESTARTS_PER_MINUTE:
            log.error("too_many_worker_restarts")
            self._on_give_up()
            return
        self._spawn(worker.index)

    async def shutdown(self) -> None:
        """SIGTERM every worker, wait for them to drain (then kill), forget the secrets."""
        self._stopping = True
        self._pin = None
        self._tls = None
        for w in self._workers.values():
            if w.process.is_alive() and w.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_SECONDS + 5
        for w in self._workers.values():
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(w.process.sentinel)
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(w.control.fileno())
            w.control.close()
            w.channel.close()
        self._workers.clear()
