"""ca.json name policies: `authority.policy` and a provisioner's `policy`, as step-ca spells them.

    "policy": {"x509": {"allow": {"dns": ["*.example.com"], "ip": ["10.0.0.0/8"]},
                        "deny": {"dns": ["admin.example.com"]},
                        "allowWildcardNames": false}}

The models keep each entry as the operator wrote it (so a refusal can quote it); the parsers
below turn an entry into a pattern. The config validators and the engine in
appliance.authority.policy use the same parsers, so an entry that loads is an entry that compiles.
See docs/policy.md for the matching rules.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from appliance.errors import ConfigError

MAX_DOMAIN_LENGTH = 253
# One DNS label: letters, digits, hyphens (not first or last) and underscores (SRV-style and some
# internal names use them). Lowercase only: callers check isascii() before lowercasing, because
# str.lower() maps some non-ASCII characters to ASCII (U+212A KELVIN SIGN becomes "k").
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_domain(name: str) -> bool:
    """True for a lowercase ASCII domain name: valid labels, no wildcard, no trailing dot."""
    if not name or len(name) > MAX_DOMAIN_LENGTH or not name.isascii():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class DomainPattern:
    """`example.com` matches that name only; `*.example.com` (or `.example.com`) any name below."""

    domain: str
    below: bool


@dataclass(frozen=True)
class EmailPattern:
    """A whole mailbox (`local` set; local part exact, domain any case) or a domain pattern."""

    local: str | None
    domain: DomainPattern


@dataclass(frozen=True)
class CommonNamePattern:
    """A common name compared without regard to case, or a domain pattern the CN must match."""

    exact: str | None
    domain: DomainPattern | None


def _domain_hint(entry: str, kind: str) -> str:
    text = entry.strip()
    if not text.isascii():
        return ": write internationalised names in their A-label (xn--) form"
    if "://" in text:
        return ": give the host name only, without a scheme"
    if text.endswith("."):
        return ": drop the trailing dot"
    if "*" in text:
        return ": '*' may only be the whole first label, as in '*.example.com'"
    if _is_ip(text.strip("[]")):
        return (": IP addresses belong under ip" if kind == "dns"
                else ": uri rules match host names, not IP addresses")
    if ":" in text or "/" in text:
        return ": give the host name only, without a port or path"
    return ""


def parse_domain_pattern(entry: str, kind: str = "dns") -> DomainPattern:
    """Parse a dns or uri entry; raise ValueError naming the entry if it is not a domain pattern."""
    text = entry.strip()
    below = False
    if text.startswith("*."):
        text, below = text[2:], True
    elif text.startswith("."):
        text, below = text[1:], True
    if not text.isascii() or not is_domain(text.lower()) or _is_ip(text):
        raise ValueError(f"policy {kind} entry {entry!r} is not a valid domain pattern"
                         f"{_domain_hint(entry, kind)}")
    return DomainPattern(text.lower(), below)


def parse_ip_entry(entry: str) -> IPNetwork:
    """Parse an ip entry: one address or a CIDR range whose host bits are zero."""
    text = entry.strip()
    if "%" in text:
        raise ValueError(f"policy ip entry {entry!r} has a zone index; give the address alone")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"policy ip entry {entry!r} is not an IP address or CIDR range "
                         "(like '10.0.0.0/8' or '2001:db8::/32')") from None
    raise ValueError(f"policy ip entry {entry!r} has host bits set; did you mean "
                     f"{str(network)!r}?")


_EMAIL_FORMS = "use 'user@example.com', '@example.com', 'example.com' or '*.example.com'"


def parse_email_pattern(entry: str) -> EmailPattern:
    """Parse an email entry: a mailbox, `@domain` or `domain` (that domain), `*.domain` (below)."""
    text = entry.strip()
    bad = ValueError(f"policy email entry {entry!r} is not a valid email pattern ({_EMAIL_FORMS})")
    if not text.isascii() or text.count("@") > 1:
        raise bad
    local, _, domain = text.rpartition("@")
    if local:
        if "*" in local or _CONTROL.search(local) or any(c.isspace() for c in local) \
                or not is_domain(domain.lower()):
            raise bad
        return EmailPattern(local, DomainPattern(domain.lower(), below=False))
    try:
        return EmailPattern(None, parse_domain_pattern(domain, "email"))
    except ValueError:
        raise bad from None


def parse_cn_pattern(entry: str) -> CommonNamePattern:
    """Parse a cn entry: a name compared without case, or `*.domain` for any DNS name below."""
    text = entry.strip()
    if not text or _CONTROL.search(text):
        raise ValueError(f"policy cn entry {entry!r} is not a valid common name pattern")
    if text == "*":
        raise ValueError(f"policy cn entry {entry!r} is not a valid common name pattern: a lone "
                         "'*' is not supported (step-ca refuses it too)")
    if "*" in text or (text.startswith(".") and len(text) > 1):
        try:
            return CommonNamePattern(None, parse_domain_pattern(text, "cn"))
        except ValueError:
            raise ValueError(f"policy cn entry {entry!r} is not a valid common name pattern"
                             f"{_domain_hint(entry, 'cn')}") from None
    return CommonNamePattern(text.lower(), None)


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


class X509NameOptions(_Model):
    """One side (allow or deny) of an X.509 name policy."""

    # step-ca's JSON key for common names is "cn" (policy.X509NameOptions.CommonNames).
    cn: list[str] = Field(default_factory=list)
    dns: list[str] = Field(default_factory=list)
    ip: list[str] = Field(default_factory=list)
    email: list[str] = Field(default_factory=list)
    uri: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _cn_spelling(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in ("commonName", "commonNames", "commonname"):
                if key in value:
                    raise ValueError(f"{key!r} is not a policy key; common names go under "
                                     "'cn', as in step-ca")
        return value

    @field_validator("cn")
    @classmethod
    def _cn(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_cn_pattern(entry)
        return value

    @field_validator("dns", "uri")
    @classmethod
    def _domains(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for entry in value:
            parse_domain_pattern(entry, str(info.field_name))
        return value

    @field_validator("ip")
    @classmethod
    def _ips(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_ip_entry(entry)
        return value

    @field_validator("email")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_email_pattern(entry)
        return value

    def has_entries(self) -> bool:
        return bool(self.cn or self.dns or self.ip or self.email or self.uri)


class X509PolicyConfig(_Model):
    allow: X509NameOptions | None = None
    deny: X509NameOptions | None = None
    allow_wildcard_names: bool = Field(False, alias="allowWildcardNames")

    def has_rules(self) -> bool:
        """False for a policy with no allow or deny entries: like step-ca, it restricts nothing."""
        return bool((self.allow and self.allow.has_entries())
                    or (self.deny and self.deny.has_entries()))


class PolicyConfig(_Model):
    x509: X509PolicyConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_ssh(cls, value: Any) -> Any:
        if isinstance(value, dict) and "ssh" in value:
            raise ValueError("policy.ssh is not supported: this appliance issues no SSH "
                             "certificates")
        return value


def parse_policy_config(data: Any, source: str = "policy") -> PolicyConfig:
    """Validate a decoded `policy` object; raise ConfigError naming the bad entry."""
    try:
        return PolicyConfig.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(f"{source} is invalid: {'; '.join(parts)}") from None
