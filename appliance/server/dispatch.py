"""The supervisor accepts connections and hands them to the workers in turn.

With SO_REUSEPORT the kernel spreads connections over the workers by a hash of the addresses, so
32 keep-alive connections can land 14 on one worker and 18 on the other, and the busier worker
sets the tail latency. Here the supervisor owns the listening sockets, accepts, and passes each
connection's descriptor (SCM_RIGHTS over a per-worker socketpair) to the next live worker; the
worker does the TLS handshake and serves it. A connection costs the supervisor one accept and one
sendmsg; keep-alive requests never touch it.

The plain-HTTP listener (insecureAddress: CRL, OCSP, root) is handed over the same way, tagged,
so both listeners share one count of connections per client address and in total; the excess
is refused at accept time (connections.py says how workers report closes). Binding in the
supervisor also means a second `applianctl serve` on the same addresses fails to bind instead of
silently sharing the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web
from aiohttp.web_runner import BaseSite

from appliance.errors import ApplianceError
from appliance.server.connections import (
    Admission,
    BoundedConnection,
    CloseReports,
    ConnectionLimits,
    bound_requests,
    read_close_reports,
)

log = structlog.get_logger("appliance.dispatch")

ACCEPT_BATCH = 64  # connections accepted per wakeup before the loop looks at other work
ACCEPT_RETRY_SECONDS = 1.0  # after accept() failed for want of descriptors or memory
SWEEP_SECONDS = 1.0  # how often the supervisor looks for workers gone with their connections
TLS = b"s"  # hand-over tags: which listener a connection came in on
PLAIN = b"p"
HAND_OVER = struct.Struct("!cQ")  # tag, connection id


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind (not yet listen) every address HOST resolves to, as asyncio's create_server does."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ApplianceError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # SO_REUSEADDR passes over TIME_WAIT leftovers of a previous run, never a live
            # listener; no SO_REUSEPORT, so a second server cannot join this port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ApplianceError(f"cannot listen on {host}:{port}: {e.strerror}") from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listeners:
    """The supervisor's listening sockets: bound at start, listening from first use.

    HOST:PORT is the TLS API; PLAIN, when given, the plain-HTTP listener. LIMITS caps the
    connections both hold together.
    """

    def __init__(self, host: str, port: int, backlog: int = 1024, *,
                 limits: ConnectionLimits, plain: tuple[str, int] | None = None) -> None:
        self.sockets = bind_listeners(host, port)
        try:
            plain_sockets = bind_listeners(*plain) if plain else []
        except BaseException:
            for sock in self.sockets:
                sock.close()
            raise
        self._tagged = [(TLS, sock) for sock in self.sockets] + [
            (PLAIN, sock) for sock in plain_sockets]
        self._backlog = backlog
        self._listening = False
        self._reading = False
        self._targets: Callable[[], Sequence[socket.socket]] | None = None
        self._next = 0
        self.admission = Admission(limits)
        # The workers' channels we read close reports from: our own duplicate of each, so that
        # the pool closing its end when a worker exits cannot leave a stale descriptor
        # registered with the event loop.
        self._reports: dict[socket.socket, socket.socket] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def listen(self) -> None:
        if not self._listening:
            for _, sock in self._tagged:
                sock.listen(self._backlog)
            self._listening = True

    def copies(self) -> list[socket.socket]:
        """Listening duplicates of the TLS sockets for an aiohttp site (the sealed server)."""
        self.listen()
        return [sock.dup() for sock in self.sockets]

    # -- dispatching -------------------------------------------------------------------------
    def dispatch(self, targets: Callable[[], Sequence[socket.socket]]) -> None:
        """Accept and hand connections round-robin to TARGETS() (the live workers' channels)."""
        self.listen()
        self._targets = targets
        self.resume()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def resume(self) -> None:
        """Read the listening sockets again (after pause(), or when a worker became ready)."""
        if self._targets is None or self._reading:
            return
        loop = asyncio.get_running_loop()
        for tag, sock in self._tagged:
            loop.add_reader(sock.fileno(), self._accept, sock, tag)
        self._reading = True

    def pause(self) -> None:
        """Leave new connections in the kernel's backlog until resume()."""
        if not self._reading:
            return
        loop = asyncio.get_running_loop()
        for _, sock in self._tagged:
            loop.remove_reader(sock.fileno())
        self._reading = False

    def stop_dispatching(self) -> None:
        self.pause()
        self._targets = None

    def close(self) -> None:
        self.stop_dispatching()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for channel in list(self._reports):
            self._forget(channel)
        for _, sock in self._tagged:
            sock.close()

    def _accept(self, listener: socket.socket, tag: bytes) -> None:
        assert self._targets is not None
        for _ in range(ACCEPT_BATCH):
            targets = self._targets()
            if not targets:
                self.pause()  # no worker can take it now: leave it queued in the kernel
                return
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: take the next one
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the socket stays readable, so retrying at
                # once would spin; leave the connections queued and look again in a while.
                log.warning("accept_failed", reason=e.strerror, retry_in_s=ACCEPT_RETRY_SECONDS)
                self.pause()
                asyncio.get_running_loop().call_later(ACCEPT_RETRY_SECONDS, self.resume)
                return
            with conn:
                peer = str(address[0])
                if self.admission.admit(peer):  # else closed at once, before any handshake
                    self._hand_over(conn, targets, tag, peer)

    def _hand_over(self, conn: socket.socket, targets: Sequence[socket.socket], tag: bytes,
                   peer: str) -> None:
        conn_id = self.admission.next_id()
        message = HAND_OVER.pack(tag, conn_id)
        for _ in range(len(targets)):
            channel = targets[self._next % len(targets)]
            self._next += 1
            try:
                socket.send_fds(channel, [message], [conn.fileno()])
            except (BlockingIOError, InterruptedError):
                continue  # that worker's queue is full: try the next one
            except OSError as e:  # the worker went away between the check and the send
                log.warning("handover_failed", reason=e.strerror)
                continue
            self.admission.opened(conn_id, channel, peer)
            if channel not in self._reports:
                self._watch(channel)
            return
        log.warning("connection_dropped", reason="no worker took the connection")

    # -- close reports -----------------------------------------------------------------------
    def _watch(self, channel: socket.socket) -> None:
        ours = channel.dup()
        ours.setblocking(False)
        self._reports[channel] = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._read_reports, ours)

    def _read_reports(self, ours: socket.socket) -> None:
        for conn_id in read_close_reports(ours):
            self.admission.closed(conn_id)

    def _forget(self, channel: socket.socket) -> None:
        ours = self._reports.pop(channel)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(ours.fileno())
        self._read_reports(ours)  # what it said before it went
        ours.close()
        self.admission.forget_channel(channel)

    def _sweep(self) -> None:
        """Forget the connections of workers that exited (the pool closed their channel)."""
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        for channel in [c for c in self._reports if c.fileno() < 0]:
            self._forget(channel)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end) of a connection hand-over channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    return ours, theirs


