"""ACME challenge validators against real servers on 127.0.0.1: aiohttp for http-01, an asyncio
TLS server for tls-alpn-01, and tests/support/dns_server.py for dns-01 and name resolution."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import dns.update
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.acme.api import validation_settings
from appliance.acme.challenges import (
    ChallengeFailed,
    HttpValidationClient,
    ValidationSettings,
    parse_resolver_address,
    resolve_addresses,
    validate_dns01,
    validate_http01,
    validate_tls_alpn01,
)
from appliance.acme.validation_addresses import AddressPolicy, parse_ranges
from appliance.config import parse_config
from appliance.errors import ConfigError
from tests.support.dns_server import LocalDnsServer

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHZ = TOKEN + ".nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ"
ACME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
FAST = 2.0  # seconds: every validation here answers at once, or is meant to time out sooner
# Validation denies loopback by default; these servers all listen there, so it is allowed.
LOOPBACK_ALLOWED = AddressPolicy(allow_ranges=parse_ranges(["127.0.0.0/8", "::1/128"]))


def local_settings(**fields: Any) -> ValidationSettings:
    """ValidationSettings that may contact 127.0.0.0/8 and ::1 (as ca.json's
    acme.validationAllowRanges would)."""
    return ValidationSettings(addresses=LOOPBACK_ALLOWED, **fields)


def txt_value(key_authorization: str) -> str:
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def expect_failure(call: Awaitable[None], problem_type: str, *fragments: str
                         ) -> ChallengeFailed:
    with pytest.raises(ChallengeFailed) as caught:
        await call
    failure = caught.value
    assert failure.problem_type == problem_type, f"{failure.problem_type}: {failure.detail}"
    for fragment in fragments:
        assert fragment in failure.detail, f"{fragment!r} not in {failure.detail!r}"
    return failure


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def self_signed(tmp_path: Path, sans: list[x509.GeneralName], *,
                acme_value: bytes | None = None, critical: bool = True) -> ssl.SSLContext:
    """A server context with a fresh self-signed P-256 certificate (and acmeIdentifier)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme challenge test")])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1))
               .not_valid_after(now + timedelta(hours=1)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if acme_value is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(ACME_OID, acme_value),
                                        critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def acme_extension_value(key_authorization: str) -> bytes:
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()


# --- http-01 ---------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HttpSite:
    """A real aiohttp server; `routes` maps a path to a handler, `hosts` logs Host headers."""

    port: int = 0
    routes: dict[str, Handler] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def text(self, path: str, body: str | bytes, status: int = 200) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            data = body.encode() if isinstance(body, str) else body
            return web.Response(body=data, status=status)
        self.routes[path] = handler

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": location})
        self.routes[path] = handler


@contextlib.asynccontextmanager
async def http_site(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None,
                    port: int = 0
                    ) -> AsyncIterator[HttpSite]:
    site = HttpSite()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        site.hosts.append(request.headers.get("Host", ""))
        handler = site.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not here")
        return await handler(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp_site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await tcp_site.start()
    site.port = int(runner.addresses[0][1])
    try:
        yield site
    finally:
        site.release.set()
        await runner.cleanup()


@pytest.fixture
async def web_site() -> AsyncIterator[HttpSite]:
    async with http_site() as site:
        yield site


CHALLENGE = f"/.well-known/acme-challenge/{TOKEN}"


async def test_http01_accepts_the_key_authorization_with_trailing_whitespace(
        web_site: HttpSite) -> None:
    web_site.text(CHALLENGE, KEY_AUTHZ + "\r\n \n")
    await validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                          local_settings(http_port=web_site.port, timeout=FAST))
    assert web_site.hosts == [f"127.0.0.1:{web_site.port}"]


async def test_http01_rejects_a_wrong_body_without_repeating_it(web_site: HttpSite) -> None:
    web_site.text(CHALLENGE, "someone else's key authorization")
    failure = await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=FAST)),
        "incorrectResponse", "wrong key authorization", KEY_AUTHZ, CHALLENGE)
    assert "someone else" not in failure.detail, failure.detail


