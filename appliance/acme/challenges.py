"""ACME challenge validation: http-01 and dns-01 (RFC 8555 §8.3, §8.4), tls-alpn-01 (RFC 8737).

IP identifiers (RFC 8738) are validated with http-01 and tls-alpn-01 against the address itself.
Every validator is bounded by `ValidationSettings.timeout` as a whole and raises nothing but
`ChallengeFailed`, whose `problem_type` is the short name of an RFC 8555 error type and whose
`detail` is written for the ACME client: it names what was fetched and what was wrong, never a
stack trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from yarl import URL

from appliance.jose.base64url import b64url_encode

ProblemType = Literal["connection", "dns", "incorrectResponse", "tls", "unauthorized", "malformed"]

ACME_TLS_ALPN = "acme-tls/1"
# id-pe-acmeIdentifier (RFC 8737 §6.1).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
MAX_BODY = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# RFC 8555 §8.3: a token holds only base64url characters, so it is safe in a URL path.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)*{_LABEL}$")
_SHOWN = 120  # characters of a peer's answer repeated in a detail


class ChallengeFailed(Exception):
    """A challenge did not validate; `problem_type` is the RFC 8555 error type's short name."""

    def __init__(self, problem_type: ProblemType, detail: str) -> None:
        super().__init__(f"{problem_type}: {detail}")
        self.problem_type: ProblemType = problem_type
        self.detail = detail


def parse_resolver_address(text: str) -> tuple[str, int]:
    """Split "IP:port" (or "[IPv6]:port", or a bare IP for port 53) into (IP, port).

    Raises ValueError with a message for the operator: the resolver must be an IP address,
    because looking up the resolver's own name would need a resolver.
    """
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"resolver {text!r} must be IP:port or [IPv6]:port")
        if rest:
            port = _parse_port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _parse_port(port_text, text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"resolver {text!r} must be an IP address with a port, "
                         "e.g. 127.0.0.1:53 or [::1]:53") from None
    return str(address), port


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"resolver {whole!r} has no valid port (1-65535)")
    return int(text)


@dataclass(frozen=True)
class ValidationSettings:
    """Where and how long challenge validation looks; checked when made, so a bad one fails fast."""

    http_port: int = 80
    tls_port: int = 443
    # "IP:port" of a DNS server (serve --resolver); None: the system resolver, /etc/hosts included.
    resolver: str | None = None
    timeout: float = 10.0  # per validation attempt, whole
    max_redirects: int = 10

    def __post_init__(self) -> None:
        for name, port in (("http_port", self.http_port), ("tls_port", self.tls_port)):
            if not 0 < port < 65536:
                raise ValueError(f"{name} {port} is not a TCP port (1-65535)")
        if not self.timeout > 0:
            raise ValueError(f"timeout {self.timeout} must be positive")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects {self.max_redirects} must not be negative")
        if self.resolver is not None:
            parse_resolver_address(self.resolver)


# --- the public validators -------------------------------------------------------------------


async def resolve_addresses(name: str, settings: ValidationSettings) -> list[str]:
    """The addresses NAME resolves to (an IP literal resolves to itself), IPv6 first.

    With `settings.resolver` the A and AAAA records come from that server; without it from the
    system (getaddrinfo, so /etc/hosts counts).
    """
    async with _bounded(settings, "dns"):
        return await _resolve(name, settings)


async def validate_http01(identifier_type: str, value: str, token: str, key_authorization: str,
                          settings: ValidationSettings,
                          client: HttpValidationClient | None = None) -> None:
    """GET http://VALUE:http_port/.well-known/acme-challenge/TOKEN; the body must be the key
    authorization (trailing whitespace ignored).

    Redirects are followed by hand, at most `settings.max_redirects`, to http and https only;
    https is not verified, since the point of the challenge is to get a first certificate.
    `client` is the process's validation client; without one a client is made for this call.
    """
    host = _identifier_host(identifier_type, value)
    if not _TOKEN.fullmatch(token):
        raise ChallengeFailed("malformed", "the challenge token is not base64url")
    url = URL.build(scheme="http", host=host, port=settings.http_port,
                    path=f"/.well-known/acme-challenge/{token}")
    own = client is None
    if client is None:
        client = HttpValidationClient(settings)
    try:
        async with _bounded(settings, "connection"):
            body, final_url = await _fetch_following_redirects(url, settings, client.session())
            _check_http_body(body, key_authorization, final_url)
    finally:
        if own:
            await client.close()