class HandOverChannel:
    """A worker's end of the hand-over channel: connections in, batched close reports out."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel
        self._channel.setblocking(False)
        self.reports = CloseReports(channel)
        self._sites: dict[bytes, HandedOverSite] = {}

    def attach(self, tag: bytes, site: HandedOverSite) -> None:
        if not self._sites:
            asyncio.get_running_loop().add_reader(self._channel.fileno(), self._receive)
        self._sites[tag] = site

    def detach(self, tag: bytes) -> None:
        self._sites.pop(tag, None)
        if not self._sites:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self.reports.flush()

    def _receive(self) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self._channel, HAND_OVER.size, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("handover_receive_failed", reason=e.strerror)
                return
            if flags & socket.MSG_CTRUNC:  # out of descriptors: the kernel closed it
                log.warning("handover_truncated", reason="out of file descriptors")
            if len(data) != HAND_OVER.size:
                for fd in fds:
                    socket.socket(fileno=fd).close()
                return
            tag, conn_id = HAND_OVER.unpack(data)
            site = self._sites.get(tag)
            if not fds or site is None:
                for fd in fds:
                    socket.socket(fileno=fd).close()
                self.reports.closed(conn_id)
                continue
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            site.serve(sock, functools.partial(self.reports.closed, conn_id))


class HandedOverSite(BaseSite):
    """An aiohttp site serving the connections the supervisor hands over, tagged TAG."""

    __slots__ = ("_channel", "_connections", "_limits", "_pending", "_tag")

    def __init__(self, runner: web.BaseRunner, channel: HandOverChannel, tag: bytes,
                 ssl_context: ssl.SSLContext | None, limits: ConnectionLimits) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._channel = channel
        self._tag = tag
        self._limits = limits
        self._pending: set[asyncio.Task[object]] = set()
        self._connections: dict[object, BoundedConnection] = {}

    @property
    def name(self) -> str:
        return "connections handed over by the supervisor"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        bound_requests(server, self._connections)
        self._channel.attach(self._tag, self)

    async def stop(self) -> None:
        self._channel.detach(self._tag)
        for task in list(self._pending):  # handshakes not finished: those clients retry
            task.cancel()
        await super().stop()

    def serve(self, sock: socket.socket, on_close: Callable[[], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(sock, on_close))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve(self, sock: socket.socket, on_close: Callable[[], None]) -> None:
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        timeout = self._limits.header_timeout
        # The deadline counts from the hand-over: the TLS handshake is part of it.
        connection = BoundedConnection(server, self._connections, loop.time() + timeout,
                                       timeout, on_close)
        try:
            if self._ssl_context is None:
                await loop.connect_accepted_socket(lambda: connection, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: connection, sock, ssl=self._ssl_context,
                    ssl_handshake_timeout=timeout)
        except (OSError, EOFError) as e:  # ssl.SSLError and TimeoutError are OSErrors
            # A client that goes away or fails the handshake: not the server's fault.
            log.debug("handshake_failed", reason=str(e)[:200])
            sock.close()
            connection.release()
        except asyncio.CancelledError:
            sock.close()
            connection.release()
            raise