async def test_http01_rejects_leading_whitespace_and_a_longer_body(web_site: HttpSite) -> None:
    settings = local_settings(http_port=web_site.port, timeout=FAST)
    web_site.text(CHALLENGE, " " + KEY_AUTHZ)
    await expect_failure(validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, settings),
                         "incorrectResponse")
    web_site.text(CHALLENGE, KEY_AUTHZ + "x")
    await expect_failure(validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, settings),
                         "incorrectResponse")


async def test_http01_reports_the_class_of_a_404_not_the_status(web_site: HttpSite) -> None:
    failure = await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=FAST)),
        "incorrectResponse", "answered with a 4xx status")
    assert "404" not in failure.detail.replace(str(web_site.port), ""), failure.detail


async def test_http01_reads_no_more_than_64_kib(web_site: HttpSite) -> None:
    web_site.text(CHALLENGE, KEY_AUTHZ + " " * (1024 * 1024))
    await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=FAST)),
        "incorrectResponse", "more than 64 KiB")


async def test_http01_follows_relative_and_absolute_http_redirects(web_site: HttpSite) -> None:
    web_site.redirect(CHALLENGE, "/moved", status=301)
    web_site.redirect("/moved", web_site.url("/final"), status=307)
    web_site.text("/final", KEY_AUTHZ)
    await validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                          local_settings(http_port=web_site.port, timeout=FAST))


async def test_http01_follows_a_redirect_to_https_without_verifying_it(
        web_site: HttpSite, tmp_path: Path) -> None:
    context = self_signed(tmp_path, [x509.DNSName("not-this-host.test")])
    async with http_site(ssl_context=context) as tls_site:
        tls_site.text("/over-tls", KEY_AUTHZ)
        web_site.redirect(CHALLENGE, tls_site.url("/over-tls", scheme="https"))
        # The https port followed is tlsPort (443 in production).
        await validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                              local_settings(http_port=web_site.port, tls_port=tls_site.port,
                                             timeout=FAST))
        assert tls_site.hosts == [f"127.0.0.1:{tls_site.port}"]


async def test_http01_refuses_a_redirect_to_another_scheme(web_site: HttpSite) -> None:
    web_site.redirect(CHALLENGE, "ftp://127.0.0.1/key-authorization")
    failure = await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=FAST)),
        "incorrectResponse", "redirected to another scheme", "only http and https")
    assert "ftp" not in failure.detail and "key-authorization" not in failure.detail


def redirect_chain(site: HttpSite, hops: int) -> None:
    """CHALLENGE -> /hop/HOPS-1 -> ... -> /hop/0 -> /final: HOPS redirects in all."""
    site.redirect(CHALLENGE, f"/hop/{hops - 2}" if hops > 1 else "/final")
    for n in range(hops - 1):
        site.redirect(f"/hop/{n}", f"/hop/{n - 1}" if n else "/final")
    site.text("/final", KEY_AUTHZ)


async def test_http01_follows_ten_redirects_and_refuses_eleven(web_site: HttpSite) -> None:
    settings = local_settings(http_port=web_site.port, timeout=FAST)
    redirect_chain(web_site, 10)
    await validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, settings)
    assert len(web_site.hosts) == 11

    web_site.routes.clear()
    redirect_chain(web_site, 11)
    await expect_failure(validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, settings),
                         "incorrectResponse", "more than 10 redirects")


async def test_http01_refuses_a_redirect_loop(web_site: HttpSite) -> None:
    web_site.redirect(CHALLENGE, CHALLENGE)
    await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=FAST,
                                       max_redirects=3)),
        "incorrectResponse", "more than 3 redirects")


async def test_http01_reports_a_refused_connection() -> None:
    await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=free_port(), timeout=FAST)),
        "connection", "cannot connect", "refused")


async def test_http01_times_out_as_a_whole(web_site: HttpSite) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FAST):
                await web_site.release.wait()
        return web.Response(text=KEY_AUTHZ)
    web_site.routes[CHALLENGE] = stall
    loop = asyncio.get_running_loop()
    started = loop.time()
    await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        local_settings(http_port=web_site.port, timeout=0.3)),
        "connection", "timed out")
    assert loop.time() - started < 1.0


