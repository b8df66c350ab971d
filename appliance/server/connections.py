"""Connection limits: how many a client address and the server may hold, and for how long.

Two sides, because the supervisor accepts and the workers serve (dispatch.py):

- `Admission` lives in the supervisor. It counts open connections per client address and in
  total and refuses the excess at accept time: the socket is closed before any TLS handshake,
  so a flood costs one accept and one close, never a worker's descriptor. Refusals are logged
  once per address per LOG_INTERVAL with the number refused, not one line per connection.
- The supervisor must learn when a connection closes. Workers report closes in batches on the
  hand-over channel they already share with the supervisor (`CloseReports`: one datagram of
  connection ids per loop turn, at most ~50 ms late), and the supervisor forgets every
  connection of a worker that exits. This was chosen over "each worker enforces its share"
  because hand-over is round-robin over all clients, so one address's connections do not
  spread evenly over the workers: a per-worker share of a per-address cap would refuse a client
  well below its cap. Counting in one place is exact, and a close costs the worker 8 bytes of
  a batched datagram and the supervisor a dict update.
- `BoundedConnection` wraps each aiohttp RequestHandler in a worker and enforces the header
  deadline that aiohttp lacks: the first request line and headers must be complete within
  `headerTimeout` of the accept (the TLS handshake included), and a later request's within
  `headerTimeout` of its first byte. The idle wait between requests is aiohttp's own
  `keepalive_timeout` (which alone would let a client trickle headers for that long).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler

from appliance.config import CaConfig

log = structlog.get_logger("appliance.dispatch")

DESCRIPTOR_RESERVE = 128  # a process's own descriptors: database, token, logs, pipes, ACME clients
MAX_AUTO_CONNECTIONS = 4096
LOG_INTERVAL = 60.0  # one "connections_refused" line per address per minute at most
REPORT_DELAY = 0.05  # how long a worker gathers closes before it reports them
IDS_PER_REPORT = 1024  # 8 KiB datagrams
CONNECTION_ID = struct.Struct("!Q")


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits of ca.json with `maxConnections: 0` resolved against RLIMIT_NOFILE."""

    header_timeout: float
    keepalive_timeout: float
    per_address: int
    total: int

    @classmethod
    def of(cls, config: CaConfig) -> ConnectionLimits:
        total = config.max_connections or auto_total_connections()
        return cls(header_timeout=config.header_timeout.value.total_seconds(),
                   keepalive_timeout=config.keepalive_timeout.value.total_seconds(),
                   per_address=config.max_connections_per_address, total=total)


