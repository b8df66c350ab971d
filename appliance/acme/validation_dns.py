"""Where challenge validation looks, and how it resolves names (the system or a DNS server).

Every lookup failure is a ChallengeFailed of type "dns" whose detail says what was asked and
how it failed (NXDOMAIN, a timeout, an rcode), never a record's value, a server's address or a
stack trace. The addresses a name resolves to for a connection are checked against the
settings' AddressPolicy (validation_addresses.py) here, where they are handed to the
connection, so what is checked is what is connected to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from appliance.acme.validation_addresses import AddressPolicy

ProblemType = Literal["connection", "dns", "incorrectResponse", "tls", "unauthorized", "malformed"]


class ChallengeFailed(Exception):
    """A challenge did not validate; `problem_type` is the RFC 8555 error type's short name."""

    def __init__(self, problem_type: ProblemType, detail: str) -> None:
        super().__init__(f"{problem_type}: {detail}")
        self.problem_type: ProblemType = problem_type
        self.detail = detail


class AddressRefused(ChallengeFailed):
    """No address a host resolved to may be contacted; `reason` says why, in the CA's words."""

    def __init__(self, reason: str) -> None:
        super().__init__("connection", f"not contacted: the address is {reason}")
        self.reason = reason


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
    # Which addresses http-01 and tls-alpn-01 may connect to; the default denies internal ones.
    addresses: AddressPolicy = field(default_factory=AddressPolicy)

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


def ip_literal(name: str) -> str | None:
    """NAME as an IP address in canonical form (brackets allowed), or None."""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return None


async def resolve(name: str, settings: ValidationSettings) -> list[str]:
    literal = ip_literal(name)
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


async def txt_values(qname: str, settings: ValidationSettings) -> list[str]:
    answer = await _query(_dns_resolver(settings), qname, "TXT")
    if answer is None:
        raise ChallengeFailed("dns", f"{qname} does not exist (NXDOMAIN)")
    if answer.rrset is None or len(answer.rrset) == 0:
        raise ChallengeFailed("incorrectResponse", f"no TXT record at {qname}")
    # A TXT record's character-strings are one value (RFC 7208 §3.3 style concatenation).
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]


class ValidationResolver(AbstractResolver):
    """aiohttp resolver that asks the validation resolver, so Host stays NAME while the
    connection goes to the address it resolved to."""

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        allowed, refusal = self._settings.addresses.allowed(
            await resolve(host, self._settings), port)
        if not allowed:
            raise AddressRefused(refusal or "not allowed")
        for address in allowed:
            af = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, af):
                results.append(ResolveResult(hostname=host, host=address, port=port, family=af,
                                             proto=0, flags=socket.AI_NUMERICHOST))
        if not results:
            raise ChallengeFailed("dns", f"no address for {host}")
        return results

    async def close(self) -> None:
        return None