async def validate_dns01(value: str, key_authorization: str, settings: ValidationSettings) -> None:
    """A TXT record at _acme-challenge.VALUE must hold base64url(SHA-256(key authorization)).

    For a wildcard identifier the caller passes the base name (RFC 8555 §8.4).
    """
    name = _identifier_host("dns", value)
    expected = b64url_encode(hashlib.sha256(key_authorization.encode()).digest())
    qname = f"_acme-challenge.{name}"
    async with _bounded(settings, "dns"):
        found = await _txt_values(qname, settings)
    if expected not in found:
        shown = ", ".join(repr(_clip(v)) for v in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise ChallengeFailed("incorrectResponse",
                              f"no TXT record at {qname} holds {expected!r}; found {shown}{more}")


async def validate_tls_alpn01(identifier_type: str, value: str, key_authorization: str,
                              settings: ValidationSettings) -> None:
    """Handshake with VALUE:tls_port offering only ALPN acme-tls/1 and check the certificate.

    SNI is the name, or for an IP the reverse-mapping name (RFC 8738 §6). The certificate must
    carry exactly one SAN, the identifier, and a critical acmeIdentifier extension holding
    SHA-256 of the key authorization (RFC 8737 §3).
    """
    host = _identifier_host(identifier_type, value)
    if identifier_type == "ip":
        server_name = ipaddress.ip_address(host).reverse_pointer
        expected_san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    else:
        server_name = host
        expected_san = x509.DNSName(host)
    where = _hostport(host, settings.tls_port)
    async with _bounded(settings, "connection"):
        addresses = await _resolve(host, settings)
        alpn, der = await _tls_alpn_handshake(addresses, settings.tls_port, server_name)
        if alpn != ACME_TLS_ALPN:
            raise ChallengeFailed("tls", f"{where} did not negotiate ALPN {ACME_TLS_ALPN!r} "
                                         f"(it chose {alpn!r})")
        if not der:
            raise ChallengeFailed("tls", f"{where} presented no certificate")
        _check_acme_certificate(der, expected_san, key_authorization, where)


# --- bounds and errors -------------------------------------------------------------------------


@asynccontextmanager
async def _bounded(settings: ValidationSettings, timeout_type: ProblemType) -> AsyncIterator[None]:
    """Bound the block by settings.timeout and turn every failure into ChallengeFailed."""
    try:
        async with asyncio.timeout(settings.timeout):
            yield
    except ChallengeFailed:
        raise
    except TimeoutError:
        raise ChallengeFailed(timeout_type, f"timed out after {settings.timeout:g} s") from None
    except Exception as exc:
        # Only the type: an exception's text may carry internals the client must not see.
        raise ChallengeFailed("connection", f"validation failed: {type(exc).__name__}") from exc


def _identifier_host(identifier_type: str, value: str) -> str:
    """The host to contact for an identifier, checked so it cannot bend a URL or a query."""
    if identifier_type == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ChallengeFailed("malformed", f"{_clip(value)!r} is not an IP address") from None
    if identifier_type == "dns":
        name = value.lower()
        name = name[:-1] if name.endswith(".") else name  # the absolute form names the same host
        if not _DNS_NAME.fullmatch(name):
            raise ChallengeFailed("malformed", f"{_clip(value)!r} is not a DNS name")
        return name
    raise ChallengeFailed("malformed", f"unsupported identifier type {_clip(identifier_type)!r}")


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _os_reason(exc: OSError) -> str:
    # asyncio's strerror repeats the address ("Connect call failed (...)"); the errno says why.
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- name resolution ---------------------------------------------------------------------------


def _ip_literal(name: str) -> str | None:
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return None


async def _resolve(name: str, settings: ValidationSettings) -> list[str]:
    literal = _ip_literal(name)
    if literal is not None:
        return [literal]
    if settings.resolver is None:
        addresses = await _resolve_system(name)
    else:
        addresses = await _resolve_with_server(name, settings)
    if not addresses:
        raise ChallengeFailed("dns", f"no address for {name}")
    # IPv6 first, as getaddrinfo orders them on a dual-stack host; the callers fall back.
    return sorted(dict.fromkeys(addresses), key=lambda a: ":" not in a)


async def _resolve_system(name: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise ChallengeFailed("dns", f"no address for {name}") from None
        raise ChallengeFailed("dns", f"looking up {name} failed: {exc.strerror}") from None
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def _dns_resolver(settings: ValidationSettings) -> dns.asyncresolver.Resolver:
    if settings.resolver is None:
        try:
            resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        except dns.exception.DNSException as exc:
            raise ChallengeFailed("dns", f"no system DNS resolver: {type(exc).__name__}") from None
    else:
        address, port = parse_resolver_address(settings.resolver)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)]
    resolver.use_edns(0, 0, 1232)
    # A little under the whole bound, so a slow DNS server is reported as a DNS failure.
    resolver.lifetime = settings.timeout * 0.9
    resolver.cache = None
    return resolver