def auto_total_connections() -> int:
    """What one process can hold besides its own descriptors (every connection may land on
    one worker), at most MAX_AUTO_CONNECTIONS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_AUTO_CONNECTIONS
    return max(16, min(MAX_AUTO_CONNECTIONS, soft - DESCRIPTOR_RESERVE))


class Admission:
    """The supervisor's count of open connections per client address, per worker channel."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._per_address: dict[str, int] = {}
        self._open: dict[int, tuple[socket.socket, str]] = {}  # connection id -> (channel, peer)
        self._next_id = 0
        self._refused: dict[str, int] = {}  # refusals not yet logged, per address
        self._last_logged: dict[str, float] = {}

    @property
    def total(self) -> int:
        return len(self._open)

    def admit(self, peer: str) -> bool:
        """May PEER open one more connection? A refusal is counted for the log."""
        held = self._per_address.get(peer, 0)
        if held < self.limits.per_address and len(self._open) < self.limits.total:
            return True
        self._note_refusal(peer, "address" if held >= self.limits.per_address else "total")
        return False

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def opened(self, conn_id: int, channel: socket.socket, peer: str) -> None:
        self._open[conn_id] = (channel, peer)
        self._per_address[peer] = self._per_address.get(peer, 0) + 1

    def closed(self, conn_id: int) -> None:
        entry = self._open.pop(conn_id, None)
        if entry is None:
            return
        peer = entry[1]
        left = self._per_address[peer] - 1
        if left:
            self._per_address[peer] = left
        else:
            del self._per_address[peer]

    def forget_channel(self, channel: socket.socket) -> int:
        """The worker behind CHANNEL is gone, and its connections with it."""
        gone = [cid for cid, (ch, _) in self._open.items() if ch is channel]
        for conn_id in gone:
            self.closed(conn_id)
        return len(gone)

    def _note_refusal(self, peer: str, limit: str) -> None:
        self._refused[peer] = self._refused.get(peer, 0) + 1
        now = time.monotonic()
        if now - self._last_logged.get(peer, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        if len(self._last_logged) > 10_000:  # many addresses: keep the memory bounded
            self._last_logged = {a: t for a, t in self._last_logged.items()
                                 if now - t < LOG_INTERVAL}
        self._last_logged[peer] = now
        log.warning("connections_refused", peer=peer, refused=self._refused.pop(peer),
                    limit=limit, per_address=self.limits.per_address,
                    total=self.limits.total, open=len(self._open),
                    next_line_in_s=LOG_INTERVAL)


class CloseReports:
    """A worker's batched reports of closed connections, on its hand-over channel."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel
        self._pending: list[int] = []
        self._flush: asyncio.TimerHandle | None = None

    def closed(self, conn_id: int) -> None:
        self._pending.append(conn_id)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(REPORT_DELAY, self.flush)

    def flush(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), IDS_PER_REPORT):
            batch = pending[start:start + IDS_PER_REPORT]
            try:
                self._channel.send(b"".join(CONNECTION_ID.pack(i) for i in batch))
            except (BlockingIOError, InterruptedError):
                # The supervisor is behind: keep the rest for the next turn.
                self._pending = pending[start:] + self._pending
                self._flush = asyncio.get_running_loop().call_later(REPORT_DELAY, self.flush)
                return
            except OSError:
                return  # the supervisor is gone; nobody counts any more


def read_close_reports(channel: socket.socket) -> list[int]:
    """The connection ids a worker reported closed on CHANNEL (the supervisor's end)."""
    ids: list[int] = []
    while True:
        try:
            data = channel.recv(IDS_PER_REPORT * CONNECTION_ID.size)
        except (BlockingIOError, InterruptedError):
            return ids
        except OSError:
            return ids
        if not data:
            return ids
        ids.extend(i for (i,) in CONNECTION_ID.iter_unpack(data[:len(data) // 8 * 8]))


class StepCaErrorsHandler(RequestHandler):
    """aiohttp's RequestHandler, answering a request it cannot parse with step-ca JSON that
    quotes nothing: aiohttp's own answer is plain text with the parser's message, which repeats
    up to ~100 bytes of what the client sent, and the edge's JSON errors never see it."""

    __slots__ = ()  # the same layout as RequestHandler, so a handler can take this class

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if isinstance(exc, BadHttpMethod):  # TLS or other noise on the port: not a warning
            self.logger.debug("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; the connection is closed")
        text = ("the request is not valid HTTP" if 400 <= status < 500
                else "the server could not handle the request")
        response = web.json_response({"status": status, "message": text}, status=status)
        response.force_close()
        return response


class BoundedConnection(asyncio.Protocol):
    """An aiohttp RequestHandler with a header deadline, reporting its close exactly once."""

    def __init__(self, server: web.Server, registry: dict[Any, BoundedConnection],
                 deadline: float, header_timeout: float, on_close: Callable[[], None]) -> None:
        self.handler = server()
        # web.Server makes the handler; only its error answer changes (same slots, same state).
        self.handler.__class__ = StepCaErrorsHandler
        self._registry = registry  # aiohttp's handler -> this, for bound_requests
        registry[self.handler] = self
        self._header_timeout = header_timeout
        self._deadline = deadline  # loop time by which the first request's headers must be in
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._in_request = False
        self._on_close: Callable[[], None] | None = on_close

    def release(self) -> None:
        """Report the connection closed (once; also for a handshake that failed)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            self._registry.pop(self.handler, None)
            on_close()

    # -- asyncio.Protocol, forwarded to aiohttp ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream: uvloop's or asyncio's
        self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expired)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and not self._in_request:
            # The first byte of a later request on a keep-alive connection.
            self._timer = asyncio.get_running_loop().call_later(self._header_timeout,
                                                                self._expired)
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        try:
            self.handler.connection_lost(exc)
        finally:
            self.release()

    # -- request boundaries (from wrap_request_handler) --------------------------------------
    def request_started(self) -> None:
        self._cancel_timer()
        self._in_request = True

    def request_done(self) -> None:
        self._in_request = False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._in_request or self._transport is None:
            return
        log.debug("header_deadline_passed", header_timeout_s=self._header_timeout)
        self._transport.abort()


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def bound_requests(server: web.Server, connections: dict[Any, BoundedConnection]) -> None:
    """Tell each request's BoundedConnection when its headers are in and when it is done.

    aiohttp hands web.Server's `request_handler` to each RequestHandler it creates, so this
    must run before the first connection. CONNECTIONS maps aiohttp's handler to our wrapper
    (BoundedConnection fills it).
    """
    inner: Handler = server.request_handler

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        connection = connections.get(request.protocol)
        if connection is None:
            return await inner(request)
        connection.request_started()
        try:
            return await inner(request)
        finally:
            connection.request_done()

    server.request_handler = handle

