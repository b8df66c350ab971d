"""Subject alternative names: classify requester strings into typed x509 GeneralNames.

One reading of a name for every path. Token `sans`, ACME identifiers, template output, CSR
names and renewal copies all pass `normalise_dns` / `parse_san` / `check_san` here, and the name
policy (appliance.authority.policy) reads address-like names with `reads_as_ipv4` and
`ipv4_of_name`, so no name is one thing to the policy and another to a relying party.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from appliance.errors import BadRequest

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# A last label that inet_aton (and so getaddrinfo, curl, Python's socket module) and the WHATWG
# URL host parser ("ends in a number") read as part of an IPv4 address: decimal, octal (leading
# 0) or hexadecimal (0x) digits. '127.1', '2130706433' and '0x7f.0.0.1' all reach 127.0.0.1, so
# such a name is never a DNS name here; real top-level domains are never numeric (RFC 3696 §2).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.IGNORECASE)
# Characters no name of any type may hold: C0 controls, DEL and any whitespace. Parsers differ on
# where such a name ends, so what a relying party sees would not be what policy checked.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\s]")
_HEX, _OCTAL, _DECIMAL = (re.compile(r"0x[0-9a-f]*"), re.compile(r"0[0-7]+"),
                          re.compile(r"[1-9][0-9]*|0"))
_MAX_SHOWN = 128


def shown(untrusted_value: str) -> str:
    """A requester's name quoted for a message: control characters escaped, length capped."""
    if len(untrusted_value) > _MAX_SHOWN:
        untrusted_value = untrusted_value[:_MAX_SHOWN] + "..."
    return repr(untrusted_value)


def reads_as_ipv4(name: str) -> bool:
    """True when resolvers or URL parsers read `name` as an IPv4 address (or fail trying):
    its last label is a number in any base. A trailing dot does not change that."""
    last = name.removesuffix(".").rpartition(".")[2]
    return _NUMERIC_LABEL.fullmatch(last) is not None


def ipv4_of_name(name: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton reads in `name` ('0x7f.1' is 127.0.0.1), or None if none.

    Written out rather than calling socket.inet_aton, whose glibc form also accepts trailing
    junk after a space: this is the same reading on every platform.
    """
    parts = name.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        number = _inet_aton_number(part.lower())
        if number is None:
            return None
        numbers.append(number)
    *leading, last = numbers
    if any(not 0 <= n <= 255 for n in leading) or not 0 <= last < 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _inet_aton_number(part: str) -> int | None:
    # int() alone would also take '+1', ' 1' and '1_0'; inet_aton takes digits only.
    if _HEX.fullmatch(part):
        return int(part[2:] or "0", 16)
    if _OCTAL.fullmatch(part):
        return int(part, 8)
    if _DECIMAL.fullmatch(part):
        return int(part, 10)
    return None


def _refuse_unprintable(untrusted_value: str, what: str) -> None:
    if _FORBIDDEN.search(untrusted_value):
        raise BadRequest(f"{what} {shown(untrusted_value)} contains a space or control "
                         "character")
    if not untrusted_value.isascii():
        raise BadRequest(f"{what} {shown(untrusted_value)} is not ASCII; write an "
                         "internationalised name in its IDNA A-label form (xn--...) and a URI "
                         "with percent-encoding")


def normalise_dns(untrusted_name: str) -> str:
    """Lowercase and check a DNS name (a leading '*.' wildcard label is allowed).

    A name that reads as an IPv4 address ('127.1', '10.0.0.1') is refused: an address is an IP
    name (RFC 8738 for ACME), and only as one does IP policy apply to it.
    """
    _refuse_unprintable(untrusted_name, "DNS name")
    name = untrusted_name.removesuffix(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253:
        raise BadRequest(f"{shown(untrusted_name)} is not a valid DNS name")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 1:
            continue
        if not _DNS_LABEL.match(label):
            raise BadRequest(f"{shown(untrusted_name)} is not a valid DNS name")
    if reads_as_ipv4(name):
        address = ipv4_of_name(name)
        reads = f"the IPv4 address {address}" if address is not None else "an IPv4 address"
        raise BadRequest(f"{shown(untrusted_name)} is not a DNS name: it reads as {reads}; "
                         "ask for an IP address as an IP name")
    return name


def _email(untrusted_value: str) -> x509.RFC822Name:
    _refuse_unprintable(untrusted_value, "e-mail address")
    local, at, domain = untrusted_value.rpartition("@")
    if not at or not local:
        raise BadRequest(f"{shown(untrusted_value)} is not a valid e-mail address")
    return x509.RFC822Name(f"{local}@{normalise_dns(domain)}")


def _uri(untrusted_value: str) -> x509.UniformResourceIdentifier:
    _refuse_unprintable(untrusted_value, "URI")
    return x509.UniformResourceIdentifier(untrusted_value)


def parse_san(untrusted_value: str) -> x509.GeneralName:
    """An IP address, e-mail address, URI or DNS name, the way step classifies --san values."""
    if not untrusted_value:
        raise BadRequest("an empty subject alternative name is not allowed")
    _refuse_unprintable(untrusted_value, "subject alternative name")
    try:
        return x509.IPAddress(ipaddress.ip_address(untrusted_value.strip("[]")))
    except ValueError:
        pass
    if "://" in untrusted_value or untrusted_value.startswith("urn:"):
        return _uri(untrusted_value)
    if "@" in untrusted_value:
        return _email(untrusted_value)
    return x509.DNSName(normalise_dns(untrusted_value))


def check_san(name: x509.GeneralName) -> None:
    """Refuse a name no certificate may carry, whichever way it came (a CSR, a template, a
    renewal's copy of an older certificate): BadRequest names it and says why."""
    if isinstance(name, x509.DNSName):
        normalise_dns(name.value)
    elif isinstance(name, x509.RFC822Name):
        _email(name.value)
    elif isinstance(name, x509.UniformResourceIdentifier):
        _uri(name.value)


def san_to_text(name: x509.GeneralName) -> str:
    """The string form used in tokens, the database and error messages."""
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
        return str(name.value)
    return str(name)


def sans_of(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    """The CSR's subjectAltName entries (authority.csr.check_csr has made sure they decode)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def canonical_san(name: x509.GeneralName) -> str:
    """Comparable form of a SAN: DNS and e-mail domains lowercased, IPs normalised."""
    if isinstance(name, x509.DNSName):
        return "dns:" + name.value.lower().rstrip(".")
    if isinstance(name, x509.IPAddress):
        return "ip:" + str(name.value)
    if isinstance(name, x509.RFC822Name):
        local, _, domain = name.value.rpartition("@")
        return f"email:{local}@{domain.lower()}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return "uri:" + name.value
    return "other:" + repr(name)
