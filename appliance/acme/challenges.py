"""ACME challenge validation: http-01 and dns-01 (RFC 8555 §8.3, §8.4), tls-alpn-01 (RFC 8737).

IP identifiers (RFC 8738) are validated with http-01 and tls-alpn-01 against the address itself.
Every validator is bounded by `ValidationSettings.timeout` as a whole and raises nothing but
`ChallengeFailed`, whose `problem_type` is the short name of an RFC 8555 error type and whose
`detail` is written for the ACME client in the CA's words: which identifier URL or host:port,
and what failed (a timeout, a refused connection, the wrong key authorization, the class of an
HTTP status, a redirect it does not follow, an address it may not contact). It never quotes
what the peer sent (a body, an exact status, a redirect target, certificate contents, TXT
values) nor the addresses a name resolved to: a requester must not be able to use the CA to
read or map a network it cannot reach itself. Connections go only to addresses the settings'
AddressPolicy allows (validation_addresses.py), checked on the address connected to.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import aiohttp
from cryptography import x509
from yarl import URL

from appliance.acme.validation_dns import (
    AddressRefused,
    ChallengeFailed,
    ProblemType,
    ValidationResolver,
    ValidationSettings,
    ip_literal,
    parse_resolver_address,
    resolve,
    txt_values,
)
from appliance.jose.base64url import b64url_encode

ACME_TLS_ALPN = "acme-tls/1"
# id-pe-acmeIdentifier (RFC 8737 §6.1).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
MAX_BODY = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# RFC 8555 §8.3: a token holds only base64url characters, so it is safe in a URL path.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)*{_LABEL}$")
_SHOWN = 120  # characters of a requester's own input repeated in a detail
# RFC 8555 §8.3: redirects only to http on port 80 and https on port 443 (or to the ports the
# CA is configured to validate on, which the tests move off the privileged ones).
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- the public validators -------------------------------------------------------------------


async def resolve_addresses(name: str, settings: ValidationSettings) -> list[str]:
    """The addresses NAME resolves to (an IP literal resolves to itself), IPv6 first.

    With `settings.resolver` the A and AAAA records come from that server; without it from the
    system (getaddrinfo, so /etc/hosts counts).
    """
    async with _bounded(settings, "dns"):
        return await resolve(name, settings)


async def validate_http01(identifier_type: str, value: str, token: str, key_authorization: str,
                          settings: ValidationSettings,
                          client: HttpValidationClient | None = None) -> None:
    """GET http://VALUE:http_port/.well-known/acme-challenge/TOKEN; the body must be the key
    authorization (trailing whitespace ignored).

    Redirects are followed by hand, at most `settings.max_redirects`, to http on port 80 and
    https on port 443 only (or settings.http_port / tls_port), and every address connected to,
    first or redirected, must be allowed by `settings.addresses`. https is not verified, since
    the point of the challenge is to get a first certificate.
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
            body, where = await _fetch_following_redirects(url, settings, client.session())
            _check_http_body(body, key_authorization, where)
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
        found = await txt_values(qname, settings)
    if expected not in found:
        # The records' values are the resolver's answer: counted, not repeated.
        raise ChallengeFailed("incorrectResponse",
                              f"none of the {len(found)} TXT records at {qname} holds "
                              f"{expected!r}")


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
        addresses, refusal = settings.addresses.allowed(await resolve(host, settings),
                                                        settings.tls_port)
        if not addresses:
            raise _not_contacted(where, refusal)
        alpn, der = await _tls_alpn_handshake(addresses, settings.tls_port, server_name, where)
        if alpn != ACME_TLS_ALPN:
            raise ChallengeFailed("tls", f"{where} did not negotiate ALPN {ACME_TLS_ALPN!r}")
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


def _not_contacted(where: str, reason: str | None) -> ChallengeFailed:
    refused = AddressRefused(reason or "not allowed")
    return ChallengeFailed(refused.problem_type, f"{where}: {refused.detail}")


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _os_reason(exc: OSError) -> str:
    # asyncio's strerror repeats the address ("Connect call failed (...)"); the errno says why.
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
                resolver=ValidationResolver(self._settings), use_dns_cache=False,
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
                                     session: aiohttp.ClientSession) -> tuple[bytes, str]:
    """GET URL, following redirects by hand; the final 200 body, and where it came from in the
    words of a detail (the identifier's URL and how many redirects on; never the target)."""
    first = str(url)
    for hop in range(settings.max_redirects + 1):
        where = first if hop == 0 else f"{first} (after {hop} redirect{'s' if hop > 1 else ''})"
        _refuse_address_literal(url, settings, where)
        status, location, body = await _get_once(session, url, where)
        if status == 200:
            return body, where
        if status not in _REDIRECT_STATUSES:
            raise ChallengeFailed("incorrectResponse", f"{where} answered with "
                                                       f"{_status_class(status)}")
        url = _redirect_target(url, location, settings, where)
    raise ChallengeFailed("incorrectResponse",
                          f"{first}: more than {settings.max_redirects} redirects")


def _refuse_address_literal(url: URL, settings: ValidationSettings, where: str) -> None:
    # aiohttp asks no resolver for an IP literal, so ValidationResolver cannot check it.
    literal = ip_literal(url.host or "")
    if literal is not None and url.port is not None:
        refusal = settings.addresses.refusal(literal, url.port)
        if refusal is not None:
            raise _not_contacted(where, refusal)


