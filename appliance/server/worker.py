"""A worker process: its own token session, the API and ACME apps, connections handed over.

Spawned (not forked), so no PKCS#11 state is inherited: each worker logs into the issuer token
itself with the PIN the supervisor sends over the control pipe, serves the connections the
supervisor hands over (dispatch.py), and answers the supervisor's messages: reload, a renewed
TLS certificate, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing.connection
import os
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from appliance.acme.api import AcmeState, mount_acme, validation_settings
from appliance.api.app import ApiState, create_app, create_insecure_app
from appliance.config import load_config
from appliance.durations import parse_duration
from appliance.errors import ApplianceError
from appliance.issuance.ca_certs import pem
from appliance.logs import configure_logging
from appliance.server.composition import Runtime, open_runtime
from appliance.server.dispatch import HandedOverSite
from appliance.server.tls import load_chain, server_context
from appliance.storage import acme as acme_storage
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
            runtime = await open_runtime(config_path, pin)
            break
        except HsmError as e:
            # SoftHSM2 can miss a token while another process is loading it (a race in its
            # token directory scan): the supervisor has just logged in, so try again briefly.
            if attempt == 3 or not isinstance(e, TokenNotFound | DeviceError):
                raise
            log.warning("token_login_retry", attempt=attempt + 1, reason=str(e)[:200])
            await asyncio.sleep(0.3 * (attempt + 1))
    del pin
    ssl_context = server_context(runtime.config.tls, chain, key_pem, pem(runtime.root))
    del key_pem
    state = ApiState(authority=runtime.authority, config=runtime.config, root=runtime.root,
                     intermediates=[runtime.intermediate])
    state.apply_limits(runtime.config)
    app = create_app(state)
    acme_state = AcmeState(
        authority=runtime.authority, store=runtime.store,
        settings=validation_settings(runtime.config, resolver),
        max_concurrent=runtime.config.acme.max_concurrent_validations,
        order_lifetime=parse_duration(runtime.config.acme.order_lifetime))
    mount_acme(app, acme_state, runtime.config.max_body_bytes)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=DRAIN_SECONDS)
    await runner.setup()
    await HandedOverSite(runner, channel, ssl_context).start()
    insecure_runner = None
    if runtime.config.insecure_address:
        insecure_runner = web.AppRunner(create_insecure_app(state), access_log=None,
                                        handle_signals=False, shutdown_timeout=DRAIN_SECONDS)
        await insecure_runner.setup()
        ihost, iport = runtime.config.host_port(runtime.config.insecure_address)
        await web.TCPSite(insecure_runner, ihost, iport, reuse_port=True).start()

    stop = asyncio.Event()

    def on_control() -> None:
        try:
            message = control.recv()
        except (EOFError, OSError):
            stop.set()  # the supervisor is gone: drain and leave
            return
        if message[0] == "reload":
            _reload_worker(runtime, state)
        elif message[0] == "tls":
            load_chain(ssl_context, message[1], message[2])
            log.info("tls_certificate_reloaded")
        elif message[0] == "stop":
            stop.set()

    loop.add_reader(control.fileno(), on_control)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_worker, runtime, state)
    background = [asyncio.create_task(_purge_tokens(runtime)),
                  asyncio.create_task(_keep_crl_fresh(runtime))] if index == 0 else []
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
    await runtime.close()
    return 0


def _reload_worker(runtime: Runtime, state: ApiState) -> None:
    try:
        config = load_config(runtime.config_path)
        runtime.authority.reload(config)
    except ApplianceError as e:
        log.error("reload_failed", reason=e.message)
        return
    if config.address != runtime.config.address or config.tls != runtime.config.tls:
        log.warning("reload_needs_restart", reason="address and tls take effect on restart")
    runtime.config = config
    state.config = config
    state.apply_limits(config)
    log.info("config_reloaded", provisioners=len(config.authority.provisioners))


async def _keep_crl_fresh(runtime: Runtime) -> None:
    """Regenerate the CRL before its nextUpdate even when nobody asks for it."""
    while True:
        try:
            if runtime.config.crl.enabled:
                await runtime.authority.crl.current()  # looked up anew: a reload replaces it
        except Exception:  # noqa: BLE001 - keep trying; GET /crl also regenerates when due
            log.exception("crl_refresh_failed")
        await asyncio.sleep(CRL_CHECK_INTERVAL)


async def _purge_tokens(runtime: Runtime) -> None:
    while True:
        await asyncio.sleep(TOKEN_PURGE_INTERVAL)
        with contextlib.suppress(ApplianceError):
            await runtime.store.purge_expired_tokens(datetime.now(UTC))
            await runtime.store.run_op(acme_storage.op_purge(int(time.time())))

