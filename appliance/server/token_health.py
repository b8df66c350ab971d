"""A lost issuer token and its return, without a restart: the worker's side and the shared rules.

A signature that finds the token gone (device removed, session closed or invalid, key not found,
device error) marks the worker's key store lost (hsm.pkcs11_store). From then on the worker
refuses issuance at once with 503 and Retry-After, answers /health with 503 "token unavailable",
and tells the supervisor over its control pipe. The supervisor, which holds the PIN as it does to
spawn workers (the unsealed PIN in quorum mode), sends it back with a "token_retry" message after
a backoff (pool.py); the worker then initialises the module again, logs in and finds the same key
on its one PKCS#11 thread (Pkcs11KeyStore.reestablish) and reports the outcome. The PIN is
dropped again right after, as at start. None of this is a worker restart: the process and its
connections stay.
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing.connection
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from appliance.issuance.issuer import TOKEN_RETRY_AFTER_SECONDS
from hsm.errors import HsmError, token_loss_reason
from hsm.pkcs11_store import Pkcs11KeyStore

log = structlog.get_logger("appliance.server")

FIRST_RETRY_SECONDS = 0.5
Conn = multiprocessing.connection.Connection


def retry_delay(attempt: int) -> float:
    """Seconds before re-establishment attempt ATTEMPT (0, 1, ...): doubling, capped at the
    Retry-After clients are given, so that a client told to come back finds a fresh attempt."""
    return float(min(FIRST_RETRY_SECONDS * 2 ** min(attempt, 16), TOKEN_RETRY_AFTER_SECONDS))


def node_name() -> str:
    """Which CA node this is, for /health and audit records (several nodes share a database)."""
    return socket.gethostname()


@dataclass(frozen=True)
class TokenLoss:
    reason: str  # an operator's phrase (hsm.errors.token_loss_reason), never a PKCS#11 code
    since: datetime
    since_monotonic: float


class WorkerToken:
    """One worker's view of its token session: lost or signing, told to the supervisor."""

    def __init__(self, index: int, keystore: Pkcs11KeyStore, control: Conn) -> None:
        self._index = index
        self._keystore = keystore
        self._control = control
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()  # the worker's log fields, for its thread
        self.loss: TokenLoss | None = None
        self._retrying: asyncio.Task[None] | None = None
        keystore.on_loss(self._on_loss)

    def _on_loss(self, reason: str, detail: str) -> None:
        # On the PKCS#11 thread: hand it to the event loop, which owns the control pipe.
        self._loop.call_soon_threadsafe(self._lost, reason, detail, context=self._context)

    def _lost(self, reason: str, detail: str) -> None:
        if self.loss is not None:
            return
        self.loss = TokenLoss(reason, datetime.now(UTC), time.monotonic())
        log.warning("token_lost", reason=reason, detail=detail)
        self._tell("token_lost", reason)

    def _tell(self, *message: Any) -> None:
        try:
            self._control.send(message)
        except OSError:
            log.error("token_report_failed", report=message[0])

    def retry(self, pin: str) -> None:
        """The supervisor's "token_retry": try to re-establish now (one attempt at a time)."""
        if self._retrying is None or self._retrying.done():
            self._retrying = self._loop.create_task(self._reestablish(pin))

    async def _reestablish(self, pin: str) -> None:
        if self._keystore.lost_reason is None:
            if self.loss is not None:
                self._restored()
            return
        try:
            await self._keystore.reestablish(pin)
        except HsmError as e:
            reason = token_loss_reason(e) or "the token failed"
            log.info("token_still_unavailable", reason=reason, detail=str(e)[:300])
            self._tell("token_lost", reason)
            return
        finally:
            del pin
        self._restored()

    def _restored(self) -> None:
        lost_for = time.monotonic() - self.loss.since_monotonic if self.loss else 0.0
        self.loss = None
        log.info("token_restored", lost_for_s=round(lost_for, 1))
        self._tell("token_restored")

    def health(self) -> tuple[int, dict[str, Any]]:
        """/health: step-ca's {"status": "ok"}, or 503 with which node and worker, and why."""
        loss = self.loss
        if loss is None and self._keystore.lost_reason is None:
            return 200, {"status": "ok"}
        reason = loss.reason if loss else self._keystore.lost_reason
        return 503, {
            "status": "token unavailable",
            "message": f"this CA cannot sign: {reason}; it is re-establishing the token",
            "node": node_name(), "worker": self._index, "reason": reason,
            "since": (loss.since if loss else datetime.now(UTC)).isoformat(),
            "retryAfter": TOKEN_RETRY_AFTER_SECONDS}