async def test_http01_ipv6_identifier_is_bracketed() -> None:
    try:
        async with http_site(host="::1") as site:
            site.text(CHALLENGE, KEY_AUTHZ)
            await validate_http01("ip", "::1", TOKEN, KEY_AUTHZ,
                                  local_settings(http_port=site.port, timeout=FAST))
            assert site.hosts == [f"[::1]:{site.port}"]
    except OSError as exc:  # no IPv6 loopback: say so rather than pass silently
        pytest.fail(f"this test needs the IPv6 loopback ::1: {exc}", pytrace=False)


@pytest.mark.parametrize(("identifier_type", "value", "token"), [
    ("dns", "x.test/evil", TOKEN),
    ("dns", "*.x.test", TOKEN),
    ("ip", "x.test", TOKEN),
    ("email", "a@x.test", TOKEN),
    ("dns", "x.test", "../../etc/passwd"),
])
async def test_http01_refuses_malformed_input(identifier_type: str, value: str,
                                              token: str) -> None:
    await expect_failure(validate_http01(identifier_type, value, token, KEY_AUTHZ,
                                         local_settings(timeout=FAST)), "malformed")


# --- name resolution through the local DNS server -----------------------------------------------


@pytest.fixture
async def dns_server() -> AsyncIterator[LocalDnsServer]:
    records = {
        ("x.test", "A"): ["127.0.0.1"],
        ("web.x.test", "A"): ["127.0.0.1"],
        ("dual.x.test", "A"): ["127.0.0.1"],
        ("dual.x.test", "AAAA"): ["::1"],
        ("alias.x.test", "CNAME"): ["web.x.test."],
        ("_acme-challenge.x.test", "TXT"): ["unrelated", txt_value(KEY_AUTHZ)],
        ("_acme-challenge.wrong.x.test", "TXT"): [txt_value("another.authorization")],
        ("notxt.x.test", "A"): ["127.0.0.1"],
        ("_acme-challenge.notxt.x.test", "A"): ["127.0.0.2"],
    }
    async with LocalDnsServer(records) as server:
        yield server


async def test_http01_resolves_through_the_configured_resolver_and_sends_the_name(
        web_site: HttpSite, dns_server: LocalDnsServer) -> None:
    web_site.text(CHALLENGE, KEY_AUTHZ)
    settings = local_settings(http_port=web_site.port, resolver=dns_server.address,
                              timeout=FAST)
    await validate_http01("dns", "web.x.test", TOKEN, KEY_AUTHZ, settings)
    assert web_site.hosts == [f"web.x.test:{web_site.port}"]
    assert ("web.x.test", "A", "udp") in dns_server.queries


async def test_http01_follows_a_redirect_to_another_name_through_the_resolver(
        web_site: HttpSite, dns_server: LocalDnsServer) -> None:
    web_site.redirect(CHALLENGE, web_site.url("/final", host="alias.x.test"))
    web_site.text("/final", KEY_AUTHZ)
    settings = local_settings(http_port=web_site.port, resolver=dns_server.address,
                              timeout=FAST)
    await validate_http01("dns", "web.x.test", TOKEN, KEY_AUTHZ, settings)
    assert web_site.hosts[-1] == f"alias.x.test:{web_site.port}"


async def test_a_shared_http01_client_connects_and_resolves_anew_for_every_validation(
        web_site: HttpSite, dns_server: LocalDnsServer) -> None:
    peers: list[object] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text=KEY_AUTHZ)

    web_site.routes[CHALLENGE] = answer
    dns_server.set("moving.x.test", "A", ["127.0.0.1"])
    settings = local_settings(http_port=web_site.port, resolver=dns_server.address,
                              timeout=FAST)
    client = HttpValidationClient(settings)
    try:
        for _ in range(2):
            await validate_http01("dns", "moving.x.test", TOKEN, KEY_AUTHZ, settings, client)
        assert len(peers) == 2 and peers[0] != peers[1], (
            f"the second validation reused the first one's connection: {peers}")
        # The name now points where nothing listens: a cached address or a kept connection
        # would still reach the site.
        dns_server.set("moving.x.test", "A", ["127.0.0.9"])
        await expect_failure(validate_http01("dns", "moving.x.test", TOKEN, KEY_AUTHZ,
                                             settings, client), "connection", "refused")
        assert len(peers) == 2
    finally:
        await client.close()
    assert [q for q in dns_server.queries if q[:2] == ("moving.x.test", "A")][2:], (
        "each validation should have asked the resolver")


