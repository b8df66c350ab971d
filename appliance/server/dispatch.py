"""The supervisor accepts connections and hands them to the workers in turn.

With SO_REUSEPORT the kernel spreads connections over the workers by a hash of the addresses, so
32 keep-alive connections can land 14 on one worker and 18 on the other, and the busier worker
sets the tail latency. Here the supervisor owns the listening sockets, accepts, and passes each
connection's descriptor (SCM_RIGHTS over a per-worker socketpair) to the next live worker; the
worker does the TLS handshake and serves it. A connection costs the supervisor one accept and one
sendmsg; keep-alive requests never touch it.

Binding in the supervisor also means a second `applianctl serve` on the same address fails to
bind instead of silently sharing the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web
from aiohttp.web_runner import BaseSite

from appliance.errors import ApplianceError

log = structlog.get_logger("appliance.dispatch")

ACCEPT_BATCH = 64  # connections accepted per wakeup before the loop looks at other work
HANDSHAKE_TIMEOUT = 30.0
ACCEPT_RETRY_SECONDS = 1.0  # after accept() failed for want of descriptors or memory


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
    """The supervisor's listening sockets: bound at start, listening from first use."""

    def __init__(self, host: str, port: int, backlog: int = 1024) -> None:
        self.sockets = bind_listeners(host, port)
        self._backlog = backlog
        self._listening = False
        self._reading = False
        self._targets: Callable[[], Sequence[socket.socket]] | None = None
        self._next = 0

    def listen(self) -> None:
        if not self._listening:
            for sock in self.sockets:
                sock.listen(self._backlog)
            self._listening = True

    def copies(self) -> list[socket.socket]:
        """Listening duplicates for an aiohttp site (closing a site closes its sockets)."""
        self.listen()
        return [sock.dup() for sock in self.sockets]

    # -- dispatching -------------------------------------------------------------------------
    def dispatch(self, targets: Callable[[], Sequence[socket.socket]]) -> None:
        """Accept and hand connections round-robin to TARGETS() (the live workers' channels)."""
        self.listen()
        self._targets = targets
        self.resume()

    def resume(self) -> None:
        """Read the listening sockets again (after pause(), or when a worker became ready)."""
        if self._targets is None or self._reading:
            return
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._reading = True

    def pause(self) -> None:
        """Leave new connections in the kernel's backlog until resume()."""
        if not self._reading:
            return
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
        self._reading = False

    def stop_dispatching(self) -> None:
        self.pause()
        self._targets = None

    def close(self) -> None:
        self.stop_dispatching()
        for sock in self.sockets:
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        assert self._targets is not None
        for _ in range(ACCEPT_BATCH):
            targets = self._targets()
            if not targets:
                self.pause()  # no worker can take it now: leave it queued in the kernel
                return
            try:
                conn, _ = listener.accept()
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
                self._hand_over(conn, targets)

    def _hand_over(self, conn: socket.socket, targets: Sequence[socket.socket]) -> None:
        for _ in range(len(targets)):
            channel = targets[self._next % len(targets)]
            self._next += 1
            try:
                socket.send_fds(channel, [b"c"], [conn.fileno()])
                return
            except (BlockingIOError, InterruptedError):
                continue  # that worker's queue is full: try the next one
            except OSError as e:  # the worker went away between the check and the send
                log.warning("handover_failed", reason=e.strerror)
                continue
        log.warning("connection_dropped", reason="no worker took the connection")


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end) of a connection hand-over channel."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    return ours, theirs


class HandedOverSite(BaseSite):
    """An aiohttp site serving the connections the supervisor hands over on CHANNEL."""

    __slots__ = ("_channel", "_pending")

    def __init__(self, runner: web.BaseRunner, channel: socket.socket,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._channel = channel
        self._channel.setblocking(False)
        self._pending: set[asyncio.Task[object]] = set()

    @property
    def name(self) -> str:
        return "connections handed over by the supervisor"

    async def start(self) -> None:
        await super().start()
        asyncio.get_running_loop().add_reader(self._channel.fileno(), self._receive)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
        for task in list(self._pending):  # handshakes not finished: those clients retry
            task.cancel()
        await super().stop()

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, fds, flags, _ = socket.recv_fds(self._channel, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("handover_receive_failed", reason=e.strerror)
                return
            if flags & socket.MSG_CTRUNC:  # out of descriptors: the kernel closed some
                log.warning("handover_truncated", reason="out of file descriptors")
            if not fds:
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                task = loop.create_task(self._serve(sock))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _serve(self, sock: socket.socket) -> None:
        server = self._runner.server
        assert server is not None
        try:
            if self._ssl_context is None:
                await asyncio.get_running_loop().connect_accepted_socket(server, sock)
            else:
                await asyncio.get_running_loop().connect_accepted_socket(
                    server, sock, ssl=self._ssl_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, EOFError) as e:  # ssl.SSLError and TimeoutError are OSErrors
            # A client that goes away or fails the handshake: not the server's fault.
            log.debug("handshake_failed", reason=str(e)[:200])
            sock.close()
