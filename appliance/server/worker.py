"""A worker process: its own token session, the API and ACME apps, connections handed over.

Spawned (not forked), so no PKCS#11 state is inherited: each worker logs into the issuer token
itself with the PIN the supervisor sends over the control pipe, serves the connections the
supervisor hands over (dispatch.py), and answers the supervisor's messages: reload, a renewed
TLS certificate, stop, and a lost token's retry (token_health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing.connection
import os
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from setproctitle import setproctitle

from appliance.errors import ApplianceError
from appliance.issuance.ca_certs import pem
from appliance.logs import configure_logging
from appliance.server.app import create_server_app
from appliance.server.composition import Services, open_services
from appliance.server.connections import ConnectionLimits
from appliance.server.dispatch import PLAIN, TLS, HandedOverSite, HandOverChannel
from appliance.server.hardening import forbid_core_dumps
from appliance.server.tls import load_chain, server_context
from appliance.server.token_health import WorkerToken
from hsm.errors import DeviceError, HsmError, TokenNotFound

log = structlog.get_logger("appliance.server")

DRAIN_SECONDS = 30.0  # how long in-flight requests may take to finish at stop
TOKEN_PURGE_INTERVAL = 600.0
CRL_CHECK_INTERVAL = 60.0
Conn = multiprocessing.connection.Connection


def run_loop(coro: Any) -> Any:
    """uvloop where installed: the workers' per-request cost is mostly event-loop work."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def worker_main(index: int, config_path: str, log_format: str, resolver: str | None,
                control: Conn, channel: socket.socket, cpu: int | None = None) -> None:
    """Entry point of a worker process (spawned, so no PKCS#11 state is inherited)."""
    forbid_core_dumps()  # exec made the process dumpable again; the PIN arrives below
    # ps, top and systemctl status name it, instead of showing multiprocessing's command line.
    setproctitle(f"applianctl: worker {index}")
    # First, before any thread exists: the threads started later (PKCS#11, database, audit)
    # inherit the CPU. They take turns on the one GIL anyway; on one CPU a hand-over of the
    # GIL is a local switch instead of a wake-up on another CPU (measured: 13-33 % more
    # certificates/s, docs/performance.md).
    pin_error = None
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as e:
            pin_error = e.strerror
    configure_logging(log_format)
    structlog.contextvars.bind_contextvars(worker=index)
    if pin_error is not None:
        log.warning("worker_not_pinned", cpu=cpu, reason=pin_error)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    try:
        code = run_loop(_worker(index, Path(config_path), resolver, control, channel))
    except ApplianceError as e:
        with contextlib.suppress(OSError):
            control.send(("error", e.message))
        code = 1
    except Exception as e:  # noqa: BLE001 - report to the supervisor without internals
        log.exception("worker_failed")
        with contextlib.suppress(OSError):
            control.send(("error", f"worker failed: {type(e).__name__}"))
        code = 1
    os._exit(code)


async def _worker(index: int, config_path: Path, resolver: str | None, control: Conn,
                  channel: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    kind, pin, chain, key_pem = control.recv()
    assert kind == "start"
    for attempt in range(4):
        try:
            services = await open_services(config_path, pin)
            break
        except HsmError as e:
            # SoftHSM2 can miss a token while another process is loading it (a race in its
            # token directory scan): the supervisor has just logged in, so try again briefly.
            if attempt == 3 or not isinstance(e, TokenNotFound | DeviceError):
                raise
            log.warning("token_login_retry", attempt=attempt + 1, reason=str(e)[:200])
            await asyncio.sleep(0.3 * (attempt + 1))
    del pin
    ssl_context = server_context(services.config.tls, chain, key_pem, pem(services.root))
    del key_pem
    served = create_server_app(services, resolver=resolver)
    token = WorkerToken(index, services.keystore, control)  # a lost token: 503, told upward
    served.state.health = token.health
    # Both listeners' connections come from the supervisor, which enforces the caps per
    # address and in total; here each gets the header deadline and the keep-alive timeout.
    limits = ConnectionLimits.of(services.config)
    handed_over = HandOverChannel(channel)
    runner = web.AppRunner(served.app, access_log=None, handle_signals=False,
                           shutdown_timeout=DRAIN_SECONDS,
                           keepalive_timeout=limits.keepalive_timeout)
    await runner.setup()
    await HandedOverSite(runner, handed_over, TLS, ssl_context, limits).start()
    insecure_runner = None
    if served.insecure_app is not None:
        insecure_runner = web.AppRunner(served.insecure_app, access_log=None,
                                        handle_signals=False, shutdown_timeout=DRAIN_SECONDS,
                                        keepalive_timeout=limits.keepalive_timeout)
        await insecure_runner.setup()
        await HandedOverSite(insecure_runner, handed_over, PLAIN, None, limits).start()

    stop = asyncio.Event()

    def on_control() -> None:
        try:
            message = control.recv()
        except (EOFError, OSError):
            stop.set()  # the supervisor is gone: drain and leave
            return
        if message[0] == "reload":
            served.reload()
        elif message[0] == "tls":
            load_chain(ssl_context, message[1], message[2])
            log.info("tls_certificate_reloaded")
        elif message[0] == "stop":
            stop.set()
        elif message[0] == "token_retry":
            token.retry(message[1])  # the PIN, to log in again after the token was lost

    loop.add_reader(control.fileno(), on_control)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, served.reload)
    background = [asyncio.create_task(_purge_tokens(services)),
                  asyncio.create_task(_keep_crl_fresh(services))] if index == 0 else []
    # Everything loaded so far (modules, config, the app) lives as long as the worker: move it out
    # of the collector's sight, so a full collection under load walks only what requests made
    # (measured: 1 ms instead of 60 ms, which was the worst latency of a loaded worker).
    # Requests free what they make by reference counting; the collector only looks for cycles.
    # Running it every 700 net allocations (the default) cost ~15 us per certificate; every
    # 20,000 it walks about the same live objects 28 times less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    control.send(("ready", os.getpid()))
    await stop.wait()
    loop.remove_reader(control.fileno())
    for task in background:
        task.cancel()
    if insecure_runner is not None:
        await insecure_runner.cleanup()
    await runner.cleanup()  # stops accepting, lets in-flight requests finish
    await services.close()
    return 0


async def _keep_crl_fresh(services: Services) -> None:
    """Regenerate the CRL before its nextUpdate even when nobody asks for it."""
    while True:
        try:
            if services.config.crl.enabled:
                await services.authority.crl.current()  # looked up anew: a reload replaces it
        except Exception:  # noqa: BLE001 - keep trying; GET /crl also regenerates when due
            log.exception("crl_refresh_failed")
        await asyncio.sleep(CRL_CHECK_INTERVAL)


async def _purge_tokens(services: Services) -> None:
    while True:
        await asyncio.sleep(TOKEN_PURGE_INTERVAL)
        with contextlib.suppress(ApplianceError):
            await services.store.purge_expired_tokens(datetime.now(UTC))