async def test_http01_without_an_address_is_a_dns_problem(dns_server: LocalDnsServer) -> None:
    settings = local_settings(resolver=dns_server.address, timeout=FAST)
    await expect_failure(validate_http01("dns", "missing.x.test", TOKEN, KEY_AUTHZ, settings),
                         "dns", "no address for missing.x.test")


async def test_resolve_addresses_with_the_resolver(dns_server: LocalDnsServer) -> None:
    settings = local_settings(resolver=dns_server.address, timeout=FAST)
    assert await resolve_addresses("dual.x.test", settings) == ["::1", "127.0.0.1"]
    assert await resolve_addresses("alias.x.test", settings) == ["127.0.0.1"]
    assert await resolve_addresses("192.0.2.7", settings) == ["192.0.2.7"]
    await expect_failure(resolve_addresses("nowhere.x.test", settings), "dns",
                         "no address for nowhere.x.test")
    # A name that exists with other records only: no address either.
    await expect_failure(resolve_addresses("_acme-challenge.x.test", settings), "dns",
                         "no address")


async def test_resolve_addresses_with_the_system_resolver_reads_etc_hosts() -> None:
    assert "127.0.0.1" in await resolve_addresses("localhost", local_settings(timeout=FAST))


async def test_a_silent_resolver_times_out_as_a_dns_problem() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        settings = local_settings(resolver=f"127.0.0.1:{port}", timeout=0.3)
        await expect_failure(resolve_addresses("x.test", settings), "dns", "timed out")


