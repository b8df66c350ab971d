"""Connection limits on a live CA: the header deadline, keep-alive timeout, per-address and total
caps (appliance/server/connections.py).

The CA runs under `prlimit --nofile=512:512`, so `maxConnections: 0` resolves to 512 - 128 = 384.
Clients come from distinct loopback source addresses (127.0.0.x: every one is this host) so that
the per-address cap of 8 and the total cap can be told apart; the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import CaServer, free_port

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 5.0
PER_ADDRESS = 8
NOFILE = 512
TOTAL = NOFILE - 128  # what maxConnections 0 makes of RLIMIT_NOFILE
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def ca(ca: CaServer) -> CaServer:
    """conftest's CA, restarted with small limits under a descriptor limit of NOFILE."""
    ca.stop()
    config = json.loads(ca.config_path.read_text())
    config.update(headerTimeout=f"{HEADER_TIMEOUT:g}s", keepaliveTimeout=f"{KEEPALIVE_TIMEOUT:g}s",
                  maxConnectionsPerAddress=PER_ADDRESS,
                  insecureAddress=f"127.0.0.1:{free_port()}")
    ca.config_path.write_text(json.dumps(config))
    ca.start(prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"))
    return ca  # conftest's fixture stops it


def plain_port(ca: CaServer) -> int:
    return int(json.loads(ca.config_path.read_text())["insecureAddress"].rpartition(":")[2])


def worker_pids(ca: CaServer) -> list[int]:
    assert ca.process is not None
    pid = ca.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children
            if Path(f"/proc/{c}/cmdline").read_bytes().startswith(b"applianctl: worker")]


async def open_tls(ca: CaServer, source: str = "127.0.0.1"
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", ca.port, ssl=ca.ssl_context(), server_hostname="localhost",
        local_addr=(source, 0)), 5)


async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(HEALTH)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n")[0]


async def closed_after(reader: asyncio.StreamReader, start: float, limit: float) -> float | None:
    """Seconds from START until the server closed the connection; None if open after LIMIT."""
    try:
        async with asyncio.timeout(limit - (time.monotonic() - start)):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - start


async def served_meanwhile(ca: CaServer, stop: asyncio.Event) -> list[float]:
    """Latencies of /health on fresh connections (from 127.0.0.2) until STOP."""
    latencies: list[float] = []
    while not stop.is_set():
        start = time.monotonic()
        reader, writer = await open_tls(ca, "127.0.0.2")
        assert await health(reader, writer) == b"HTTP/1.1 200 OK"
        latencies.append(time.monotonic() - start)
        writer.close()
        await asyncio.sleep(0.2)
    return latencies


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def test_descriptor_limit_sets_the_total_cap(ca: CaServer) -> None:
    pids = worker_pids(ca)
    assert len(pids) == 2, pids
    for pid in [*pids, ca.process.pid if ca.process else 0]:
        soft = subprocess.run(["prlimit", "--pid", str(pid), "--nofile", "--output", "SOFT",
                               "--noheadings"], capture_output=True, text=True, check=True)
        assert int(soft.stdout) == NOFILE, f"process {pid}: RLIMIT_NOFILE {soft.stdout!r}"
    # 400 connections from 50 addresses (8 each, within the per-address cap): the first TOTAL
    # are admitted (they wait for a ClientHello), the rest are closed at once.
    sockets: list[socket.socket] = []
    try:
        for i in range(400):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((f"127.0.1.{i // PER_ADDRESS + 1}", 0))
            sock.connect(("127.0.0.1", ca.port))
        await asyncio.sleep(0.7)
        refused = 0
        for sock in sockets:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                refused += sock.recv(1) == b""
        most_fds = max(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in pids)
    finally:
        for sock in sockets:
            sock.close()
    assert refused == 400 - TOTAL, f"{refused} of 400 refused; the cap is {TOTAL}"
    assert most_fds < NOFILE, f"a worker holds {most_fds} descriptors of {NOFILE}"
    await asyncio.sleep(HEADER_TIMEOUT + 0.5)  # the admitted ones pass their deadline
    reader, writer = await open_tls(ca)
    assert await health(reader, writer) == b"HTTP/1.1 200 OK"
    close(writer)