async def _query(resolver: dns.asyncresolver.Resolver, qname: str, rdtype: str
                 ) -> dns.resolver.Answer | None:
    """The answer for QNAME/RDTYPE, None for NXDOMAIN; DNS failures become ChallengeFailed."""
    try:
        return await resolver.resolve(dns.name.from_text(qname), rdtype, search=False,
                                      raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.LifetimeTimeout:
        raise ChallengeFailed("dns", f"{rdtype} query for {qname} timed out") from None
    except dns.resolver.NoNameservers as exc:
        # Every server answered SERVFAIL/REFUSED or could not be reached; say which.
        reason = ", ".join(sorted({_dns_error_text(e) for e in exc.kwargs.get("errors") or []}))
        reason = reason or "no server answered"
        raise ChallengeFailed("dns", f"{rdtype} query for {qname} failed: {reason}") from None
    except dns.exception.DNSException as exc:
        raise ChallengeFailed("dns", f"{rdtype} query for {qname} failed: "
                                     f"{type(exc).__name__}") from None


def _dns_error_text(error: tuple[object, ...]) -> str:
    """One server's failure from dnspython's (server, tcp, port, exception, response) tuple:
    the rcode it answered, or the kind of error, without the server's address."""
    response = error[4] if len(error) > 4 else None
    if isinstance(response, dns.message.Message):
        return f"{dns.rcode.to_text(response.rcode())} answered"
    return type(error[3]).__name__ if len(error) > 3 else "unknown error"


async def _resolve_with_server(name: str, settings: ValidationSettings) -> list[str]:
    resolver = _dns_resolver(settings)
    answers = await asyncio.gather(_query(resolver, name, "AAAA"), _query(resolver, name, "A"))
    addresses: list[str] = []
    for answer in answers:
        if answer is not None and answer.rrset is not None:
            addresses.extend(rdata.address for rdata in answer.rrset)
    return addresses


async def _txt_values(qname: str, settings: ValidationSettings) -> list[str]:
    answer = await _query(_dns_resolver(settings), qname, "TXT")
    if answer is None:
        raise ChallengeFailed("dns", f"{qname} does not exist (NXDOMAIN)")
    if answer.rrset is None or len(answer.rrset) == 0:
        raise ChallengeFailed("incorrectResponse", f"no TXT record at {qname}")
    # A TXT record's character-strings are one value (RFC 7208 §3.3 style concatenation).
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]


class _ValidationResolver(AbstractResolver):
    """aiohttp resolver that asks the validation resolver, so Host stays NAME while the
    connection goes to the address it resolved to."""

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for address in await _resolve(host, self._settings):
            af = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, af):
                results.append(ResolveResult(hostname=host, host=address, port=port, family=af,
                                             proto=0, flags=socket.AI_NUMERICHOST))
        if not results:
            raise ChallengeFailed("dns", f"no address for {host}")
        return results

    async def close(self) -> None:
        return None


# --- http-01 -----------------------------------------------------------------------------------