def test_settings_refuse_a_resolver_that_is_not_an_ip_and_port() -> None:
    assert parse_resolver_address("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver_address("[::1]:53") == ("::1", 53)
    assert parse_resolver_address("10.0.0.1") == ("10.0.0.1", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "::1:53:"):
        with pytest.raises(ValueError, match="resolver"):
            local_settings(resolver=bad)
    with pytest.raises(ValueError, match="timeout"):
        local_settings(timeout=0)


# --- dns-01 ----------------------------------------------------------------------------------


async def test_dns01_finds_the_digest_among_txt_records(dns_server: LocalDnsServer) -> None:
    await validate_dns01("x.test", KEY_AUTHZ,
                         local_settings(resolver=dns_server.address, timeout=FAST))
    assert ("_acme-challenge.x.test", "TXT", "udp") in dns_server.queries


async def test_dns01_rejects_a_wrong_value(dns_server: LocalDnsServer) -> None:
    failure = await expect_failure(
        validate_dns01("wrong.x.test", KEY_AUTHZ,
                       local_settings(resolver=dns_server.address, timeout=FAST)),
        "incorrectResponse", "_acme-challenge.wrong.x.test", txt_value(KEY_AUTHZ))
    # What the resolver answered is not repeated to the client.
    assert txt_value("another.authorization") not in failure.detail, failure.detail


async def test_dns01_nxdomain_is_a_dns_problem(dns_server: LocalDnsServer) -> None:
    await expect_failure(
        validate_dns01("absent.x.test", KEY_AUTHZ,
                       local_settings(resolver=dns_server.address, timeout=FAST)),
        "dns", "_acme-challenge.absent.x.test", "NXDOMAIN")


async def test_dns01_without_txt_records_says_so(dns_server: LocalDnsServer) -> None:
    await expect_failure(
        validate_dns01("notxt.x.test", KEY_AUTHZ,
                       local_settings(resolver=dns_server.address, timeout=FAST)),
        "incorrectResponse", "no TXT record at _acme-challenge.notxt.x.test")


async def test_dns01_falls_back_to_tcp_for_a_large_answer(dns_server: LocalDnsServer) -> None:
    filler = [f"{n:02d}-" + "f" * 60 for n in range(30)]  # ~2 KB: beyond a UDP answer
    dns_server.set("_acme-challenge.big.x.test", "TXT", [*filler, txt_value(KEY_AUTHZ)])
    await validate_dns01("big.x.test", KEY_AUTHZ,
                         local_settings(resolver=dns_server.address, timeout=FAST))
    asked = [q for q in dns_server.queries if q[0] == "_acme-challenge.big.x.test"]
    assert [q[2] for q in asked] == ["udp", "tcp"], asked


async def test_dns01_sees_records_published_by_rfc2136_update(
        dns_server: LocalDnsServer) -> None:
    """The way a client in another process (lego --dns rfc2136) publishes its TXT record."""
    host, port = parse_resolver_address(dns_server.address)
    update = dns.update.UpdateMessage("new.test.")
    update.add("_acme-challenge.new.test.", 60, "TXT", f'"{txt_value(KEY_AUTHZ)}"')
    response = await asyncio.to_thread(dns.query.tcp, update, host, port=port, timeout=FAST)
    assert response.rcode() == 0
    settings = local_settings(resolver=dns_server.address, timeout=FAST)
    await validate_dns01("new.test", KEY_AUTHZ, settings)

    update = dns.update.UpdateMessage("new.test.")
    update.delete("_acme-challenge.new.test.", "TXT")
    await asyncio.to_thread(dns.query.tcp, update, host, port=port, timeout=FAST)
    await expect_failure(validate_dns01("new.test", KEY_AUTHZ, settings), "dns", "NXDOMAIN")


def test_the_dns_server_runs_in_a_thread_for_subprocess_tests() -> None:
    records = {("x.test", "SOA"): ["ns.x.test. hostmaster.x.test. 1 3600 600 86400 60"],
               ("x.test", "A"): ["127.0.0.1"]}
    with LocalDnsServer(records) as server:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        assert [r.address for r in resolver.resolve("x.test", "A")] == ["127.0.0.1"]
        # A missing name in a zone: NXDOMAIN with the zone's SOA, as lego's zone search expects.
        query = dns.message.make_query("_acme-challenge.x.test", "SOA")
        reply = dns.query.udp(query, server.host, port=server.port, timeout=FAST)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert [str(rrset.name) for rrset in reply.authority] == ["x.test."]


# --- tls-alpn-01 -----------------------------------------------------------------------------


@dataclass
class TlsServer:
    port: int
    server_names: list[str | None]


@contextlib.asynccontextmanager
async def tls_server(context: ssl.SSLContext, *, alpn: bool = True, host: str = "127.0.0.1"
                     ) -> AsyncIterator[TlsServer]:
    """A real TLS server presenting CONTEXT's certificate; records the SNI it is sent."""
    names: list[str | None] = []

    def remember_sni(sock: ssl.SSLObject, server_name: str | None,
                     ctx: ssl.SSLContext) -> None:
        names.append(server_name)

    context.sni_callback = remember_sni
    if alpn:
        context.set_alpn_protocols(["acme-tls/1"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, host, 0, ssl=context)
    try:
        yield TlsServer(int(server.sockets[0].getsockname()[1]), names)
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_alpn01_accepts_a_correct_certificate(tmp_path: Path,
                                                        dns_server: LocalDnsServer) -> None:
    context = self_signed(tmp_path, [x509.DNSName("web.x.test")],
                          acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context) as server:
        await validate_tls_alpn01("dns", "web.x.test", KEY_AUTHZ, local_settings(
            tls_port=server.port, resolver=dns_server.address, timeout=FAST))
        assert server.server_names == ["web.x.test"]


async def test_dual_stack_names_fall_back_to_ipv4(tmp_path: Path, web_site: HttpSite,
                                                  dns_server: LocalDnsServer) -> None:
    """dual.x.test has AAAA ::1 and A 127.0.0.1; the servers listen on 127.0.0.1 only."""
    web_site.text(CHALLENGE, KEY_AUTHZ)
    context = self_signed(tmp_path, [x509.DNSName("dual.x.test")],
                          acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context) as server:
        settings = local_settings(http_port=web_site.port, tls_port=server.port,
                                  resolver=dns_server.address, timeout=FAST)
        await validate_http01("dns", "dual.x.test", TOKEN, KEY_AUTHZ, settings)
        await validate_tls_alpn01("dns", "dual.x.test", KEY_AUTHZ, settings)


async def test_tls_alpn01_checks_the_dns_name(tmp_path: Path, dns_server: LocalDnsServer) -> None:
    context = self_signed(tmp_path, [x509.DNSName("x.test")],
                          acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context) as server:
        failure = await expect_failure(validate_tls_alpn01(
            "dns", "web.x.test", KEY_AUTHZ, local_settings(
                tls_port=server.port, resolver=dns_server.address, timeout=FAST)),
            "incorrectResponse", "subjectAltName is not exactly one name, DNS:web.x.test")
        assert "DNS:x.test" not in failure.detail, "the certificate's names are not repeated"


async def test_tls_alpn01_for_an_ip_sends_the_reverse_name(tmp_path: Path) -> None:
    context = self_signed(tmp_path, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context) as server:
        await validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                  local_settings(tls_port=server.port, timeout=FAST))
        assert server.server_names == ["1.0.0.127.in-addr.arpa"]


@dataclass(frozen=True)
class BadCertificate:
    sans: list[x509.GeneralName]
    acme_value: bytes | None
    critical: bool
    problem_type: str
    detail: str


LOCAL = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
BAD_CERTIFICATES = {
    "wrong digest": BadCertificate([LOCAL], acme_extension_value("another.authorization"), True,
                                   "unauthorized", acme_extension_value(KEY_AUTHZ).hex()),
    "missing extension": BadCertificate([LOCAL], None, True, "incorrectResponse",
                                        "without the acmeIdentifier extension"),
    "non-critical extension": BadCertificate([LOCAL], acme_extension_value(KEY_AUTHZ), False,
                                             "incorrectResponse", "not critical"),
    "wrong SAN": BadCertificate([x509.IPAddress(ipaddress.ip_address("127.0.0.2"))],
                                acme_extension_value(KEY_AUTHZ), True, "incorrectResponse",
                                "not exactly one name, IP:127.0.0.1"),
    "two SANs": BadCertificate([LOCAL, x509.DNSName("x.test")], acme_extension_value(KEY_AUTHZ),
                               True, "incorrectResponse", "IP:127.0.0.1 (it holds 2)"),
    "no SAN": BadCertificate([], acme_extension_value(KEY_AUTHZ), True, "incorrectResponse",
                             "without subjectAltName"),
    "DNS SAN for an IP": BadCertificate([x509.DNSName("127.0.0.1")],
                                        acme_extension_value(KEY_AUTHZ), True,
                                        "incorrectResponse", "IP:127.0.0.1 (it holds 1)"),
}


@pytest.mark.parametrize("case", BAD_CERTIFICATES.values(), ids=BAD_CERTIFICATES.keys())
async def test_tls_alpn01_rejects_a_bad_certificate(tmp_path: Path, case: BadCertificate) -> None:
    context = self_signed(tmp_path, case.sans, acme_value=case.acme_value, critical=case.critical)
    async with tls_server(context) as server:
        failure = await expect_failure(
            validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                local_settings(tls_port=server.port, timeout=FAST)),
            case.problem_type, case.detail)
    # What the certificate holds is not repeated: other names, another digest.
    for shown in ("127.0.0.2", "x.test", acme_extension_value("another.authorization").hex()):
        assert shown not in failure.detail, failure.detail