def _status_class(status: int) -> str:
    # The class only: an exact status would let a requester probe what answers where.
    if not 100 <= status <= 599:
        return "an invalid HTTP status"
    if status // 100 == 2:
        return "a 2xx status other than 200"
    if status // 100 == 3:
        return "a 3xx status that is not a redirect"
    return f"a {status // 100}xx status"


async def _get_once(session: aiohttp.ClientSession, url: URL, where: str
                    ) -> tuple[int, str | None, bytes]:
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
    except AddressRefused as exc:
        raise _not_contacted(where, exc.reason) from None
    except aiohttp.ClientConnectorError as exc:
        reason = _os_reason(exc.os_error)
        kind: ProblemType = "tls" if isinstance(exc, aiohttp.ClientSSLError) else "connection"
        raise ChallengeFailed(kind, f"cannot connect to {where}: {reason}") from None
    except aiohttp.ServerDisconnectedError:
        raise ChallengeFailed("connection", f"{where}: the server closed the connection") from None
    except aiohttp.ClientResponseError:
        # Its message may quote the peer's status line or a header: not repeated.
        raise ChallengeFailed("connection", f"{where} did not answer valid HTTP") from None
    except aiohttp.ClientPayloadError:
        raise ChallengeFailed("connection", f"{where}: the response body was cut off") from None
    except aiohttp.InvalidURL:
        raise ChallengeFailed("incorrectResponse", f"{where} redirected to an invalid URL"
                              ) from None
    except aiohttp.ClientError as exc:
        raise ChallengeFailed("connection", f"{where}: {type(exc).__name__}") from None
    except ssl.SSLError as exc:
        raise ChallengeFailed("tls", f"{where}: TLS failed: {exc.reason or 'SSLError'}") from None
    except OSError as exc:
        raise ChallengeFailed("connection", f"{where}: {_os_reason(exc)}") from None


def _redirect_target(current: URL, location: str | None, settings: ValidationSettings,
                     where: str) -> URL:
    """The URL a redirect leads to, if it is one the CA follows; the refusal never quotes it."""
    if not location:
        raise ChallengeFailed("incorrectResponse", f"{where} redirected without a Location")
    try:
        target = current.join(URL(location))
        host, port = target.host, target.port
    except ValueError:
        raise ChallengeFailed("incorrectResponse", f"{where} redirected to an invalid URL"
                              ) from None
    if target.scheme not in _DEFAULT_PORTS:
        raise ChallengeFailed("incorrectResponse", f"{where} redirected to another scheme: "
                              "only http and https redirects are followed")
    if not host:
        raise ChallengeFailed("incorrectResponse", f"{where} redirected to a URL without a host")
    # Without a port the URL's scheme decides: 80 for http, 443 for https.
    validation_port = settings.http_port if target.scheme == "http" else settings.tls_port
    if port not in (_DEFAULT_PORTS[target.scheme], validation_port):
        raise ChallengeFailed("incorrectResponse", f"{where} redirected to a port the CA does "
                              "not follow: only http on port 80 and https on port 443")
    return target.with_fragment(None)


def _check_http_body(body: bytes, key_authorization: str, where: str) -> None:
    if len(body) > MAX_BODY:
        raise ChallengeFailed("incorrectResponse",
                              f"{where} answered more than {MAX_BODY // 1024} KiB; "
                              f"expected the key authorization {key_authorization!r}")
    if body.rstrip() != key_authorization.encode():
        # What it answered instead is not repeated: it may be any internal page.
        raise ChallengeFailed("incorrectResponse", f"{where} answered with the wrong key "
                              f"authorization; expected {key_authorization!r}")


# --- tls-alpn-01 -------------------------------------------------------------------------------


def _acme_tls_client_context() -> ssl.SSLContext:
    # No verification: the certificate is self-signed by design (RFC 8737 §3).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ACME_TLS_ALPN])
    return context


async def _tls_alpn_handshake(addresses: list[str], port: int, server_name: str, where: str
                              ) -> tuple[str | None, bytes | None]:
    """Handshake with the first address that answers: (negotiated ALPN, peer certificate DER).

    Failures name WHERE (the identifier and port), not the addresses it resolved to.
    """
    context = _acme_tls_client_context()
    failures: list[str] = []
    for address in addresses:
        try:
            _reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=server_name)
        except ssl.SSLError as exc:
            raise ChallengeFailed("tls", f"TLS handshake with {where} (SNI {server_name}) "
                                         f"failed: {exc.reason or exc.strerror}") from None
        except OSError as exc:
            failures.append(_os_reason(exc))
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
    reasons = "; ".join(dict.fromkeys(failures))
    raise ChallengeFailed("connection", f"cannot connect to {where}: {reasons}")


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
        # Counted, not listed: the names of a certificate the CA was shown are not repeated.
        raise ChallengeFailed("incorrectResponse",
                              f"{where} presented a certificate whose subjectAltName is not "
                              f"exactly one name, {shown_expected} (it holds {len(sans)})")
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
        raise ChallengeFailed("unauthorized",
                              f"{where} presented the wrong acmeIdentifier; expected "
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


__all__ = [
    "ChallengeFailed", "HttpValidationClient", "ProblemType", "ValidationSettings",
    "parse_resolver_address", "resolve_addresses", "validate_dns01", "validate_http01",
    "validate_tls_alpn01",
]
