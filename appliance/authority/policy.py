"""The X.509 name policy: which names a certificate may carry (step-ca's x509 policy engine).

The authority builds one X509NamePolicy from `authority.policy.x509` and one per provisioner from
its `policy.x509`; a request must pass both. Patterns are compiled here, once; `check` only does
dictionary look-ups and a short walk over CIDR ranges, because it runs on every issuance.

Rules (docs/policy.md has examples):
- deny wins over allow; a policy with no entries restricts nothing;
- when `allow` has any entry, every name needs an allow entry of its own type;
- names that cannot be read as their type are refused whenever the policy has rules, so a
  malformed name never slips past a deny rule; a DNS name (or e-mail domain) that reads as an
  IPv4 address ('127.1', '0x7f.0.0.1') is such a name, read as issuance.names reads it;
- IP rules apply to every form of an address: a common name '2130706433' is 127.0.0.1, a URI
  host '127.1' is an IP host;
- the common name is checked against `cn` rules and also as the DNS name, IP address, email
  address or URI it reads as (step-ca's validateCommonName).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography import x509

from appliance.config_policy import (
    DomainPattern,
    IPNetwork,
    PolicyConfig,
    X509NameOptions,
    X509PolicyConfig,
    is_domain,
    parse_cn_pattern,
    parse_domain_pattern,
    parse_email_pattern,
    parse_ip_entry,
)
from appliance.errors import ConfigError, PolicyViolation
from appliance.issuance.names import ipv4_of_name, reads_as_ipv4, san_to_text
from appliance.issuance.names import shown as _shown

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# RFC 3986 authority characters; anything else (a backslash, a space) is read differently by
# different URI parsers, so such a URI is refused rather than guessed at.
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%\[\]]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AUTHORITY_END = re.compile(r"[/?#]")
_PORT = re.compile(r"[0-9]*")


# Requested names, parsed into the form the rules compare.

@dataclass(frozen=True, slots=True)
class _Dns:
    kind: ClassVar[str] = "dns"
    name: str  # lowercase, no trailing dot; may start with "*." (a wildcard name)

    @property
    def wildcard(self) -> bool:
        return self.name.startswith("*.")


@dataclass(frozen=True, slots=True)
class _Ip:
    kind: ClassVar[str] = "ip"
    address: IPAddress


@dataclass(frozen=True, slots=True)
class _Email:
    kind: ClassVar[str] = "email"
    local: str
    domain: str  # lowercase


@dataclass(frozen=True, slots=True)
class _Uri:
    kind: ClassVar[str] = "uri"
    host: str | None  # lowercase domain, or None when there is no host name to match
    why_no_host: str = ""
    # The address a URI's IP host reaches ('https://127.1/' reaches 127.0.0.1): deny ip rules
    # apply to it, so no address form slips past them inside a URI.
    address: IPAddress | None = None


_Name = _Dns | _Ip | _Email | _Uri


def _read_dns(value: str) -> _Dns | None:
    if not value.isascii():  # before lower(): see config_policy._LABEL
        return None
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    if not _is_dns_name(name.removeprefix("*.")):
        return None
    return _Dns(name)


def _is_dns_name(name: str) -> bool:
    """A domain that is not an IPv4 address in disguise (issuance.names.reads_as_ipv4)."""
    return is_domain(name) and not reads_as_ipv4(name)


def _read_email(value: str) -> _Email | None:
    if not value.isascii():
        return None
    local, at, domain = value.rpartition("@")
    if not at or not local or "@" in local or _CONTROL.search(local) \
            or any(c.isspace() for c in local) or not _is_dns_name(domain.lower()):
        return None
    return _Email(local, domain.lower())


def _read_uri(value: str) -> _Uri | None:
    if not value.isascii():
        return None
    scheme = _SCHEME.match(value)
    if scheme is None:
        return None
    rest = value[scheme.end():]
    if not rest.startswith("//"):
        return _Uri(None, "it has no host")
    authority = _AUTHORITY_END.split(rest[2:], maxsplit=1)[0]
    if not _AUTHORITY.fullmatch(authority):
        return None
    host_port = authority.rpartition("@")[2]
    if host_port.startswith("["):
        literal, bracket, port = host_port[1:].partition("]")
        if not bracket or not (port == "" or (port[0] == ":" and _PORT.fullmatch(port[1:]))):
            return None
        try:
            literal_address = ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        return _Uri(None, "its host is an IP address", literal_address)
    host, _, port = host_port.partition(":")
    if not _PORT.fullmatch(port) or "[" in host or "]" in host:
        return None
    if not host:
        return _Uri(None, "it has no host")
    try:
        return _Uri(None, "its host is an IP address", ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().removesuffix(".")
    if reads_as_ipv4(name):  # URL parsers read 'https://127.1/' as https://127.0.0.1/
        address = ipv4_of_name(name)
        return _Uri(None, "its host is an IP address", address) if address else None
    return _Uri(name) if is_domain(name) else None


def _read_san(san: x509.GeneralName) -> _Name | str:
    """The parsed name, or why it cannot be checked."""
    if isinstance(san, x509.DNSName):
        return _read_dns(san.value) or "it is not a valid DNS name"
    if isinstance(san, x509.IPAddress):
        if isinstance(san.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return _Ip(san.value)
        return "an IP range is not a subject name"
    if isinstance(san, x509.RFC822Name):
        return _read_email(san.value) or "it is not a valid email address"
    if isinstance(san, x509.UniformResourceIdentifier):
        return _read_uri(san.value) or "it is not a well-formed URI"
    kind = {x509.DirectoryName: "directoryName", x509.OtherName: "otherName",
            x509.RegisteredID: "registeredID"}.get(type(san), type(san).__name__)
    return f"{kind} SANs cannot be checked against a policy"


def _san_text(san: x509.GeneralName) -> str:
    if isinstance(san, x509.DirectoryName):
        return san.value.rfc4514_string()
    if isinstance(san, x509.OtherName):
        return san.type_id.dotted_string
    if isinstance(san, x509.RegisteredID):
        return san.value.dotted_string
    return san_to_text(san)


def _read_common_name(value: str) -> _Name | None:
    """Read a common name the way step's SAN classifier would; None if it is none of the four."""
    try:
        return _Ip(ipaddress.ip_address(value))
    except ValueError:
        pass
    if value.isascii() and reads_as_ipv4(value):
        # '127.1' names 127.0.0.1 to a client that reads the common name as a host: IP rules
        # judge it; one that is no address at all ('999.1') is no name of any type.
        address = ipv4_of_name(value)
        return _Ip(address) if address is not None else None
    if "://" in value or value.startswith("urn:"):
        return _read_uri(value)
    if "@" in value:
        return _read_email(value)
    return _read_dns(value)


