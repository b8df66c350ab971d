"""A tiny authoritative DNS server on 127.0.0.1 for tests: UDP and TCP on one port.

    records = {("x.test", "A"): ["127.0.0.1"], ("_acme-challenge.x.test", "TXT"): ["abc"]}
    async with LocalDnsServer(records) as dns_server:      # on the running event loop
        ValidationSettings(resolver=dns_server.address)     # "127.0.0.1:PORT"
    with LocalDnsServer(records) as dns_server:             # in its own thread, for subprocesses
        subprocess.run([..., "--dns.resolvers", dns_server.address])

Values are presentation format ("127.0.0.1", "target.x.test.", an SOA's fields), except TXT,
whose value is the string itself, unquoted. Names are matched case-insensitively, without the
trailing dot. A name with no record of the asked type answers NOERROR with no data if it, or a
name below it, has any record, and NXDOMAIN otherwise; an SOA record at an enclosing name is put
in the authority section of such answers, which is how lego finds the zone. CNAMEs are followed
within the server's own data. UDP answers larger than the client's EDNS payload (512 bytes
without EDNS) come back truncated, so clients retry over TCP.

Records change at run time through `set`/`add`/`remove`, or from another process through RFC 2136
UPDATE messages (no TSIG; prerequisites ignored), e.g. lego's rfc2136 provider or dnspython's
dns.update. Every question is logged in `queries` as (name, type, "udp" | "tcp").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.update

RecordKey = tuple[str, str]
TTL = 60


def _norm(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".").lower()


class LocalDnsServer:
    """Authoritative answers from `records`, on HOST:PORT over UDP and TCP (PORT 0: a free one)."""

    def __init__(self, records: Mapping[RecordKey, Iterable[str]] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str, str]] = []
        self._records: dict[RecordKey, list[str]] = {}
        self._lock = threading.Lock()
        for (name, rtype), values in (records or {}).items():
            self.set(name, rtype, values)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        """"host:port", the form of `serve --resolver` and lego's --dns.resolvers."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # --- records ---------------------------------------------------------------------------

    def set(self, name: str, rtype: str, values: Iterable[str]) -> None:
        """Replace the records of NAME/RTYPE (an empty list removes them)."""
        key = (_norm(name), rtype.upper())
        values = list(values)
        for value in values:
            self._to_rdata(key[1], value)  # refuse a bad value now, not when it is asked for
        with self._lock:
            if values:
                self._records[key] = values
            else:
                self._records.pop(key, None)

    def add(self, name: str, rtype: str, value: str) -> None:
        key = (_norm(name), rtype.upper())
        self._to_rdata(key[1], value)
        with self._lock:
            existing = self._records.setdefault(key, [])
            if value not in existing:
                existing.append(value)

    def remove(self, name: str, rtype: str, value: str | None = None) -> None:
        """Remove one value of NAME/RTYPE, or all of them when VALUE is None."""
        key = (_norm(name), rtype.upper())
        with self._lock:
            if value is None:
                self._records.pop(key, None)
            elif value in self._records.get(key, []):
                self._records[key].remove(value)
                if not self._records[key]:
                    del self._records[key]

    def records(self) -> dict[RecordKey, list[str]]:
        with self._lock:
            return {key: list(values) for key, values in self._records.items()}

    # --- running on the current loop ------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _attempt in range(20):
            # UDP first on the asked (or any free) port, then TCP on the same one.
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.port), family=family)
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port,
                                                       family=family)
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise
                continue
            self._udp, self.port = udp, port
            return
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # Close open connections and let their handlers end: a handler still waiting when
            # the loop shuts down is cancelled, which Python 3.11's streams log as an error.
            clients = dict(self._tcp_clients)
            for writer in clients:
                writer.close()
            if clients:
                await asyncio.wait(clients.values(), timeout=2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> LocalDnsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- running in a thread (for tests that drive subprocesses) ---------------------------

    def start_thread(self) -> LocalDnsServer:
        """Serve from a daemon thread with its own event loop; return once it listens."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread_loop = loop
        self._thread = threading.Thread(target=run, name="local-dns", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        if self._thread is None or self._thread_loop is None:
            return
        self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
        self._thread.join(10)
        self._thread = self._thread_loop = None

    def __enter__(self) -> LocalDnsServer:
        return self.start_thread()

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_thread()

    # --- answering ---------------------------------------------------------------------------

    def handle(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one DNS message, or None to drop it (unparseable)."""
        try:
            request = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if request.opcode() == dns.opcode.UPDATE:
            return self._update(request).to_wire()
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        if request.opcode() != dns.opcode.QUERY or len(request.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = request.question[0]
        qname, qtype = _norm(question.name), dns.rdatatype.to_text(question.rdtype)
        self.queries.append((qname, qtype, transport))
        self._answer(response, qname, qtype)
        if transport == "tcp":
            # Without max_size dnspython would cap a reply at the query's EDNS payload.
            return response.to_wire(max_size=65535)
        limit = max(512, request.payload) if request.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _answer(self, response: dns.message.Message, qname: str, qtype: str) -> None:
        records = self.records()
        name = qname
        for _depth in range(8):  # CNAME chains within our data
            values = records.get((name, qtype))
            if values:
                response.answer.append(self._rrset(name, qtype, values))
                return
            cname = records.get((name, "CNAME"))
            if not cname or qtype == "CNAME":
                break
            response.answer.append(self._rrset(name, "CNAME", cname[:1]))
            name = _norm(cname[0])
        if response.answer:
            return  # a CNAME leading outside our data: the client follows it
        exists = any(n == name or n.endswith("." + name) for n, _ in records)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa_owner = next((z for z in _ancestors(name) if (z, "SOA") in records), None)
        if soa_owner is not None:
            response.authority.append(self._rrset(soa_owner, "SOA", records[(soa_owner, "SOA")]))

    def _update(self, request: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(request)
        if not isinstance(request, dns.update.UpdateMessage):
            response.set_rcode(dns.rcode.FORMERR)
            return response
        for rrset in request.update:
            name, rtype = _norm(rrset.name), dns.rdatatype.to_text(rrset.rdtype)
            # dnspython keeps an update's class (ANY, NONE: deletions) in `deleting`.
            if rrset.deleting == dns.rdataclass.ANY:  # delete an RRset, or all RRsets at NAME
                if rrset.rdtype == dns.rdatatype.ANY:
                    for key in [k for k in self.records() if k[0] == name]:
                        self.remove(*key)
                else:
                    self.remove(name, rtype)
            elif rrset.deleting == dns.rdataclass.NONE:  # delete RRs
                for rdata in rrset:
                    self.remove(name, rtype, _from_rdata(rdata))
            else:
                for rdata in rrset:
                    self.add(name, rtype, _from_rdata(rdata))
        return response

    def _rrset(self, name: str, rtype: str, values: list[str]) -> dns.rrset.RRset:
        rdatas = [self._to_rdata(rtype, value) for value in values]
        return dns.rrset.from_rdata_list(dns.name.from_text(name), TTL, rdatas)

    @staticmethod
    def _to_rdata(rtype: str, value: str) -> dns.rdata.Rdata:
        if rtype == "TXT":
            raw = value.encode()
            chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
            return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
        return dns.rdata.from_text(dns.rdataclass.IN, rtype, value, origin=dns.name.root,
                                   relativize=False)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_clients[writer] = task
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.handle(await reader.readexactly(length), "tcp")
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.pop(writer, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _ancestors(name: str) -> list[str]:
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def _from_rdata(rdata: dns.rdata.Rdata) -> str:
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
        return b"".join(rdata.strings).decode()
    return rdata.to_text()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: LocalDnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.handle(data, "udp")
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)
