"""`applianctl serve`: a supervising process and several workers sharing one port.

Building and token-signing a certificate holds the GIL, and SoftHSM2 as python-pkcs11 loads it
must never be entered by two threads at once, so throughput comes from processes: each worker
has its own module handle and its own logged-in session behind one PKCS#11 thread, and runs on
a CPU of its own (pinWorkers). The supervisor binds the port and hands each accepted
connection to the next worker (appliance/server/dispatch.py). Workers share state only through
the database and the audit log.

The supervisor logs into the issuer token itself to check the key and issue the server's TLS
certificate (renewed at two thirds of its life, handed to workers over their control pipes),
forwards SIGHUP as a reload, turns SIGTERM into a graceful drain, and restarts a worker that dies
(pool.py; the worker's side is worker.py). In quorum mode it starts sealed: /health says so and
the admin socket collects custodians' shares until the PIN is whole. When workers lose the token
it records the loss and the recovery, says so to systemd, and (quorum mode, when
unlock.tokenLossSealAfter is set) seals again if no worker could sign for that long
(token_health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from setproctitle import setproctitle

from appliance.acme.challenges import parse_resolver_address
from appliance.api.app import create_sealed_app
from appliance.audit import AuditError, AuditEvent
from appliance.config import CaConfig, home_of, load_config, resolve_path
from appliance.errors import ApplianceError, ConfigError
from appliance.fileio import write_atomic
from appliance.logs import configure_logging
from appliance.server.composition import Services, audit_log, check_audit_log, open_services
from appliance.server.connections import ConnectionLimits
from appliance.server.dispatch import Listeners
from appliance.server.hardening import forbid_core_dumps
from appliance.server.pool import WorkerPool
from appliance.server.sdnotify import notify, watchdog_interval
from appliance.server.tls import (
    issue_server_certificate,
    load_server_tls,
    save_server_tls,
    server_context,
)
from appliance.server.token_health import node_name
from appliance.server.worker import DRAIN_SECONDS
from appliance.unlock.admin import AdminServer
from appliance.unlock.quorum import SealedPin, ShareCollector, ShareRefused
from hsm.errors import HsmError

log = structlog.get_logger("appliance.server")

TLS_LIFETIME_SECONDS = 24 * 3600.0  # renewed at two thirds of it


@dataclass(frozen=True)
class ServeOptions:
    config_path: Path
    pidfile: Path | None = None
    resolver: str | None = None
    workers: int | None = None


class Supervisor:
    """Runs sealed (quorum mode, no PIN yet) or unsealed (workers serving), and switches."""

    def __init__(self, options: ServeOptions, config: CaConfig, issuer_pin: str | None) -> None:
        self.options = options
        self._config = config
        self.home = home_of(options.config_path)
        self.services: Services | None = None
        self._pin = issuer_pin  # kept only to restart a worker that dies (and to unseal again)
        self._stop = asyncio.Event()
        self._seal = asyncio.Event()
        self._unsealed = asyncio.Event()
        self._serving = False  # workers answer on the port (what `unlock --status` reports)
        self._tls: tuple[bytes, bytes, datetime] | None = None
        self._collector: ShareCollector | None = None
        self._sealed_mtime = 0.0
        self._sealed_runner: web.AppRunner | None = None
        self._admin: AdminServer | None = None
        self.failed = False
        self._audit = audit_log(config, self.home)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop_recorded = False
        self._listeners: Listeners | None = None
        self._pool = WorkerPool(options.config_path, options.resolver, options.workers,
                                lambda: self.config, self._worker_ready, self._give_up,
                                self._token_changed)
        self._token_lost_at: float | None = None  # monotonic time the first worker lost it
        self._token_seal: asyncio.TimerHandle | None = None

    @property
    def config(self) -> CaConfig:
        return self.services.config if self.services else self._config

    @property
    def quorum(self) -> bool:
        return self._config.unlock.mode == "quorum"

    def _worker_ready(self) -> None:
        if self._listeners is not None:
            self._listeners.resume()  # in case every worker was down

    def _token_changed(self) -> None:
        """A worker lost its token or got it back: log, audit and tell systemd once per change."""
        losses = self._pool.token_losses()
        host, port = self.config.host_port()
        if losses and self._token_lost_at is None:
            self._token_lost_at = time.monotonic()
            reason = losses[0][1]
            log.error("token_unavailable", node=node_name(), reason=reason,
                      workers=[i for i, _ in losses])
            self._background(self._record("token.lost", "failure", {
                "node": node_name(), "reason": reason, "workers": [i for i, _ in losses]}))
            seal_after = self._config.unlock.token_loss_seal_after
            if self.quorum and seal_after is not None:
                self._token_seal = asyncio.get_running_loop().call_later(
                    seal_after.value.total_seconds(), self._seal_for_token_loss)
        elif not losses and self._token_lost_at is not None:
            lost_for = round(time.monotonic() - self._token_lost_at, 1)
            self._token_lost_at = None
            if self._token_seal is not None:
                self._token_seal.cancel()
                self._token_seal = None
            log.info("token_available", node=node_name(), lost_for_s=lost_for)
            self._background(self._record("token.restored", "success", {
                "node": node_name(), "lost_for_s": lost_for}))
        if not self._serving:
            return
        if not losses:
            notify(f"STATUS=serving on {host}:{port} with {len(self._pool)} workers")
        elif self._pool.can_sign():
            notify(f"STATUS=serving on {host}:{port}; token unavailable in {len(losses)} of "
                   f"{len(self._pool)} workers ({losses[0][1]}), re-establishing")
        else:
            notify(f"STATUS=token unavailable: {losses[0][1]}; issuance refused (503) while "
                   "re-establishing it")

    def _seal_for_token_loss(self) -> None:
        self._token_seal = None
        if self._token_lost_at is None or self._pool.can_sign() or self._seal.is_set():
            return
        after = self._config.unlock.token_loss_seal_after
        log.error("sealing_token_lost", node=node_name(), after=str(after))
        self._background(self._record("seal", "success", {
            "reason": f"the token was unavailable for {after}", "node": node_name()}))
        self._seal.set()

    async def _own_token_back(self) -> None:
        """Log the supervisor's own session in again when its token was lost (it signs the
        server's TLS certificate and the audit checkpoints); a failure waits for the next use."""
        if self.services is None or self._pin is None or \
                self.services.keystore.lost_reason is None:
            return
        try:
            await self.services.keystore.reestablish(self._pin)
        except HsmError as e:
            log.warning("token_still_unavailable", process="supervisor", reason=str(e)[:300])

    def _give_up(self) -> None:
        self.failed = True  # exit non-zero so that systemd's Restart=on-failure acts
        self._stop.set()

    async def run(self) -> int:
        # Once, before any worker writes: a broken chain refuses to start, a torn tail is cut off.
        await asyncio.to_thread(check_audit_log, self._audit)
        if self._pin is not None:
            # Password mode: a wrong PIN or a missing token is the first thing to report.
            self.services = await open_services(self.options.config_path, self._pin)
        try:
            plain = self.config.insecure_address
            self._listeners = Listeners(
                *self.config.host_port(), limits=ConnectionLimits.of(self.config),
                plain=self.config.host_port(plain) if plain else None)
        except ApplianceError:
            if self._listeners is not None:
                self._listeners.close()
            if self.services is not None:
                await self.services.close()
            raise
        try:
            await self._run()
        finally:
            self._listeners.close()
        return 1 if self.failed else 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set),
                             (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(sig, handler)
        if self.quorum:
            self._load_sealed()
            self._admin = AdminServer(
                resolve_path(self.home, self._config.unlock.admin_socket), self.handle_admin)
            await self._admin.start()
        if self.options.pidfile:
            write_pidfile(self.options.pidfile)
        await self._record("server.start", "success", {
            "pid": os.getpid(), "mode": self._config.unlock.mode,
            "address": self._config.address})
        try:
            while not self._stop.is_set():
                if self._pin is None and not await self._sealed_phase():
                    break
                await self._unsealed_phase()
        finally:
            notify("STOPPING=1", "STATUS=stopping")
            if not self._stop_recorded:
                await self._record("server.stop", "success", {"pid": os.getpid()})
            await self._audit.close()
            if self._sealed_runner is not None:
                await self._sealed_runner.cleanup()
            if self._admin is not None:
                await self._admin.close()
            if self.options.pidfile:
                with contextlib.suppress(FileNotFoundError):
                    self.options.pidfile.unlink()
        log.info("stopped")

    # -- sealed ------------------------------------------------------------------------------
    def _load_sealed(self) -> None:
        """(Re)read the sealed PIN file; a new share set (rekey-shares) resets the progress."""
        path = resolve_path(self.home, self._config.unlock.sealed_pin)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: run 'applianctl init --quorum' "
                              "or set unlock.mode to password") from None
        if self._collector is None or mtime != self._sealed_mtime:
            self._collector = ShareCollector(SealedPin.load(path))
            self._sealed_mtime = mtime

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, event: str, outcome: str, details: dict[str, Any],
                      actor: str = "supervisor") -> None:
        try:
            await self._audit.append(AuditEvent(event, outcome, actor, details))
        except AuditError:
            log.error("audit_write_failed", audit_event=event)

    async def _checkpoint(self) -> None:
        """A record signed by the issuer key over the chain head (needs the token: unsealed)."""
        if self.services is None:
            return
        await self._own_token_back()
        try:
            await self._audit.checkpoint(self.services.issuer.audit_signer(),
                                         self.services.issuer.certificate, "supervisor")
        except AuditError as e:
            log.error("audit_checkpoint_failed", reason=str(e)[:200])

    async def _checkpoints(self) -> None:
        interval = self._config.audit.checkpoint_interval.value.total_seconds()
        while True:
            await asyncio.sleep(interval)
            await self._checkpoint()

    def progress(self) -> tuple[int, int]:
        return self._collector.progress if self._collector else (0, 0)

    async def _sealed_phase(self) -> bool:
        """Serve /health (503 sealed) until M shares unseal the PIN; False if told to stop."""
        self._unsealed.clear()
        if self._sealed_runner is None:
            self._sealed_runner = await self._start_sealed_server()
        have, need = self.progress()
        notify("READY=1", f"STATUS=sealed: {have}/{need} unseal shares")
        log.info("sealed", progress=f"{have}/{need}")
        stop = asyncio.create_task(self._stop.wait())
        unsealed = asyncio.create_task(self._unsealed.wait())
        await asyncio.wait([stop, unsealed], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        unsealed.cancel()
        return not self._stop.is_set()

    async def _start_sealed_server(self) -> web.AppRunner | None:
        tls = load_server_tls(resolve_path(self.home, self._config.unlock.tls_dir))
        if tls is None:
            log.error("sealed_without_tls", reason="no server certificate kept from an "
                      "earlier unseal; /health is not served until the CA is unsealed")
            return None
        context = server_context(self._config.tls, tls[0], tls[1])
        runner = web.AppRunner(create_sealed_app(self.progress), access_log=None,
                               handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        assert self._listeners is not None
        for sock in self._listeners.copies():
            await web.SockSite(runner, sock, ssl_context=context).start()
        return runner

    async def handle_admin(self, request: dict[str, Any], actor: str) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            pass
        elif op == "unseal":
            if self._pin is not None:
                return self._status(message="already unsealed")
            share = request.get("share")
            if not isinstance(share, str) or not share.strip():
                return self._status(ok=False, error="no share given")
            self._load_sealed()
            assert self._collector is not None
            try:
                pin = self._collector.add(share)
            except ShareRefused as e:
                log.warning("unseal_share_refused", actor=actor, reason=e.message)
                await self._record("unseal.share", "failure", {"reason": e.message}, actor)
                return self._status(ok=False, error=e.message)
            have, need = self.progress()
            log.info("unseal_share_accepted", actor=actor, progress=f"{have}/{need}")
            await self._record("unseal.share", "success", {"progress": f"{have}/{need}"}, actor)
            if pin is None:
                notify(f"STATUS=sealed: {have}/{need} unseal shares")
                return self._status(message=f"share accepted ({have}/{need})")
            self._pin = pin
            self._collector.reset()
            self._unsealed.set()
            log.info("unsealing", actor=actor)
            notify("STATUS=unsealing: logging into the token, starting the workers")
            await self._record("unseal", "success", {"quorum": f"{have}/{need}"}, actor)
            return self._status(message="quorum reached: logging into the token")
        elif op == "reset":
            if self._collector is not None:
                self._collector.reset()
            log.info("unseal_progress_reset", actor=actor)
            await self._record("unseal.share", "success", {"reset": True}, actor)
        elif op == "seal":
            if self._pin is None:
                return self._status(message="already sealed")
            log.info("sealing", actor=actor)
            await self._record("seal", "success", {}, actor)
            self._seal.set()
            for _ in range(int(DRAIN_SECONDS * 20) + 100):
                if self._pin is None:
                    break
                await asyncio.sleep(0.05)
        else:
            return self._status(ok=False, error=f"unknown op {str(op)[:40]!r}")
        return self._status()

    def _status(self, ok: bool = True, error: str | None = None, message: str | None = None
                ) -> dict[str, Any]:
        have, need = self.progress()
        sealed = self._pin is None or self.services is None
        if self._pin is None:
            state = "sealed"
        elif self._serving:
            state = "unsealed"
        elif self._stop.is_set():
            state = "stopping"
        else:
            state = "sealing" if self._seal.is_set() else "unsealing"
        out: dict[str, Any] = {"ok": ok, "sealed": sealed, "state": state,
                               "progress": f"{have}/{need}"}
        if error:
            out["error"] = error
        if message:
            out["message"] = message
        return out

    # -- unsealed ----------------------------------------------------------------------------
    async def _unsealed_phase(self) -> None:
        assert self._pin is not None
        try:
            if self.services is None:
                self.services = await open_services(self.options.config_path, self._pin)
        except (ApplianceError, HsmError) as e:
            reason = getattr(e, "message", None) or str(e)
            if not self.quorum:
                raise
            log.error("unseal_failed", reason=reason)
            self._pin = None
            return
        self._seal.clear()
        try:
            self._tls = await issue_server_certificate(self.services.authority,
                                                       self.config.dns_names)
            if self.quorum:
                save_server_tls(resolve_path(self.home, self._config.unlock.tls_dir),
                                self._tls[0], self._tls[1])
            try:
                await self._pool.start(self._pin, self._tls[0], self._tls[1])
            except (TimeoutError, ApplianceError) as e:
                reason = e.message if isinstance(e, ApplianceError) else "workers did not start"
                log.error("start_failed", reason=reason)
                if self.quorum:
                    # Back to sealed rather than down: custodians can try again.
                    self._pin = None
                    return
                raise ApplianceError(f"cannot serve: {reason}") from None
            if self._sealed_runner is not None:
                await self._sealed_runner.cleanup()  # workers now answer on the port
                self._sealed_runner = None
            assert self._listeners is not None
            self._listeners.dispatch(self._pool.channels)
            self._serving = True
            host, port = self.config.host_port()
            log.info("serving", url=f"https://{self.config.dns_names[0]}:{port}",
                     address=f"{host}:{port}", workers=len(self._pool), pid=os.getpid())
            notify("READY=1", f"STATUS=serving on {host}:{port} with {len(self._pool)} "
                   "workers", f"MAINPID={os.getpid()}")
            tasks = [asyncio.create_task(self._renew_tls()),
                     asyncio.create_task(self._watchdog()),
                     asyncio.create_task(self._checkpoints())]
            stop = asyncio.create_task(self._stop.wait())
            seal = asyncio.create_task(self._seal.wait())
            await asyncio.wait([stop, seal], return_when=asyncio.FIRST_COMPLETED)
            for task in (*tasks, stop, seal):
                task.cancel()
            notify("STATUS=draining" if self._stop.is_set() else "STATUS=sealing: draining")
            log.info("stopping" if self._stop.is_set() else "sealing_workers")
        finally:
            self._serving = False
            self._token_lost_at = None  # the next workers start with a token of their own
            if self._token_seal is not None:
                self._token_seal.cancel()
                self._token_seal = None
            if self._listeners is not None:
                self._listeners.stop_dispatching()  # new connections wait in the backlog
            await self._pool.shutdown()
            # The last records go in before the checkpoint, so the signature covers them.
            await self.services.record_logout()
            if self._stop.is_set() and not self._stop_recorded:
                await self._record("server.stop", "success", {"pid": os.getpid()})
                self._stop_recorded = True
            await self._checkpoint()
            await self.services.close()
            self.services = None
        if self._seal.is_set() and not self._stop.is_set():
            self._pin = None
            self._seal.clear()
            log.info("sealed_again")

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while every worker is alive (cheap: no request is made)."""
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            if self._pool.all_alive():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def reload(self) -> None:
        """SIGHUP: validate ca.json here first; an invalid file keeps the old one running."""
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            config = load_config(self.options.config_path)
            if self.services is not None:
                self.services.authority.reload(config)
        except ApplianceError as e:
            log.error("reload_refused", reason=e.message)
            notify("READY=1", f"STATUS=reload refused: {e.message[:200]}")
            self._background(self._record("config.reload", "failure",
                                          {"reason": e.message[:500]}))
            return
        self._background(self._record("config.reload", "success", {"provisioners": len(
            config.authority.provisioners)}))
        if self.services is None:
            self._config = config
            notify("READY=1", "STATUS=sealed (configuration reloaded)")
            log.info("reload_forwarded", workers=0)
            return
        self.services.config = config
        self._pool.send("reload")
        log.info("reload_forwarded", workers=len(self._pool))
        notify("READY=1", "STATUS=serving (configuration reloaded)")

    async def _renew_tls(self) -> None:
        """Renew the server certificate at two thirds of its life; retry a minute after a fault."""
        while True:
            assert self._tls is not None
            remaining = (self._tls[2] - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(remaining - TLS_LIFETIME_SECONDS / 3, 1.0))
            try:
                assert self.services is not None
                await self._own_token_back()
                self._tls = await issue_server_certificate(self.services.authority,
                                                           self.config.dns_names)
                if self.quorum:
                    save_server_tls(resolve_path(self.home, self._config.unlock.tls_dir),
                                    self._tls[0], self._tls[1])
            except ApplianceError as e:
                log.error("tls_renewal_failed", reason=e.message)
                await asyncio.sleep(60)
                continue
            self._pool.renewed_tls(self._tls[0], self._tls[1])
            log.info("tls_certificate_renewed", not_after=self._tls[2].isoformat())


def write_pidfile(path: Path) -> None:
    write_atomic(path, f"{os.getpid()}\n".encode(), 0o644)


async def _serve(options: ServeOptions, config: CaConfig, issuer_pin: str | None) -> int:
    return await Supervisor(options, config, issuer_pin).run()


def run_server(options: ServeOptions, issuer_pin: str | None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code."""
    forbid_core_dumps()  # again for callers other than the CLI; shares arrive later (quorum)
    setproctitle("applianctl: supervisor")
    try:
        config = load_config(options.config_path)
    except ConfigError:
        raise
    configure_logging(config.logger.format)
    if options.resolver:
        try:
            parse_resolver_address(options.resolver)
        except ValueError:
            raise ConfigError(f"--resolver {options.resolver!r} must be IP:port (e.g. "
                              "127.0.0.1:53 or [::1]:53)") from None
    if issuer_pin is None and config.unlock.mode != "quorum":
        raise ConfigError("serve needs --issuer-password-file (or a CA set up with "
                          "init --quorum)")
    return asyncio.run(_serve(options, config, issuer_pin))