async def test_tls_alpn01_requires_the_acme_alpn_protocol(tmp_path: Path) -> None:
    context = self_signed(tmp_path, [LOCAL], acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context, alpn=False) as server:
        await expect_failure(
            validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                local_settings(tls_port=server.port, timeout=FAST)),
            "tls", "did not negotiate ALPN 'acme-tls/1'")


async def test_tls_alpn01_reports_a_refused_connection() -> None:
    await expect_failure(
        validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                            local_settings(tls_port=free_port(), timeout=FAST)),
        "connection", "refused")


async def test_tls_alpn01_reports_a_server_that_does_not_speak_tls() -> None:
    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await expect_failure(
            validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                local_settings(tls_port=port, timeout=FAST)),
            "tls", "TLS handshake with 127.0.0.1")
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_alpn01_times_out_on_a_silent_server() -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FAST):
                await release.wait()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await expect_failure(
            validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                local_settings(tls_port=port, timeout=0.3)),
            "connection", "timed out")
    finally:
        release.set()
        server.close()
        await server.wait_closed()


# --- which addresses validation may contact (validation_addresses.AddressPolicy) -------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "100.64.0.1", "169.254.169.254", "0.0.0.0",  # noqa: S104 - refused, not bound
    "224.0.0.1", "255.255.255.255", "::",
    "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
])
def test_the_default_policy_denies_internal_addresses(address: str) -> None:
    assert AddressPolicy().refusal(address, 80) is not None, f"{address} was allowed"