async def test_trickling_client_is_cut_at_the_header_deadline(ca: CaServer) -> None:
    stop = asyncio.Event()
    meanwhile = asyncio.create_task(served_meanwhile(ca, stop))
    start = time.monotonic()
    reader, writer = await open_tls(ca)
    cut_after = None
    try:
        for byte in HEALTH:
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            cut_after = await closed_after(reader, start, min(time.monotonic() - start + 1,
                                                              HEADER_TIMEOUT + 4))
            if cut_after is not None or time.monotonic() - start > HEADER_TIMEOUT + 4:
                break
    finally:
        close(writer)
        stop.set()
    latencies = await meanwhile
    assert cut_after is not None, "a client trickling one byte a second was never cut off"
    assert HEADER_TIMEOUT - 0.5 < cut_after < HEADER_TIMEOUT + 1.5, cut_after
    assert latencies and max(latencies) < 1.0, latencies


async def test_idle_connections_are_closed_at_the_deadline(ca: CaServer) -> None:
    stop = asyncio.Event()
    meanwhile = asyncio.create_task(served_meanwhile(ca, stop))
    start = time.monotonic()
    # 200 connections, TLS done, nothing sent, from 25 addresses (8 each).
    connections = await asyncio.gather(*(open_tls(ca, f"127.0.2.{i // PER_ADDRESS + 1}")
                                         for i in range(200)))
    try:
        cut = await asyncio.gather(*(closed_after(reader, start, HEADER_TIMEOUT + 4)
                                     for reader, _ in connections))
    finally:
        for _, writer in connections:
            close(writer)
        stop.set()
    latencies = await meanwhile
    still_open = sum(c is None for c in cut)
    assert still_open == 0, f"{still_open} of 200 idle connections outlived the deadline"
    assert max(c for c in cut if c is not None) < HEADER_TIMEOUT + 2, cut
    assert latencies and max(latencies) < 1.0, latencies


async def test_connections_over_the_per_address_cap_are_refused(ca: CaServer) -> None:
    source = "127.0.3.1"
    held = [await open_tls(ca, source) for _ in range(PER_ADDRESS)]
    try:
        for reader, writer in held:  # busy: a request each, then keep-alive
            assert await health(reader, writer) == b"HTTP/1.1 200 OK"
        start = time.monotonic()
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await open_tls(ca, source)
        assert time.monotonic() - start < 1.0, "the refusal was not immediate"
        # The cap spans both listeners: the plain-HTTP one refuses this address too.
        reader, writer = await asyncio.open_connection("127.0.0.1", plain_port(ca),
                                                       local_addr=(source, 0))
        assert await asyncio.wait_for(reader.read(1), 1) == b"", "plain listener admitted it"
        close(writer)
        assert await health(*held[0]) == b"HTTP/1.1 200 OK", "an admitted connection stopped"
        close(held.pop()[1])
        await asyncio.sleep(0.3)  # the worker reports the close within ~50 ms
        again = await open_tls(ca, source)
        held.append(again)
        assert await health(*again) == b"HTTP/1.1 200 OK"
    finally:
        for _, writer in held:
            close(writer)


async def test_idle_keepalive_connection_is_closed(ca: CaServer) -> None:
    reader, writer = await open_tls(ca)
    try:
        assert await health(reader, writer) == b"HTTP/1.1 200 OK"
        start = time.monotonic()
        cut = await closed_after(reader, start, KEEPALIVE_TIMEOUT + 3)
    finally:
        close(writer)
    assert cut is not None, f"an idle keep-alive connection outlived {KEEPALIVE_TIMEOUT + 3} s"
    assert KEEPALIVE_TIMEOUT - 0.5 < cut < KEEPALIVE_TIMEOUT + 2, cut


async def test_plain_listener_has_the_header_deadline(ca: CaServer) -> None:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_port(ca))
    try:
        writer.write(b"GET /crl HTTP/1.1\r\n")
        cut = await closed_after(reader, start, HEADER_TIMEOUT + 4)
    finally:
        close(writer)
    assert cut is not None and cut < HEADER_TIMEOUT + 1.5, cut
