"""Which addresses challenge validation may connect to, so a requester cannot aim the CA's
http-01 and tls-alpn-01 connections at its own network (SSRF).

The check runs on the address the validator actually connects to, after name resolution and
for every redirect target, so a name that resolves to an internal address (DNS rebinding
included) is refused like the address itself. Refusals say so in the CA's words and never
name the address a name resolved to: a requester must not learn the CA's internal DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ranges(untrusted_ranges: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDR ranges ("10.0.0.0/8", "::1/128", a bare address for one host), checked.

    Raises ValueError naming the entry: host bits set ("10.0.0.1/8") are refused as the typo
    they usually are.
    """
    ranges: list[IpNetwork] = []
    for text in untrusted_ranges:
        try:
            ranges.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an address range such as 10.0.0.0/8 ({exc})"
                             ) from None
    return tuple(ranges)


# Denied unless allowed: what a host inside the CA's network answers on, and what is not a
# unicast address on the internet. IPv4-mapped IPv6 addresses are checked as the IPv4 they map.
DEFAULT_DENY_RANGES: tuple[IpNetwork, ...] = parse_ranges([
    "0.0.0.0/8",        # "this network"; 0.0.0.0 reaches the local host
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918 private
    "100.64.0.0/10",    # carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, cloud metadata services among them
    "192.0.0.0/24",     # IETF protocol assignments
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, broadcast
    "::/128", "::1/128",  # unspecified, loopback
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215)
    "100::/64",         # discard-only
    "fc00::/7",         # unique local (ULA)
    "fe80::/10", "fec0::/10",  # link-local, old site-local
    "ff00::/8",         # multicast
])


def _plain(address: IpAddress) -> IpAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_this_host(address: IpAddress) -> bool:
    """Whether ADDRESS is one of this host's own: loopback, unspecified, or configured on an
    interface (the kernel picks it as its own source address; nothing is sent)."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((str(address), 9))
        return bool(ipaddress.ip_address(probe.getsockname()[0]) == address)
    return False


@dataclass(frozen=True)
class AddressPolicy:
    """The addresses validation may contact: not in a deny range unless in an allow range, and
    never one of the CA's own listening ports on this host.

    The defaults deny DEFAULT_DENY_RANGES and every address of this host; `allow_ranges`
    carves exceptions out of both (a lab, or the tests on 127.0.0.1). `own_ports` are the
    ports the CA itself listens on: on this host's addresses they stay refused even when
    allowed, so a redirect can never make the CA fetch its own API.
    """

    deny_ranges: tuple[IpNetwork, ...] = DEFAULT_DENY_RANGES
    allow_ranges: tuple[IpNetwork, ...] = ()
    own_ports: frozenset[int] = field(default_factory=frozenset)

    def refusal(self, address: str, port: int) -> str | None:
        """Why connecting to ADDRESS:PORT is refused, in the CA's words; None if it is allowed."""
        try:
            ip = _plain(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return "not an IP address"
        this_host = is_this_host(ip)
        if this_host and port in self.own_ports:
            return "the CA itself"
        if any(ip in allowed for allowed in self.allow_ranges):
            return None
        if any(ip in denied for denied in self.deny_ranges):
            return "an address the CA is not allowed to contact"
        if this_host:
            return "an address of the CA itself"
        return None

    def allowed(self, addresses: Iterable[str], port: int) -> tuple[list[str], str | None]:
        """The addresses that may be contacted on PORT, and the first refusal among the rest."""
        kept: list[str] = []
        reason: str | None = None
        for address in addresses:
            why = self.refusal(address, port)
            if why is None:
                kept.append(address)
            elif reason is None:
                reason = why
        return kept, reason