def test_allow_ranges_are_exceptions_and_own_ports_stay_refused() -> None:
    policy = AddressPolicy(deny_ranges=parse_ranges(["10.0.0.0/8", "127.0.0.0/8"]),
                           allow_ranges=parse_ranges(["10.1.0.0/16", "127.0.0.1/32"]),
                           own_ports=frozenset({9000}))
    assert policy.refusal("10.1.2.3", 80) is None
    assert policy.refusal("10.2.0.1", 80) is not None
    assert policy.refusal("127.0.0.1", 80) is None
    assert policy.refusal("127.0.0.1", 9000) == "the CA itself"
    assert policy.refusal("127.0.0.2", 80) is not None
    assert policy.allowed(["10.2.0.1", "10.1.0.1"], 80)[0] == ["10.1.0.1"]
    with pytest.raises(ValueError, match="10.0.0.1/8"):
        parse_ranges(["10.0.0.1/8"])


def test_ca_json_ranges_reach_the_validation_settings() -> None:
    doc = {"root": "r.crt", "crt": "i.crt", "key": "pkcs11:token=i;object=k",
           "kms": {"uri": "pkcs11:token=i"}, "address": "127.0.0.1:9443",
           "insecureAddress": "127.0.0.1:9080", "dnsNames": ["ca.test"],
           "db": {"type": "sqlite", "dataSource": "db/a.db"},
           "acme": {"validationAllowRanges": ["127.0.0.0/8"],
                    "validationDenyRanges": ["198.51.100.0/24"]}}
    policy = validation_settings(parse_config(doc), None).addresses
    assert policy.refusal("127.0.0.1", 80) is None
    assert policy.refusal("127.0.0.1", 9443) == policy.refusal("127.0.0.1", 9080) == "the CA itself"
    assert policy.refusal("198.51.100.7", 80) is not None
    assert policy.refusal("10.0.0.1", 80) is not None, "the built-in ranges stay denied"
    assert validation_settings(parse_config({**doc, "acme": {}}), None).addresses.refusal(
        "127.0.0.1", 80) is not None, "without an allow list loopback is denied"
    with pytest.raises(ConfigError, match="validationAllowRanges"):
        parse_config({**doc, "acme": {"validationAllowRanges": ["127.0.0.1/8"]}})


async def test_http01_by_default_refuses_loopback_without_connecting(web_site: HttpSite) -> None:
    web_site.text(CHALLENGE, KEY_AUTHZ)
    await expect_failure(
        validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                        ValidationSettings(http_port=web_site.port, timeout=FAST)),
        "connection", "not contacted")
    assert web_site.hosts == [], "the CA connected to a denied address"


async def test_http01_refuses_a_name_that_resolves_to_a_denied_address(
        web_site: HttpSite, dns_server: LocalDnsServer) -> None:
    web_site.text(CHALLENGE, KEY_AUTHZ)
    failure = await expect_failure(
        validate_http01("dns", "web.x.test", TOKEN, KEY_AUTHZ, ValidationSettings(
            http_port=web_site.port, resolver=dns_server.address, timeout=FAST)),
        "connection", "not contacted")
    assert web_site.hosts == []
    assert "127.0.0.1" not in failure.detail, "the resolved address is the CA's own DNS answer"