def _unverified_client_context() -> ssl.SSLContext:
    # RFC 8555 leaves certificate checks on redirected https to the CA; like Let's Encrypt we
    # check nothing: the site may well be waiting for this very certificate.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class HttpValidationClient:
    """The http-01 client of a process: one aiohttp session for all its validations.

    Building a session, a connector and a TLS context cost more CPU than a validation over
    loopback, so they are made once (on first use, in the running loop) and closed with
    `close`. Nothing of one validation carries into the next: every request opens its own
    connection (force_close) to the addresses the name resolves to at that moment (no DNS
    cache), and no cookies are kept.
    """

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=_ValidationResolver(self._settings), use_dns_cache=False,
                force_close=True, limit=0, ssl=_unverified_client_context())
            headers = {"User-Agent": "appliance-acme-validator", "Accept": "*/*",
                       # No compression: a small compressed body must not inflate into a large one.
                       "Accept-Encoding": "identity"}
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, headers=headers,
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _fetch_following_redirects(url: URL, settings: ValidationSettings,
                                     session: aiohttp.ClientSession) -> tuple[bytes, URL]:
    """GET URL, following redirects by hand; return the final 200 body and its URL."""
    for _hop in range(settings.max_redirects + 1):
        status, location, body = await _get_once(session, url)
        if status == 200:
            return body, url
        if status not in _REDIRECT_STATUSES:
            raise ChallengeFailed("incorrectResponse", f"{url} answered HTTP {status}")
        url = _redirect_target(url, location)
    raise ChallengeFailed("incorrectResponse",
                          f"more than {settings.max_redirects} redirects, the last to {url}")


