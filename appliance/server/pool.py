"""The supervisor's worker processes: start them, restart one that dies, message them, drain them.

Secrets (the issuer PIN, the TLS key) reach a worker over its control pipe, never in arguments or
files; the pool keeps them only while workers run, to restart one that dies and to let a worker
that lost its token log in again (token_health.py), after a backoff and without counting that
as a restart.
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
from appliance.server.token_health import retry_delay
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
    token_lost: str | None = None  # why its token cannot sign (it said so), None while it can
    token_attempts: int = 0  # re-establishment attempts since the loss (the backoff)
    token_retry: asyncio.TimerHandle | None = None

    def serving(self) -> bool:
        return (self.ready.done() and not self.ready.cancelled()
                and self.ready.exception() is None and self.channel.fileno() >= 0)


class WorkerPool:
    """The worker processes of one supervisor; `start` them per unsealed phase, `shutdown` after."""

    def __init__(self, config_path: Path, resolver: str | None, workers: int | None,
                 config: Callable[[], CaConfig], on_ready: Callable[[], None],
                 on_give_up: Callable[[], None],
                 on_token_change: Callable[[], None] = lambda: None) -> None:
        self._config_path = config_path
        self._resolver = resolver
        self._workers_option = workers  # --workers, ahead of ca.json's
        self._config = config  # the current ca.json (a reload replaces it)
        self._on_ready = on_ready
        self._on_give_up = on_give_up
        self._on_token_change = on_token_change  # a worker lost its token or got it back
        self._started = False  # the first start is over: a replacement that fails is retried
        self._start_failures: dict[int, int] = {}
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
        self._started = False
        self._pin = pin
        self._tls = (tls_chain, tls_key)
        for i in range(self.count()):
            self._spawn(i)
        await asyncio.wait_for(
            asyncio.gather(*(w.ready for w in self._workers.values())), READY_TIMEOUT)
        self._started = True

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
        """Hand-over channels of the workers that serve (started, not known to have exited).

        Those whose token is lost get new connections only when no worker can sign: then they
        answer 503 with Retry-After at once, rather than clients waiting in the backlog.
        """
        serving = [w for w in self._workers.values() if w.serving()]
        signing = [w for w in serving if w.token_lost is None]
        return [w.channel for w in (signing or serving)]

    def token_losses(self) -> list[tuple[int, str]]:
        """(worker index, reason) of each serving worker whose token is lost."""
        return [(w.index, w.token_lost) for w in self._workers.values()
                if w.serving() and w.token_lost is not None]

    def can_sign(self) -> bool:
        return any(w.serving() and w.token_lost is None for w in self._workers.values())

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
            self._start_failures.pop(worker.index, None)
            log.info("worker_ready", worker=worker.index, pid=message[1], cpu=worker.cpu)
            self._on_ready()
        elif message[0] == "error" and not worker.ready.done():
            worker.ready.set_exception(ApplianceError(message[1]))
        elif message[0] == "token_lost":  # at the loss, and after each failed attempt
            changed = worker.token_lost != str(message[1])
            worker.token_lost = str(message[1])
            self._schedule_token_retry(worker)
            if changed:
                self._on_token_change()
        elif message[0] == "token_restored":
            worker.token_lost = None
            worker.token_attempts = 0
            self._on_token_change()

    def _schedule_token_retry(self, worker: WorkerProcess) -> None:
        """Send the PIN back for another login after the backoff (not a restart: no counting)."""
        if worker.token_retry is not None:
            worker.token_retry.cancel()
        delay = retry_delay(worker.token_attempts)
        worker.token_attempts += 1
        worker.token_retry = asyncio.get_running_loop().call_later(
            delay, self._retry_token, worker)

    def _retry_token(self, worker: WorkerProcess) -> None:
        worker.token_retry = None
        if self._stopping or self._pin is None or self._workers.get(worker.index) is not worker:
            return
        with contextlib.suppress(OSError):  # gone: its exit is handled by _on_exit
            worker.control.send(("token_retry", self._pin))

    def _on_exit(self, worker: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(worker.control.fileno())
        worker.process.join(0)
        worker.channel.close()
        if worker.token_retry is not None:
            worker.token_retry.cancel()
        current = not self._stopping and self._workers.get(worker.index) is worker
        if worker.token_lost is not None and current:
            self._on_token_change()  # no longer one of those that cannot sign
        if not worker.ready.done():
            worker.ready.set_exception(ApplianceError(
                f"worker {worker.index} exited during start (code {worker.process.exitcode})"))
            if self._started and current:
                # A replacement that cannot start (e.g. the token is away): try again after a
                # backoff; only the deaths of serving workers count towards the limit.
                failures = self._start_failures.get(worker.index, 0)
                self._start_failures[worker.index] = failures + 1
                log.warning("worker_start_failed", worker=worker.index,
                            retry_in_s=retry_delay(failures))
                asyncio.get_running_loop().call_later(
                    retry_delay(failures), self._respawn, worker)
            return
        if not current:
            return
        log.error("worker_died", worker=worker.index, code=worker.process.exitcode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        if len(self._restarts) > RESTARTS_PER_MINUTE:
            log.error("too_many_worker_restarts")
            self._on_give_up()
            return
        self._spawn(worker.index)

    def _respawn(self, worker: WorkerProcess) -> None:
        if not self._stopping and self._pin is not None and \
                self._workers.get(worker.index) is worker:
            self._spawn(worker.index)

    async def shutdown(self) -> None:
        """SIGTERM every worker, wait for them to drain (then kill), forget the secrets."""
        self._stopping = True
        self._pin = None
        self._tls = None
        for w in self._workers.values():
            if w.token_retry is not None:
                w.token_retry.cancel()
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
