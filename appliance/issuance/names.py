"""Subject alternative names: classify requester strings into typed x509 GeneralNames."""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from appliance.errors import BadRequest

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalise_dns(untrusted_name: str) -> str:
    """Lowercase and check a DNS name (a leading '*.' wildcard label is allowed)."""
    name = untrusted_name.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253:
        raise BadRequest(f"{untrusted_name!r} is not a valid DNS name")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 1:
            continue
        if not _DNS_LABEL.match(label):
            raise BadRequest(f"{untrusted_name!r} is not a valid DNS name")
    return name


def parse_san(untrusted_value: str) -> x509.GeneralName:
    """An IP address, e-mail address, URI or DNS name, the way step classifies --san values."""
    value = untrusted_value.strip()
    if not value:
        raise BadRequest("an empty subject alternative name is not allowed")
    try:
        return x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if "://" in value or value.startswith("urn:"):
        return x509.UniformResourceIdentifier(value)
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if not local:
            raise BadRequest(f"{value!r} is not a valid e-mail address")
        return x509.RFC822Name(f"{local}@{normalise_dns(domain)}")
    return x509.DNSName(normalise_dns(value))


def san_to_text(name: x509.GeneralName) -> str:
    """The string form used in tokens, the database and error messages."""
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
        return str(name.value)
    return str(name)


def sans_of(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
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