async def test_http01_checks_the_address_a_redirect_target_resolves_to(
        web_site: HttpSite, dns_server: LocalDnsServer) -> None:
    """Only 127.0.0.1 is allowed; the redirect names a host the resolver maps to 127.0.0.2,
    where a second server on the same port would answer correctly."""
    async with http_site(host="127.0.0.2", port=web_site.port) as other:
        other.text("/final", KEY_AUTHZ)
        dns_server.set("inside.x.test", "A", ["127.0.0.2"])
        web_site.redirect(CHALLENGE, web_site.url("/final", host="inside.x.test"))
        only_one = AddressPolicy(allow_ranges=parse_ranges(["127.0.0.1/32"]))
        failure = await expect_failure(
            validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, ValidationSettings(
                http_port=web_site.port, resolver=dns_server.address, timeout=FAST,
                addresses=only_one)),
            "connection", "after 1 redirect", "not contacted")
        assert other.hosts == [], "the CA connected to the denied redirect target"
        assert "inside.x.test" not in failure.detail and "127.0.0.2" not in failure.detail


@pytest.mark.parametrize(("target", "problem_type", "detail"), [
    ("http://[::ffff:127.0.0.2]:{port}/final", "connection", "not contacted"),
    ("http://127.0.0.2:{port}/final", "connection", "not contacted"),
    # 127.0.0.2 in decimal: aiohttp takes only the canonical form of an address.
    ("http://2130706434:{port}/final", "incorrectResponse", "invalid URL"),
])
async def test_http01_checks_a_redirect_to_an_address_literal(
        web_site: HttpSite, target: str, problem_type: str, detail: str) -> None:
    async with http_site(host="127.0.0.2", port=web_site.port) as other:
        other.text("/final", KEY_AUTHZ)
        web_site.redirect(CHALLENGE, target.format(port=web_site.port))
        only_one = AddressPolicy(allow_ranges=parse_ranges(["127.0.0.1/32"]))
        await expect_failure(
            validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, ValidationSettings(
                http_port=web_site.port, timeout=FAST, addresses=only_one)),
            problem_type, "after 1 redirect", detail)
        assert other.hosts == [], "the CA connected to the denied redirect target"


async def test_http01_refuses_a_redirect_to_another_port_without_naming_it(
        web_site: HttpSite) -> None:
    async with http_site() as other:
        other.text("/secret", "db_password=hunter2")
        web_site.redirect(CHALLENGE, other.url("/secret"))
        failure = await expect_failure(
            validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ,
                            local_settings(http_port=web_site.port, timeout=FAST)),
            "incorrectResponse", "redirected to a port the CA does not follow")
        assert other.hosts == []
        assert str(other.port) not in failure.detail and "secret" not in failure.detail


async def test_http01_never_fetches_the_cas_own_listener(web_site: HttpSite,
                                                         tmp_path: Path) -> None:
    """Even with loopback allowed and the port a validation port, the CA's own ports stay out."""
    context = self_signed(tmp_path, [x509.DNSName("ca.test")])
    async with http_site(ssl_context=context) as own_api:
        own_api.text("/1.0/provisioners", "INTERNAL provisioner list")
        web_site.redirect(CHALLENGE, own_api.url("/1.0/provisioners", scheme="https"))
        loopback_but_not_self = AddressPolicy(allow_ranges=LOOPBACK_ALLOWED.allow_ranges,
                                              own_ports=frozenset({own_api.port}))
        failure = await expect_failure(
            validate_http01("ip", "127.0.0.1", TOKEN, KEY_AUTHZ, ValidationSettings(
                http_port=web_site.port, tls_port=own_api.port, timeout=FAST,
                addresses=loopback_but_not_self)),
            "connection", "the CA itself")
        assert own_api.hosts == []
        assert "INTERNAL" not in failure.detail


async def test_tls_alpn01_by_default_refuses_loopback_without_connecting(tmp_path: Path) -> None:
    context = self_signed(tmp_path, [LOCAL], acme_value=acme_extension_value(KEY_AUTHZ))
    async with tls_server(context) as server:
        await expect_failure(
            validate_tls_alpn01("ip", "127.0.0.1", KEY_AUTHZ,
                                ValidationSettings(tls_port=server.port, timeout=FAST)),
            "connection", "not contacted")
        assert server.server_names == [], "the CA made a TLS handshake with a denied address"


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A proxy in the environment must not matter: the validators ignore it."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    yield