def _ip_text(address: IPAddress) -> str:
    """An address as written: '::ffff:10.0.0.1' rather than Python's '::ffff:a00:1'."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(address)


# Compiled rules.

class _Domains:
    """Exact names and subtrees, each mapped to the entry as the operator wrote it."""

    __slots__ = ("any_depth", "below", "exact", "exact_by_parent")

    def __init__(self, any_depth: bool) -> None:
        self.any_depth = any_depth
        self.exact: dict[str, str] = {}
        self.below: dict[str, str] = {}
        self.exact_by_parent: dict[str, str] = {}

    def add(self, pattern: DomainPattern, entry: str) -> None:
        if pattern.below:
            self.below.setdefault(pattern.domain, entry)
        else:
            self.exact.setdefault(pattern.domain, entry)
            self.exact_by_parent.setdefault(pattern.domain.partition(".")[2], entry)

    def __bool__(self) -> bool:
        return bool(self.exact or self.below)

    def match(self, name: str) -> str | None:
        """The entry matching a lowercase domain (a '*' first label counts as a label).

        On the allow side '*.example.com' covers exactly one label below example.com, as in
        step-ca, so a migrated allow rule never admits more here than it did there. On the
        deny side it covers every depth: a deny rule is never weaker than it reads.
        """
        hit = self.exact.get(name)
        if hit is not None or not self.below:
            return hit
        dot = name.find(".")
        while dot >= 0:
            name = name[dot + 1:]
            hit = self.below.get(name)
            if hit is not None or not self.any_depth:
                return hit
            dot = name.find(".")
        return None

    def covered_by_wildcard(self, name: str) -> str | None:
        """An exact entry that the wildcard name '*.parent' covers (one label below parent)."""
        return self.exact_by_parent.get(name[2:])


class _Side:
    """One side (allow or deny) of a policy, compiled."""

    def __init__(self, options: X509NameOptions | None, *, any_depth: bool) -> None:
        self.cn_exact: dict[str, str] = {}
        self.cn_exact_by_parent: dict[str, str] = {}
        self.cn_domains = _Domains(any_depth)
        self.dns = _Domains(any_depth)
        self.uri = _Domains(any_depth)
        self.mailboxes: dict[tuple[str, str], str] = {}
        self.mail_domains = _Domains(any_depth)
        self.ipv4: list[tuple[IPNetwork, str]] = []
        self.ipv6: list[tuple[IPNetwork, str]] = []
        if options is None:
            return
        for entry in options.cn:
            cn = parse_cn_pattern(entry)
            if cn.domain is not None:
                self.cn_domains.add(cn.domain, entry)
            elif cn.exact is not None:
                self.cn_exact.setdefault(cn.exact, entry)
                self.cn_exact_by_parent.setdefault(cn.exact.partition(".")[2], entry)
        for entry in options.dns:
            self.dns.add(parse_domain_pattern(entry, "dns"), entry)
        for entry in options.uri:
            self.uri.add(parse_domain_pattern(entry, "uri"), entry)
        for entry in options.email:
            email = parse_email_pattern(entry)
            if email.local is not None:
                self.mailboxes.setdefault((email.local, email.domain.domain), entry)
            else:
                self.mail_domains.add(email.domain, entry)
        for entry in options.ip:
            network = parse_ip_entry(entry)
            (self.ipv4 if network.version == 4 else self.ipv6).append((network, entry))

    def has(self, kind: str) -> bool:
        if kind == "dns":
            return bool(self.dns)
        if kind == "ip":
            return bool(self.ipv4 or self.ipv6)
        if kind == "email":
            return bool(self.mailboxes or self.mail_domains)
        if kind == "uri":
            return bool(self.uri)
        return bool(self.cn_exact or self.cn_domains)

    def match_ip(self, address: IPAddress) -> str | None:
        # Only rules of the address's own family: an IPv4-mapped IPv6 address is not an IPv4
        # address here (the callers decide what it means on each side).
        for network, entry in self.ipv4 if address.version == 4 else self.ipv6:
            if address in network:
                return entry
        return None

    def match(self, name: _Name) -> str | None:
        """The entry of this side that matches `name`, or None."""
        if isinstance(name, _Dns):
            return self.dns.match(name.name)
        if isinstance(name, _Ip):
            return self.match_ip(name.address)
        if isinstance(name, _Email):
            return self.mailboxes.get((name.local, name.domain)) \
                or self.mail_domains.match(name.domain)
        return self.uri.match(name.host) if name.host is not None else None

    def match_cn(self, common_name: str, as_dns: _Dns | None) -> str | None:
        hit = self.cn_exact.get(common_name.lower())
        if hit is None and as_dns is not None:
            hit = self.cn_domains.match(as_dns.name)
        return hit


class X509NamePolicy:
    """One x509 name policy (the authority's or a provisioner's); None means allow everything."""

    def __init__(self, config: X509PolicyConfig | None) -> None:
        self._active = config is not None and config.has_rules()
        self._allow_wildcards = config is None or config.allow_wildcard_names
        try:
            self._allow = _Side(config.allow if config else None, any_depth=False)
            self._deny = _Side(config.deny if config else None, any_depth=True)
        except ValueError as e:  # only reachable for a config built without validation
            raise ConfigError(str(e)) from None
        self._allow_any = config is not None and config.allow is not None \
            and config.allow.has_entries()

    @classmethod
    def of(cls, policy: PolicyConfig | None) -> X509NamePolicy:
        """The x509 part of a ca.json `policy` block (the authority's or a provisioner's)."""
        return cls(policy.x509 if policy is not None else None)

    @property
    def restricts(self) -> bool:
        """False when this policy lets every name through (no policy, or one with no entries)."""
        return self._active

    def check(self, common_name: str | None, sans: Sequence[x509.GeneralName]) -> None:
        """Raise PolicyViolation naming the first name the policy refuses, and why."""
        if not self._active:
            return
        for san in sans:
            name = _read_san(san)
            if isinstance(name, str):
                raise _not_allowed("name", _san_text(san), name)
            self._judge("name", _ip_text(name.address) if isinstance(name, _Ip)
                        else san_to_text(san), name)
        if common_name:
            self._check_common_name(common_name)

    def _judge(self, subject: str, shown: str, name: _Name, *, cn_allowed: bool = False) -> None:
        if isinstance(name, _Dns) and name.wildcard and not self._allow_wildcards:
            raise PolicyViolation(f"wildcard {subject} {_shown(shown)} is not allowed by policy")
        self._refuse_if_denied(subject, shown, name)
        if cn_allowed or not self._allow_any:
            return
        reason = self._allow_refusal(name)
        if reason is not None:
            raise _not_allowed(subject, shown, reason)

    def _refuse_if_denied(self, subject: str, shown: str, name: _Name) -> None:
        if isinstance(name, _Uri) and name.address is not None:
            self._refuse_if_denied(subject, shown, _Ip(name.address))
        entry = self._deny.match(name)
        if entry is None and isinstance(name, _Ip) and isinstance(
                name.address, ipaddress.IPv6Address) and name.address.ipv4_mapped is not None:
            # ::ffff:10.0.0.1 reaches 10.0.0.1 on many stacks: IPv4 deny rules catch it.
            entry = self._deny.match_ip(name.address.ipv4_mapped)
        if entry is not None:
            raise PolicyViolation(f"{subject} {_shown(shown)} is denied by policy "
                                  f"(deny {name.kind} {entry!r})")
        if isinstance(name, _Dns) and name.wildcard:
            covered = self._deny.dns.covered_by_wildcard(name.name)
            if covered is not None:
                raise PolicyViolation(f"{subject} {_shown(shown)} is denied by policy "
                                      f"(deny dns {covered!r}, which the wildcard covers)")

    def _allow_refusal(self, name: _Name) -> str | None:
        if not self._allow.has(name.kind):
            return f"no allow {name.kind} rules"
        if self._allow.match(name) is not None:
            return None
        if isinstance(name, _Uri) and name.host is None:
            return f"{name.why_no_host}, so no uri rule can match it"
        if isinstance(name, _Ip) and isinstance(name.address, ipaddress.IPv6Address):
            mapped = name.address.ipv4_mapped
            if mapped is not None and self._allow.match_ip(mapped) is not None:
                return (f"an IPv4-mapped IPv6 address does not match IPv4 rules; request "
                        f"{str(mapped)!r} instead")
        return "no allow rule matches"

    def _check_common_name(self, common_name: str) -> None:
        name = _read_common_name(common_name)
        as_dns = name if isinstance(name, _Dns) else None
        entry = self._deny.match_cn(common_name, as_dns)
        if entry is not None:
            raise PolicyViolation(f"common name {_shown(common_name)} is denied by policy "
                                  f"(deny cn {entry!r})")
        if as_dns is not None and as_dns.wildcard:
            entry = self._deny.cn_exact_by_parent.get(as_dns.name[2:])
            if entry is not None:
                raise PolicyViolation(f"common name {_shown(common_name)} is denied by policy "
                                      f"(deny cn {entry!r}, which the wildcard covers)")
        cn_allowed = self._allow.match_cn(common_name, as_dns) is not None
        if name is not None:
            self._judge("common name", common_name, name, cn_allowed=cn_allowed)
        elif not cn_allowed:
            raise _not_allowed("common name", common_name,
                               "it is not a DNS name, IP address, email address or URI, "
                               "and no allow cn rule matches it")


def _not_allowed(subject: str, shown: str, reason: str) -> PolicyViolation:
    return PolicyViolation(f"{subject} {_shown(shown)} is not allowed by policy ({reason})")
