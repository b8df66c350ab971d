"""The X.509 name policy (authority.policy.x509 and a provisioner's policy.x509).

Each row: a policy as it would appear in ca.json, the requested common name and SANs, and the
exact refusal a requester would see (None: issued).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.authority.policy import X509NamePolicy
from appliance.config_policy import (
    PolicyConfig,
    X509NameOptions,
    X509PolicyConfig,
    parse_policy_config,
)
from appliance.errors import ConfigError, PolicyViolation


def dns(value: str) -> x509.GeneralName:
    return x509.DNSName(value)


def ip(value: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(value))


def email(value: str) -> x509.GeneralName:
    return x509.RFC822Name(value)


def uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


def policy(doc: dict[str, Any] | None) -> X509NamePolicy:
    return X509NamePolicy(None if doc is None else X509PolicyConfig.model_validate(doc))


def verdict(doc: dict[str, Any] | None, cn: str | None,
            sans: list[x509.GeneralName]) -> str | None:
    try:
        policy(doc).check(cn, sans)
    except PolicyViolation as e:
        assert e.status == 403 and e.acme_type == "rejectedIdentifier"
        return e.message
    return None


def run(cases: list[tuple[dict[str, Any] | None, str | None, list[x509.GeneralName],
                          str | None]]) -> None:
    failures = []
    for doc, cn, sans, expected in cases:
        got = verdict(doc, cn, sans)
        if got != expected:
            failures.append(f"policy {doc}, cn {cn!r}, sans {[str(s) for s in sans]}:\n"
                            f"    expected {expected!r}\n    got      {got!r}")
    assert not failures, "\n".join(failures)


NOT_ALLOWED = "name {!r} is not allowed by policy (no allow rule matches)"
DENIED = "name {!r} is denied by policy (deny {} {!r})"

ALLOW_SUB = {"allow": {"dns": ["*.example.com"]}}


def test_dns_allow_rules() -> None:
    run([
        (ALLOW_SUB, None, [dns("a.example.com")], None),
        # One label below, as in step-ca: a migrated allow rule admits nothing more here.
        (ALLOW_SUB, None, [dns("a.b.c.example.com")], NOT_ALLOWED.format("a.b.c.example.com")),
        (ALLOW_SUB, None, [dns("example.com")], NOT_ALLOWED.format("example.com")),
        (ALLOW_SUB, None, [dns("x.other.test")], NOT_ALLOWED.format("x.other.test")),
        (ALLOW_SUB, None, [dns("a.notexample.com")], NOT_ALLOWED.format("a.notexample.com")),
        (ALLOW_SUB, None, [dns("example.com.evil.test")],
         NOT_ALLOWED.format("example.com.evil.test")),
        # A leading "." means the same as "*.".
        ({"allow": {"dns": [".example.com"]}}, None, [dns("a.example.com")], None),
        ({"allow": {"dns": [".example.com"]}}, None, [dns("a.b.example.com")],
         NOT_ALLOWED.format("a.b.example.com")),
        # A deny wildcard covers every depth: a deny rule is never weaker than it reads.
        ({"deny": {"dns": ["*.example.com"]}}, None, [dns("a.b.c.example.com")],
         DENIED.format("a.b.c.example.com", "dns", "*.example.com")),
        ({"allow": {"dns": [".example.com"]}}, None, [dns("example.com")],
         NOT_ALLOWED.format("example.com")),
        # Without "*" a pattern is one name.
        ({"allow": {"dns": ["example.com"]}}, None, [dns("example.com")], None),
        ({"allow": {"dns": ["example.com"]}}, None, [dns("a.example.com")],
         NOT_ALLOWED.format("a.example.com")),
        # Case does not matter, on either side; a trailing dot is the same name.
        (ALLOW_SUB, None, [dns("A.EXAMPLE.COM")], None),
        ({"allow": {"dns": ["*.Example.COM"]}}, None, [dns("a.example.com")], None),
        (ALLOW_SUB, None, [dns("a.example.com.")], None),
        # Every name must pass, not just one.
        (ALLOW_SUB, None, [dns("a.example.com"), dns("b.other.test")],
         NOT_ALLOWED.format("b.other.test")),
        (ALLOW_SUB, None, [], None),
    ])


def test_dns_deny_rules_and_deny_wins() -> None:
    deny_sub = {"deny": {"dns": ["*.example.com"]}}
    both = {"allow": {"dns": ["*.example.com"]}, "deny": {"dns": ["evil.example.com"]}}
    run([
        (deny_sub, None, [dns("evil.example.com")],
         "name 'evil.example.com' is denied by policy (deny dns '*.example.com')"),
        (deny_sub, None, [dns("x.y.example.com")], DENIED.format("x.y.example.com", "dns",
                                                                 "*.example.com")),
        # Deny-only: anything not denied passes, including the parent domain itself.
        (deny_sub, None, [dns("example.com")], None),
        (deny_sub, None, [dns("other.test")], None),
        (both, None, [dns("good.example.com")], None),
        (both, None, [dns("evil.example.com")],
         DENIED.format("evil.example.com", "dns", "evil.example.com")),
        (both, None, [dns("EVIL.Example.Com.")],
         DENIED.format("EVIL.Example.Com.", "dns", "evil.example.com")),
        # The refusal quotes the rule as the operator wrote it.
        ({"deny": {"dns": ["Evil.Example.com"]}}, None, [dns("evil.example.com")],
         DENIED.format("evil.example.com", "dns", "Evil.Example.com")),
        # Deny wins even over an exact allow.
        ({"allow": {"dns": ["a.example.com"]}, "deny": {"dns": ["*.example.com"]}}, None,
         [dns("a.example.com")], DENIED.format("a.example.com", "dns", "*.example.com")),
    ])


def test_malformed_names_are_refused_whenever_a_policy_has_rules() -> None:
    deny_only = {"deny": {"dns": ["evil.example.com"]}}
    run([
        (deny_only, None, [dns("evil .example.com")],
         "name 'evil .example.com' is not allowed by policy (it is not a valid DNS name)"),
        (deny_only, None, [dns("evil..example.com")],
         "name 'evil..example.com' is not allowed by policy (it is not a valid DNS name)"),
        (deny_only, None, [dns("-a.example.com")],
         "name '-a.example.com' is not allowed by policy (it is not a valid DNS name)"),
        (deny_only, None, [dns("evil.example.com\x00.good.test")],
         "name 'evil.example.com\\x00.good.test' is not allowed by policy "
         "(it is not a valid DNS name)"),
        (deny_only, None, [x509.DirectoryName(x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, "evil.example.com")]))],
         "name 'CN=evil.example.com' is not allowed by policy "
         "(directoryName SANs cannot be checked against a policy)"),
        (deny_only, None, [x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                                          b"\x0c\x03a@b")],
         "name '1.3.6.1.4.1.311.20.2.3' is not allowed by policy "
         "(otherName SANs cannot be checked against a policy)"),
        # No policy, or a policy without entries (step-ca builds no engine for it): no checks.
        (None, None, [dns("evil .example.com"), x509.DirectoryName(x509.Name([]))], None),
        ({}, None, [dns("*.anything.test")], None),
        ({"allow": {}, "deny": {"dns": []}, "allowWildcardNames": False}, None,
         [dns("*.anything.test")], None),
    ])


def test_a_type_without_allow_entries_is_refused_once_allow_has_any_entry() -> None:
    allow_dns = {"allow": {"dns": ["*.example.com"]}, "deny": {"ip": ["192.0.2.0/24"]}}
    run([
        (allow_dns, None, [ip("10.0.0.1")],
         "name '10.0.0.1' is not allowed by policy (no allow ip rules)"),
        (allow_dns, None, [email("a@example.com")],
         "name 'a@example.com' is not allowed by policy (no allow email rules)"),
        (allow_dns, None, [uri("https://a.example.com/")],
         "name 'https://a.example.com/' is not allowed by policy (no allow uri rules)"),
        ({"allow": {"cn": ["Service"]}}, "Service", [dns("a.example.com")],
         "name 'a.example.com' is not allowed by policy (no allow dns rules)"),
        # Deny entries of a type do not stand in for allow entries.
        ({"allow": {"ip": ["10.0.0.0/8"]}, "deny": {"dns": ["evil.test"]}}, None,
         [dns("good.test")], "name 'good.test' is not allowed by policy (no allow dns rules)"),
    ])


def test_wildcard_names() -> None:
    flag = {"allow": {"dns": ["*.example.com"]}, "allowWildcardNames": True}
    run([
        (ALLOW_SUB, None, [dns("*.example.com")],
         "wildcard name '*.example.com' is not allowed by policy"),
        ({"deny": {"dns": ["evil.test"]}}, None, [dns("*.example.com")],
         "wildcard name '*.example.com' is not allowed by policy"),
        (flag, None, [dns("*.example.com")], None),
        (flag, None, [dns("*.a.example.com")], NOT_ALLOWED.format("*.a.example.com")),
        (flag, None, [dns("*.other.test")], NOT_ALLOWED.format("*.other.test")),
        # The "*" is a label under the pattern: '*.example.com' does not fit 'example.com'.
        ({"allow": {"dns": ["example.com", "a.example.com"]}, "allowWildcardNames": True}, None,
         [dns("*.example.com")], NOT_ALLOWED.format("*.example.com")),
        ({"allow": {"dns": ["*.example.com"]}, "deny": {"dns": ["*.a.example.com"]},
          "allowWildcardNames": True}, None, [dns("*.a.example.com")],
         DENIED.format("*.a.example.com", "dns", "*.a.example.com")),
        # A wildcard certificate would also serve a denied name one label below it.
        ({**flag, "deny": {"dns": ["admin.example.com"]}}, None, [dns("*.example.com")],
         "name '*.example.com' is denied by policy "
         "(deny dns 'admin.example.com', which the wildcard covers)"),
        ({**flag, "deny": {"dns": ["admin.a.example.com"]}}, None, [dns("*.example.com")], None),
        # Only a whole first label may be "*".
        (flag, None, [dns("a*.example.com")],
         "name 'a*.example.com' is not allowed by policy (it is not a valid DNS name)"),
        (flag, None, [dns("a.*.example.com")],
         "name 'a.*.example.com' is not allowed by policy (it is not a valid DNS name)"),
        (flag, None, [dns("*")], "name '*' is not allowed by policy (it is not a valid DNS name)"),
        (None, None, [dns("*.example.com")], None),
    ])


def test_ip_ranges() -> None:
    v4 = {"allow": {"ip": ["10.0.0.0/8", "192.168.1.10"]}}
    v6 = {"allow": {"ip": ["2001:db8::/32", "::1"]}}
    run([
        (v4, None, [ip("10.255.0.1")], None),
        (v4, None, [ip("192.168.1.10")], None),
        (v4, None, [ip("192.168.1.11")], NOT_ALLOWED.format("192.168.1.11")),
        (v4, None, [ip("11.0.0.1")], NOT_ALLOWED.format("11.0.0.1")),
        (v4, None, [ip("2001:db8::1")], NOT_ALLOWED.format("2001:db8::1")),
        (v6, None, [ip("2001:db8:ffff::1")], None),
        (v6, None, [ip("::1")], None),
        (v6, None, [ip("2001:db9::1")], NOT_ALLOWED.format("2001:db9::1")),
        (v6, None, [ip("10.0.0.1")], NOT_ALLOWED.format("10.0.0.1")),
        ({"deny": {"ip": ["10.0.0.0/8"]}}, None, [ip("10.1.1.1")],
         DENIED.format("10.1.1.1", "ip", "10.0.0.0/8")),
        ({"deny": {"ip": ["10.0.0.0/8"]}}, None, [ip("172.16.0.1")], None),
        ({"allow": {"ip": ["10.0.0.0/8"]}, "deny": {"ip": ["10.0.0.0/24"]}}, None,
         [ip("10.0.0.7")], DENIED.format("10.0.0.7", "ip", "10.0.0.0/24")),
    ])


def test_ipv4_mapped_ipv6_addresses_never_match_ipv4_rules_by_accident() -> None:
    run([
        # An IPv4 allow rule does not admit the mapped form; the refusal says what to ask for.
        ({"allow": {"ip": ["10.0.0.0/8"]}}, None, [ip("::ffff:10.0.0.1")],
         "name '::ffff:10.0.0.1' is not allowed by policy (an IPv4-mapped IPv6 address does "
         "not match IPv4 rules; request '10.0.0.1' instead)"),
        # An IPv4 deny rule does catch it: stacks that accept mapped addresses reach 10.0.0.1.
        ({"deny": {"ip": ["10.0.0.0/8"]}}, None, [ip("::ffff:10.0.0.1")],
         DENIED.format("::ffff:10.0.0.1", "ip", "10.0.0.0/8")),
        # An IPv6 rule written for the mapped range is explicit, and matches.
        ({"allow": {"ip": ["::ffff:10.0.0.0/104"]}}, None, [ip("::ffff:10.0.0.1")], None),
        ({"allow": {"ip": ["::ffff:10.0.0.0/104"]}}, None, [ip("10.0.0.1")],
         NOT_ALLOWED.format("10.0.0.1")),
    ])


def test_email_forms() -> None:
    run([
        ({"allow": {"email": ["@example.com"]}}, None, [email("alice@example.com")], None),
        ({"allow": {"email": ["@example.com"]}}, None, [email("alice@EXAMPLE.com")], None),
        ({"allow": {"email": ["example.com"]}}, None, [email("bob@example.com")], None),
        ({"allow": {"email": ["@example.com"]}}, None, [email("a@sub.example.com")],
         NOT_ALLOWED.format("a@sub.example.com")),
        ({"allow": {"email": ["*.example.com"]}}, None, [email("a@sub.example.com")], None),
        ({"allow": {"email": ["*.example.com"]}}, None, [email("a@sub.example.com")], None),
        ({"allow": {"email": ["*.example.com"]}}, None, [email("a@x.sub.example.com")],
         NOT_ALLOWED.format("a@x.sub.example.com")),
        ({"allow": {"email": ["*.example.com"]}}, None, [email("a@example.com")],
         NOT_ALLOWED.format("a@example.com")),
        # A whole address: local part exact (case counts), domain any case.
        ({"allow": {"email": ["Alice@Example.com"]}}, None, [email("Alice@example.COM")], None),
        ({"allow": {"email": ["Alice@Example.com"]}}, None, [email("alice@example.com")],
         NOT_ALLOWED.format("alice@example.com")),
        ({"allow": {"email": ["Alice@Example.com"]}}, None, [email("Bob@example.com")],
         NOT_ALLOWED.format("Bob@example.com")),
        ({"deny": {"email": ["@example.com"]}}, None, [email("eve@Example.com")],
         DENIED.format("eve@Example.com", "email", "@example.com")),
        ({"deny": {"email": ["ceo@example.com"]}}, None, [email("ceo@example.com")],
         DENIED.format("ceo@example.com", "email", "ceo@example.com")),
        ({"deny": {"email": ["ceo@example.com"]}}, None, [email("CEO@example.com")], None),
        ({"deny": {"email": ["@example.com"]}}, None, [email("no-at-sign")],
         "name 'no-at-sign' is not allowed by policy (it is not a valid email address)"),
    ])


def test_uri_hosts() -> None:
    allow = {"allow": {"uri": ["*.example.com"]}}
    deny = {"deny": {"uri": ["evil.example.com"]}}
    run([
        (allow, None, [uri("https://svc.example.com/path?q=1")], None),
        (allow, None, [uri("spiffe://prod.example.com/ns/default/sa/web")], None),
        (allow, None, [uri("https://user:pw@SVC.Example.com:8443/")], None),
        (allow, None, [uri("https://svc.other.test/")], NOT_ALLOWED.format(
            "https://svc.other.test/")),
        (allow, None, [uri("https://example.com/")], NOT_ALLOWED.format("https://example.com/")),
        (allow, None, [uri("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66")],
         "name 'urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66' is not allowed by policy "
         "(it has no host, so no uri rule can match it)"),
        (allow, None, [uri("file:///etc/hosts")],
         "name 'file:///etc/hosts' is not allowed by policy "
         "(it has no host, so no uri rule can match it)"),
        (allow, None, [uri("https://10.0.0.1/")],
         "name 'https://10.0.0.1/' is not allowed by policy "
         "(its host is an IP address, so no uri rule can match it)"),
        (allow, None, [uri("https://[2001:db8::1]:443/")],
         "name 'https://[2001:db8::1]:443/' is not allowed by policy "
         "(its host is an IP address, so no uri rule can match it)"),
        (deny, None, [uri("https://evil.example.com/")],
         DENIED.format("https://evil.example.com/", "uri", "evil.example.com")),
        (deny, None, [uri("https://a@EVIL.example.com:1/")],
         DENIED.format("https://a@EVIL.example.com:1/", "uri", "evil.example.com")),
        (deny, None, [uri("https://good.example.com/")], None),
        # A URI without a host passes a policy that only denies hosts.
        (deny, None, [uri("urn:example:thing")], None),
        # Authorities that URI parsers disagree about are refused rather than guessed at.
        (deny, None, [uri("https://evil.example.com\\@good.example.com/")],
         "name 'https://evil.example.com\\\\@good.example.com/' is not allowed by policy "
         "(it is not a well-formed URI)"),
        (deny, None, [uri("https://ev%69l.example.com/")],
         "name 'https://ev%69l.example.com/' is not allowed by policy "
         "(it is not a well-formed URI)"),
        (deny, None, [uri("https://[evil.example.com]/")],
         "name 'https://[evil.example.com]/' is not allowed by policy "
         "(it is not a well-formed URI)"),
        (deny, None, [uri("https://evil.example.com:http/")],
         "name 'https://evil.example.com:http/' is not allowed by policy "
         "(it is not a well-formed URI)"),
        (deny, None, [uri("https://*.example.com/")],
         "name 'https://*.example.com/' is not allowed by policy (it is not a well-formed URI)"),
        (deny, None, [uri("no-scheme")],
         "name 'no-scheme' is not allowed by policy (it is not a well-formed URI)"),
    ])


def test_common_name_rules() -> None:
    allow_dns = {"allow": {"dns": ["*.example.com"]}}
    run([
        # A CN that is one of the SANs is judged like it.
        (allow_dns, "a.example.com", [dns("a.example.com")], None),
        (allow_dns, "x.other.test", [],
         "common name 'x.other.test' is not allowed by policy (no allow rule matches)"),
        # step-ca reads the CN as a name of its own type even when no SAN repeats it.
        (allow_dns, "b.example.com", [dns("a.example.com")], None),
        ({"allow": {"ip": ["10.0.0.0/8"]}}, "10.1.2.3", [], None),
        ({"allow": {"email": ["@example.com"]}}, "alice@example.com", [], None),
        # A CN that is none of the four types needs an allow cn entry (as in step-ca).
        (allow_dns, "Web Frontend", [dns("a.example.com")],
         "common name 'Web Frontend' is not allowed by policy (it is not a DNS name, IP "
         "address, email address or URI, and no allow cn rule matches it)"),
        ({"deny": {"dns": ["evil.test"]}}, "Web Frontend", [],
         "common name 'Web Frontend' is not allowed by policy (it is not a DNS name, IP "
         "address, email address or URI, and no allow cn rule matches it)"),
        ({"allow": {"cn": ["Web Frontend"], "dns": ["*.example.com"]}}, "web frontend",
         [dns("a.example.com")], None),
        # cn patterns: exact (any case) or '*.domain'.
        ({"allow": {"cn": ["*.example.com"]}}, "b.example.com", [], None),
        ({"allow": {"cn": ["*.example.com"]}}, "example.com", [],
         "common name 'example.com' is not allowed by policy (no allow dns rules)"),
        ({"allow": {"cn": ["*.example.com"]}}, "a.example.com", [dns("a.example.com")],
         "name 'a.example.com' is not allowed by policy (no allow dns rules)"),
        ({"deny": {"cn": ["admin"]}}, "ADMIN", [],
         "common name 'ADMIN' is denied by policy (deny cn 'admin')"),
        ({"deny": {"cn": ["*.internal.test"]}}, "db.internal.test", [],
         "common name 'db.internal.test' is denied by policy (deny cn '*.internal.test')"),
        # Deny wins: an allow cn entry does not lift a deny rule of the CN's own type.
        ({"allow": {"cn": ["evil.example.com"]}, "deny": {"dns": ["evil.example.com"]}},
         "evil.example.com", [],
         "common name 'evil.example.com' is denied by policy (deny dns 'evil.example.com')"),
        (allow_dns, "*.example.com", [],
         "wildcard common name '*.example.com' is not allowed by policy"),
        ({**allow_dns, "allowWildcardNames": True, "deny": {"cn": ["admin.example.com"]}},
         "*.example.com", [], "common name '*.example.com' is denied by policy "
         "(deny cn 'admin.example.com', which the wildcard covers)"),
        # No CN, or an empty one, is not checked.
        (allow_dns, None, [dns("a.example.com")], None),
        (allow_dns, "", [dns("a.example.com")], None),
        # SANs are checked before the CN.
        (allow_dns, "Web Frontend", [dns("x.other.test")], NOT_ALLOWED.format("x.other.test")),
        (None, "Web Frontend", [], None),
    ])


def test_common_name_from_a_csr_subject() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example.com")])
    cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str)
    policy({"allow": {"dns": ["*.example.com"]}}).check(cn, [dns("api.example.com")])


def test_authority_and_provisioner_policies_both_apply() -> None:
    """The example at the top of docs/policy.md."""
    authority = policy({"allow": {"dns": ["*.example.com", "*.web.example.com",
                                          "*.corp.example.com"], "ip": ["10.0.0.0/8"]},
                        "deny": {"dns": ["*.corp.example.com"]}})
    web_team = policy({"allow": {"dns": ["*.web.example.com", "*.corp.example.com"]}})
    for name, refused_by in [("api.web.example.com", []), ("api.example.com", ["web-team"]),
                             ("db.corp.example.com", ["authority"]),
                             ("x.other.test", ["authority", "web-team"])]:
        refusals = []
        for label, engine in [("authority", authority), ("web-team", web_team)]:
            try:
                engine.check(name, [dns(name)])
            except PolicyViolation:
                refusals.append(label)
        assert refusals == refused_by, f"{name}: refused by {refusals}, expected {refused_by}"


def test_policy_construction() -> None:
    assert not X509NamePolicy(None).restricts
    assert not X509NamePolicy.of(None).restricts
    assert not X509NamePolicy.of(PolicyConfig()).restricts
    assert not policy({"allowWildcardNames": True}).restricts
    doc = {"x509": {"allow": {"dns": ["*.example.com"]}, "allowWildcardNames": True}}
    engine = X509NamePolicy.of(parse_policy_config(doc))
    assert engine.restricts
    engine.check("*.example.com", [dns("*.example.com")])
    # Python names work as well as step-ca's JSON names, and dump back as step-ca spells them.
    cfg = X509PolicyConfig(allow=X509NameOptions(dns=["a.test"]), allow_wildcard_names=True)
    assert cfg.model_dump(by_alias=True, exclude_defaults=True) == {
        "allow": {"dns": ["a.test"]}, "allowWildcardNames": True}


@pytest.mark.parametrize(("doc", "message"), [
    ({"x509": {"allow": {"dns": ["*.*.x"]}}},
     "x509.allow.dns: policy dns entry '*.*.x' is not a valid domain pattern"),
    ({"x509": {"deny": {"dns": ["a*.example.com"]}}},
     "policy dns entry 'a*.example.com' is not a valid domain pattern: '*' may only be the "
     "whole first label"),
    ({"x509": {"allow": {"dns": ["example.com."]}}}, "drop the trailing dot"),
    ({"x509": {"allow": {"dns": ["bücher.example"]}}}, "A-label (xn--) form"),
    ({"x509": {"allow": {"dns": ["10.0.0.1"]}}}, "IP addresses belong under ip"),
    ({"x509": {"allow": {"dns": ["*"]}}}, "policy dns entry '*' is not a valid domain pattern"),
    ({"x509": {"allow": {"dns": [""]}}}, "policy dns entry '' is not a valid domain pattern"),
    ({"x509": {"allow": {"dns": ["a..example.com"]}}}, "'a..example.com' is not a valid"),
    ({"x509": {"deny": {"ip": ["10.0.0.1/24"]}}},
     "x509.deny.ip: policy ip entry '10.0.0.1/24' has host bits set; did you mean "
     "'10.0.0.0/24'?"),
    ({"x509": {"deny": {"ip": ["2001:db8::1/32"]}}}, "did you mean '2001:db8::/32'?"),
    ({"x509": {"deny": {"ip": ["10.0.0.256"]}}},
     "policy ip entry '10.0.0.256' is not an IP address or CIDR range"),
    ({"x509": {"deny": {"ip": ["example.com"]}}}, "is not an IP address or CIDR range"),
    ({"x509": {"deny": {"ip": ["fe80::1%eth0"]}}}, "has a zone index"),
    ({"x509": {"allow": {"email": ["a@b@example.com"]}}},
     "policy email entry 'a@b@example.com' is not a valid email pattern"),
    ({"x509": {"allow": {"email": ["*@example.com"]}}}, "'*@example.com' is not a valid email"),
    ({"x509": {"allow": {"email": ["a@*.example.com"]}}}, "is not a valid email pattern"),
    ({"x509": {"allow": {"email": ["user@"]}}}, "'user@' is not a valid email pattern"),
    ({"x509": {"allow": {"uri": ["https://example.com"]}}},
     "policy uri entry 'https://example.com' is not a valid domain pattern: give the host "
     "name only, without a scheme"),
    ({"x509": {"allow": {"uri": ["example.com:8443"]}}}, "without a port or path"),
    ({"x509": {"allow": {"uri": ["10.0.0.1"]}}}, "uri rules match host names, not IP"),
    ({"x509": {"allow": {"cn": ["*"]}}}, "policy cn entry '*' is not a valid common name pattern"),
    ({"x509": {"allow": {"cn": ["a*b"]}}}, "policy cn entry 'a*b' is not a valid common name"),
    ({"x509": {"allow": {"cn": [" "]}}}, "policy cn entry ' ' is not a valid common name"),
    ({"x509": {"allow": {"commonName": ["a"]}}}, "common names go under 'cn', as in step-ca"),
    ({"x509": {"allow": {"dnsNames": ["a.test"]}}}, "x509.allow.dnsNames: Extra inputs"),
    ({"x509": {"allowWildcardLiteral": True}}, "x509.allowWildcardLiteral: Extra inputs"),
    ({"ssh": {"host": {}}}, "policy.ssh is not supported"),
    ({"x509": {"allow": {"dns": "a.test"}}}, "x509.allow.dns: Input should be a valid list"),
])
def test_bad_policy_config_names_the_entry(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_policy_config(doc, "ca.json authority.policy")


def test_good_policy_config_loads() -> None:
    doc = {"x509": {
        "allow": {"cn": ["Web Frontend", "*.example.com"], "dns": ["*.example.com", "localhost",
                                                                  ".svc.test"],
                  "ip": ["10.0.0.0/8", "192.168.1.10", "2001:db8::/32", "::1"],
                  "email": ["@example.com", "example.org", "*.example.net", "Ops@example.com"],
                  "uri": ["*.example.com", "spiffe.test"]},
        "deny": {"dns": ["admin.example.com"], "ip": ["10.0.0.0/24"]},
        "allowWildcardNames": True}}
    cfg = parse_policy_config(doc)
    assert cfg.x509 is not None and cfg.x509.allow_wildcard_names
    assert cfg.model_dump(by_alias=True, exclude_defaults=True) == doc
    assert X509NamePolicy.of(cfg).restricts


def test_policy_violation_messages_do_not_carry_raw_control_characters() -> None:
    long_name = "a" * 300 + ".other.test"
    message = verdict(ALLOW_SUB, None, [dns(long_name)])
    assert message is not None and len(message) < 250 and "..." in message
    message = verdict({"deny": {"dns": ["x.test"]}}, "bad\nname", [])
    assert message is not None and "\n" not in message and "bad\\nname" in message


# -- addresses written as names (issue 12) ---------------------------------------------------------
DENY_LOOPBACK = {"deny": {"ip": ["127.0.0.0/8"]}}


def test_ip_rules_judge_every_form_of_an_address() -> None:
    """A common name that reads as 127.0.0.1 ('0x7f.1', '2130706433') is judged as 127.0.0.1;
    a DNS name or e-mail domain that reads as an address is no DNS name at all."""
    cn_denied = "common name {!r} is denied by policy (deny ip '127.0.0.0/8')"
    run([
        (DENY_LOOPBACK, "127.0.0.1", [], cn_denied.format("127.0.0.1")),
        (DENY_LOOPBACK, "0x7f.1", [], cn_denied.format("0x7f.1")),
        (DENY_LOOPBACK, "2130706433", [], cn_denied.format("2130706433")),
        (DENY_LOOPBACK, "0177.0.0.1", [], cn_denied.format("0177.0.0.1")),
        (DENY_LOOPBACK, "10.1", [], None),  # 10.0.0.1: not in the denied range
        (DENY_LOOPBACK, None, [dns("127.1")],
         "name '127.1' is not allowed by policy (it is not a valid DNS name)"),
        (DENY_LOOPBACK, None, [dns("*.0x7f")],
         "name '*.0x7f' is not allowed by policy (it is not a valid DNS name)"),
        (DENY_LOOPBACK, None, [email("ops@127.1")],
         "name 'ops@127.1' is not allowed by policy (it is not a valid email address)"),
        (DENY_LOOPBACK, None, [dns("a.example"), email("ops@a.example")], None),
    ])


def test_a_uri_host_that_reads_as_an_address_is_an_ip_host() -> None:
    allow_uri = {"allow": {"uri": ["*.example.com", "127.1"]}}
    run([
        (allow_uri, None, [uri("https://127.1/x")], "name 'https://127.1/x' is not allowed by "
         "policy (its host is an IP address, so no uri rule can match it)"),
        (allow_uri, None, [uri("https://999.1/x")],
         "name 'https://999.1/x' is not allowed by policy (it is not a well-formed URI)"),
        (allow_uri, None, [uri("https://a.example.com/x")], None),
    ])


def test_ip_deny_rules_reach_the_ip_host_of_a_uri() -> None:
    """deny ip 127.0.0.0/8 is not dodged by putting the address in a URI, in any form."""
    deny_loopback = {"deny": {"ip": ["127.0.0.0/8", "::1/128"]}}
    run([
        (deny_loopback, None, [uri("https://127.0.0.1/admin")],
         DENIED.format("https://127.0.0.1/admin", "ip", "127.0.0.0/8")),
        (deny_loopback, None, [uri("https://127.1:8443/")],
         DENIED.format("https://127.1:8443/", "ip", "127.0.0.0/8")),
        (deny_loopback, None, [uri("https://0x7f.0.0.1/")],
         DENIED.format("https://0x7f.0.0.1/", "ip", "127.0.0.0/8")),
        (deny_loopback, None, [uri("https://[::1]/")],
         DENIED.format("https://[::1]/", "ip", "::1/128")),
        (deny_loopback, None, [uri("https://10.0.0.1/")], None),  # outside the denied range
        (deny_loopback, None, [uri("https://svc.example.com/")], None),
    ])