async def _get_once(session: aiohttp.ClientSession, url: URL) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: (status, Location, body of at most MAX_BODY + 1)."""
    try:
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                return response.status, response.headers.get("Location"), b""
            body = bytearray()
            while len(body) <= MAX_BODY:
                chunk = await response.content.read(MAX_BODY + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            return 200, None, bytes(body)
    except aiohttp.ClientConnectorError as exc:
        reason = _os_reason(exc.os_error)
        kind: ProblemType = "tls" if isinstance(exc, aiohttp.ClientSSLError) else "connection"
        raise ChallengeFailed(kind, f"cannot connect to {url}: {reason}") from None
    except aiohttp.ServerDisconnectedError:
        raise ChallengeFailed("connection", f"{url}: the server closed the connection") from None
    except aiohttp.ClientResponseError as exc:
        raise ChallengeFailed("connection", f"{url}: bad HTTP response: {exc.message}") from None
    except aiohttp.ClientPayloadError:
        raise ChallengeFailed("connection", f"{url}: the response body was cut off") from None
    except aiohttp.InvalidURL:
        raise ChallengeFailed("incorrectResponse", f"{_clip(str(url))!r} is not a valid URL"
                              ) from None
    except aiohttp.ClientError as exc:
        raise ChallengeFailed("connection", f"{url}: {type(exc).__name__}") from None
    except ssl.SSLError as exc:
        raise ChallengeFailed("tls", f"{url}: TLS failed: {exc.reason or 'SSLError'}") from None
    except OSError as exc:
        raise ChallengeFailed("connection", f"{url}: {_os_reason(exc)}") from None


def _redirect_target(current: URL, location: str | None) -> URL:
    if not location:
        raise ChallengeFailed("incorrectResponse", f"{current} redirects without a Location")
    try:
        target = current.join(URL(location))
        host = target.host
    except ValueError:
        raise ChallengeFailed("incorrectResponse", f"{current} redirects to an invalid URL "
                              f"{_clip(location)!r}") from None
    if target.scheme not in ("http", "https"):
        raise ChallengeFailed("incorrectResponse", f"{current} redirects to "
                              f"{_clip(location)!r}: only http and https redirects are followed")
    if not host:
        raise ChallengeFailed("incorrectResponse", f"{current} redirects to "
                              f"{_clip(location)!r}, which names no host")
    # Without a port the URL's scheme decides: 80 for http, 443 for https.
    return target.with_fragment(None)


def _check_http_body(body: bytes, key_authorization: str, url: URL) -> None:
    if len(body) > MAX_BODY:
        raise ChallengeFailed("incorrectResponse",
                              f"{url} answered more than {MAX_BODY // 1024} KiB; "
                              f"expected the key authorization {key_authorization!r}")
    got = body.rstrip()
    if got != key_authorization.encode():
        shown = _clip(got.decode("utf-8", "replace"))
        raise ChallengeFailed("incorrectResponse",
                              f"{url} answered {shown!r}, expected {key_authorization!r}")


# --- tls-alpn-01 -------------------------------------------------------------------------------


def _acme_tls_client_context() -> ssl.SSLContext:
    # No verification: the certificate is self-signed by design (RFC 8737 §3).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ACME_TLS_ALPN])
    return context


async def _tls_alpn_handshake(addresses: list[str], port: int, server_name: str
                              ) -> tuple[str | None, bytes | None]:
    """Handshake with the first address that answers: (negotiated ALPN, peer certificate DER)."""
    context = _acme_tls_client_context()
    failures: list[str] = []
    for address in addresses:
        where = _hostport(address, port)
        try:
            _reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=server_name)
        except ssl.SSLError as exc:
            raise ChallengeFailed("tls", f"TLS handshake with {where} (SNI {server_name}) "
                                         f"failed: {exc.reason or exc.strerror}") from None
        except OSError as exc:
            failures.append(f"{where}: {_os_reason(exc)}")
            continue
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            if not isinstance(ssl_object, ssl.SSLObject):
                raise ChallengeFailed("tls", f"{where}: no TLS session")
            return ssl_object.selected_alpn_protocol(), ssl_object.getpeercert(binary_form=True)
        finally:
            writer.close()
            with suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
    raise ChallengeFailed("connection", "cannot connect: " + "; ".join(failures))


def _check_acme_certificate(der: bytes, expected_san: x509.GeneralName, key_authorization: str,
                            where: str) -> None:
    shown_expected = _general_name_text(expected_san)
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
        sans = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise ChallengeFailed("incorrectResponse", f"{where} presented a certificate without "
                              f"subjectAltName; expected exactly {shown_expected}") from None
    except Exception as exc:  # ValueError, DuplicateExtension, UnsupportedGeneralNameType ...
        raise ChallengeFailed("incorrectResponse", f"{where} presented a certificate that "
                              f"cannot be parsed ({type(exc).__name__})") from None
    if len(sans) != 1 or not _same_name(sans[0], expected_san):
        listed = ", ".join(_general_name_text(n) for n in sans[:5]) or "none"
        raise ChallengeFailed("incorrectResponse",
                              f"{where} presented a certificate whose subjectAltName is {listed}; "
                              f"expected exactly one, {shown_expected}")
    try:
        extension = extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        raise ChallengeFailed("incorrectResponse", f"{where} presented a certificate without "
                              "the acmeIdentifier extension (1.3.6.1.5.5.7.1.31)") from None
    if not extension.critical:
        raise ChallengeFailed("incorrectResponse", f"{where} presented a certificate whose "
                              "acmeIdentifier extension is not critical")
    digest = hashlib.sha256(key_authorization.encode()).digest()
    # extnValue holds Authorization ::= OCTET STRING (SIZE (32)), DER: 04 20 || digest.
    expected_value = b"\x04\x20" + digest
    value = extension.value
    got = value.value if isinstance(value, x509.UnrecognizedExtension) else None
    if got != expected_value:
        got_text = got.hex() if got is not None else type(value).__name__
        raise ChallengeFailed("unauthorized",
                              f"{where} presented an acmeIdentifier of {_clip(got_text)}, expected "
                              f"{expected_value.hex()} (DER OCTET STRING of SHA-256 of the key "
                              "authorization)")


def _same_name(got: x509.GeneralName, expected: x509.GeneralName) -> bool:
    if isinstance(got, x509.DNSName) and isinstance(expected, x509.DNSName):
        return got.value.lower().rstrip(".") == expected.value.lower()
    if isinstance(got, x509.IPAddress) and isinstance(expected, x509.IPAddress):
        return got.value == expected.value
    return False


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{_clip(name.value)}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return type(name).__name__
