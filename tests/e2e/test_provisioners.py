"""Provisioners as the operator manages them: `applianctl provisioner add|update|remove|list`
edit ca.json (validated first), the running server applies the change on SIGHUP. Then what a
provisioner can carry: claims, a name policy (and the authority's), a certificate template.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e_support import (
    PROVISIONER,
    Api,
    CaServer,
    Response,
    Tokens,
    load_chain,
    one_error_line,
    provisioner_tokens,
    server_errors,
    sighup_and_wait,
)

from appliance.client import make_csr

pytestmark = pytest.mark.e2e

REFUSED = "error: the CA refused: "
PROVISIONER_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37476.9000.64.1")


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(ca: CaServer) -> CaServer:
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint)
    return ca


def add(ca: CaServer, name: str, *flags: str | Path, check: bool = True) -> Any:
    """`applianctl provisioner add NAME --create ...` on the CA's own ca.json."""
    return ca.run_cli("provisioner", "add", name, "--create",
                      "--password-file", ca.provisioner_password_file, *flags,
                      home=ca.ca_home, check=check)


def admin_cli(ca: CaServer, *args: str | Path, check: bool = True) -> Any:
    return ca.run_cli("provisioner", *args, home=ca.ca_home, check=check)


def listed(ca: CaServer, *args: str | Path) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in json.loads(admin_cli(ca, "list", *args).stdout)}


_TOKENS: dict[tuple[Path, str], Tokens] = {}


def tokens_for(ca: CaServer, provisioner: str) -> Tokens:
    if (ca.base, provisioner) not in _TOKENS:
        _TOKENS[ca.base, provisioner] = provisioner_tokens(ca, provisioner)
    return _TOKENS[ca.base, provisioner]


def sign_body(ca: CaServer, provisioner: str, cn: str, sans: list[str] | None = None,
              **extra: Any) -> dict[str, Any]:
    names = sans or [cn]
    key = ec.generate_private_key(ec.SECP256R1())
    return {"csr": make_csr(key, cn, names).public_bytes(serialization.Encoding.PEM).decode(),
            "ott": tokens_for(ca, provisioner).mint(cn, names), **extra}


def leaf(resp: Response) -> x509.Certificate:
    assert resp.status == 201, f"expected 201, got {resp.status}: {resp.text[:500]}"
    return x509.load_pem_x509_certificate(resp.json()["crt"].encode())


def error_message(resp: Response, status: int) -> str:
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.text[:500]}"
    body = resp.json()
    assert set(body) == {"status", "message"} and body["status"] == status, body
    return str(body["message"])


def provisioner_of(cert: x509.Certificate) -> str:
    """The name in step's provisioner extension: SEQUENCE { INTEGER, OCTET STRING name, ... }."""
    der = cert.extensions.get_extension_for_oid(PROVISIONER_OID).value.value  # type: ignore[attr-defined]
    assert der[0] == 0x30 and der[1] < 0x80, der[:4]
    assert der[2] == 0x02
    pos = 4 + der[3]
    assert der[pos] == 0x04 and der[pos + 1] < 0x80
    return bytes(der[pos + 2:pos + 2 + der[pos + 1]]).decode()


def lifetime_s(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()


def certificate(ca: CaServer, name: str, *extra: str | Path, check: bool = True) -> Any:
    crt, key = ca.work / f"{name}.crt", ca.work / f"{name}.key"
    return ca.run_cli("certificate", name, crt, key,
                      "--password-file", ca.provisioner_password_file, *extra, check=check)


def config_unchanged(ca: CaServer, before: bytes) -> None:
    assert ca.config_path.read_bytes() == before, "a refused command changed ca.json"
    leftovers = [p.name for p in ca.config_path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left in {ca.config_path.parent}: {leftovers}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 thumbprint of a P-256 key (what ca.json uses as the kid)."""
    numbers = key.public_key().public_numbers()
    members = {"crv": "P-256", "kty": "EC", "x": b64url(numbers.x.to_bytes(32, "big")),
               "y": b64url(numbers.y.to_bytes(32, "big"))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


# -- add, SIGHUP, use; update; remove -------------------------------------------------------------
def test_a_second_provisioner_with_its_own_claims(client: CaServer) -> None:
    admin_cli(client, "add", "team", "--create", "--password-file",
              client.provisioner_password_file, "--x509-max-dur", "1h",
              "--x509-default-dur", "30m")
    in_file = listed(client, "--ca-config", client.config_path)
    assert in_file["team"]["claims"] == {"maxTLSCertDuration": "1h",
                                         "defaultTLSCertDuration": "30m"}
    assert in_file["team"]["encryptedKey"] and "d" not in in_file["team"]["key"]

    # Written, but not in effect until the server is told.
    assert "team" not in listed(client)
    line = one_error_line(certificate(client, "team-early.example", "--provisioner", "team",
                                      check=False))
    assert line == "error: no JWK provisioner named 'team'"

    sighup_and_wait(client)
    assert listed(client)["team"]["claims"] == in_file["team"]["claims"]
    certificate(client, "team.example", "--provisioner", "team")
    cert = load_chain(client.work / "team.example.crt")[0]
    assert provisioner_of(cert) == "team"
    assert lifetime_s(cert) == 30 * 60 + 60  # its default, plus the backdate

    line = one_error_line(certificate(client, "team-long.example", "--provisioner", "team",
                                      "--not-after", "2h", check=False))
    assert line == (f"{REFUSED}requested duration of 2h is more than the authorized maximum "
                    "certificate duration of 1h")
    assert not (client.work / "team-long.example.key").exists()
    # The claim is the provisioner's own: admin still issues 2 h.
    certificate(client, "admin-long.example", "--provisioner", PROVISIONER,
                "--not-after", "2h")


async def test_every_worker_applies_the_claims(client: CaServer, api: Api) -> None:
    for i in range(6):  # the connections land on either worker
        resp = await api.post_json("/1.0/sign", sign_body(client, "team", f"w{i}.example",
                                                          notAfter="2h"))
        assert "more than the authorized maximum" in error_message(resp, 403)


async def test_update_takes_effect_on_sighup(client: CaServer, api: Api) -> None:
    admin_cli(client, "update", "team", "--x509-max-dur", "3h")
    resp = await api.post_json("/1.0/sign", sign_body(client, "team", "upd.example",
                                                      notAfter="2h"))
    assert "more than the authorized maximum" in error_message(resp, 403)
    sighup_and_wait(client)
    cert = leaf(await api.post_json("/1.0/sign", sign_body(client, "team", "upd.example",
                                                           notAfter="2h")))
    assert lifetime_s(cert) == 2 * 3600 + 60
    line = one_error_line(admin_cli(client, "update", "nosuch", "--x509-max-dur", "3h",
                                    check=False))
    assert line == "error: no provisioner named 'nosuch'"


async def test_removed_provisioner_is_refused_after_sighup(client: CaServer, api: Api) -> None:
    early = tokens_for(client, "team").mint("gone.example")
    crt = client.work / "team.example.crt"
    admin_cli(client, "remove", "team")
    assert "team" not in listed(client, "--ca-config", client.config_path)
    sighup_and_wait(client)
    assert "team" not in listed(client)

    resp = await api.post_json("/1.0/sign", sign_body(client, "team", "gone.example"))
    assert error_message(resp, 401) == "token is not from a known provisioner (check iss and kid)"
    line = one_error_line(client.run_cli(
        "certificate", "gone.example", client.work / "gone.crt", client.work / "gone.key",
        "--token", early, check=False))
    assert line == f"{REFUSED}token is not from a known provisioner (check iss and kid)"
    # Certificates it authorised can no longer be renewed either.
    line = one_error_line(client.run_cli("renew", crt, client.work / "team.example.key",
                                         "--force", check=False))
    assert line == (f"{REFUSED}the provisioner 'team' that authorised this certificate no "
                    "longer exists")
    line = one_error_line(admin_cli(client, "remove", "team", check=False))
    assert line == "error: no provisioner named 'team'"


def test_default_provisioner_is_the_first_in_ca_json(client: CaServer) -> None:
    """Without --provisioner the CLI should use ca.json's first provisioner (init's `admin`),
    or refuse to guess. Here a provisioner is added whose kid sorts before admin's."""
    admin_kid = listed(client, "--ca-config", client.config_path)[PROVISIONER][
        "key"]["kid"]
    for _ in range(100_000):
        key = ec.generate_private_key(ec.SECP256R1())
        if thumbprint(key) < admin_kid:
            break
    else:
        pytest.fail(f"no key with a kid below {admin_kid!r} in 100000 tries")
    pem = client.work / "early-provisioner.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    admin_cli(client, "add", "early", "--private-key", pem, "--password-file",
              client.provisioner_password_file, "--disable-renewal")
    sighup_and_wait(client)
    try:
        result = certificate(client, "default.example", check=False)
        if result.returncode == 0:
            chosen = provisioner_of(load_chain(client.work / "default.example.crt")[0])
            assert chosen == PROVISIONER, (
                f"`applianctl certificate` without --provisioner used {chosen!r} (the lowest "
                f"kid on GET /provisioners), not ca.json's first provisioner {PROVISIONER!r}")
        else:
            assert "--provisioner" in one_error_line(result)
    finally:
        admin_cli(client, "remove", "early")
        sighup_and_wait(client)


# -- refused at add time --------------------------------------------------------------------------
BAD_TEMPLATE = '{\n  "subject": {{ Subject | toJson }},\n  "sans": {{ SANs | toJson }\n}\n'
ADD_REFUSALS: list[tuple[str, list[str], str]] = [
    ("min-above-default", ["--x509-min-dur", "1h", "--x509-default-dur", "30m"],
     "error: provisioner 'bad': claims must satisfy minTLSCertDuration <= "
     "defaultTLSCertDuration <= maxTLSCertDuration (got 1h, 30m, 24h)"),
    ("ip-host-bits", ["--x509-allow-ip", "10.0.0.1/8"],
     "policy ip entry '10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?"),
    ("template-syntax", ["--x509-template", "{bad_template}"],
     "error: provisioner 'bad' template: line 3: unexpected '}'"),
    ("dns-with-scheme", ["--x509-deny-dns", "https://bad.example"],
     "policy dns entry 'https://bad.example' is not a valid domain pattern: give the host "
     "name only, without a scheme"),
    ("template-data-not-object", ["--x509-template-data", "{list_json}"],
     "must hold a JSON object"),
    ("malformed-duration", ["--x509-max-dur", "5x"], "invalid duration '5x'"),
    ("zero-duration", ["--x509-min-dur", "0s"], "duration '0s' must be positive"),
]


@pytest.mark.parametrize(("flags", "expected"), [c[1:] for c in ADD_REFUSALS],
                         ids=[c[0] for c in ADD_REFUSALS])
def test_invalid_provisioner_is_refused_at_add_time(client: CaServer, flags: list[str],
                                                    expected: str) -> None:
    bad_template = client.work / "bad.tpl"
    bad_template.write_text(BAD_TEMPLATE)
    list_json = client.work / "list.json"
    list_json.write_text("[1, 2]\n")
    flags = [f.format(bad_template=bad_template, list_json=list_json) for f in flags]
    before = client.config_path.read_bytes()
    line = one_error_line(add(client, "bad", *flags, check=False))
    assert expected in line, line
    config_unchanged(client, before)


def test_duplicate_name_is_refused(client: CaServer) -> None:
    before = client.config_path.read_bytes()
    line = one_error_line(add(client, PROVISIONER, check=False))
    assert line == f"error: a provisioner named '{PROVISIONER}' already exists"
    config_unchanged(client, before)


# -- name policy ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policies(client: CaServer) -> CaServer:
    """`pol` and `polw` with provisioner policies; the authority denies *.blocked.test.

    A certificate for pre.blocked.test is issued first, to see renewal re-check the policy.
    """
    certificate(client, "pre.blocked.test", "--provisioner", PROVISIONER)
    add(client, "pol",
        "--x509-allow-dns", "*.example.com", "--x509-allow-dns", "example.com",
        "--x509-deny-dns", "bad.example.com", "--x509-deny-dns", "*.internal.example.com",
        "--x509-allow-ip", "10.0.0.0/8", "--x509-allow-email", "@example.com",
        "--x509-deny-cn", "forbidden.example.com")
    add(client, "polw", "--x509-allow-dns", "*.example.com", "--x509-allow-wildcard-names")
    config = json.loads(client.config_path.read_text())
    # Wildcards need allowWildcardNames in every policy that has entries (docs/policy.md).
    config["authority"]["policy"] = {"x509": {"deny": {"dns": ["*.blocked.test"]},
                                              "allowWildcardNames": True}}
    client.config_path.write_text(json.dumps(config, indent=2))
    sighup_and_wait(client)
    return client


def denied(name: str, rule: str) -> str:
    return f"name '{name}' is denied by policy (deny dns '{rule}')"


def not_allowed(name: str, why: str = "no allow rule matches") -> str:
    return f"name '{name}' is not allowed by policy ({why})"


POLICY_CASES: list[tuple[str, str, list[str] | None, str | None]] = [
    ("pol", "ok.example.com", None, None),
    ("pol", "example.com", None, None),
    ("pol", "bad.example.com", None, denied("bad.example.com", "bad.example.com")),
    # allow '*.example.com': exactly one label below; deny '*.internal...': any depth.
    ("pol", "a.b.example.com", None, not_allowed("a.b.example.com")),
    ("pol", "x.internal.example.com", None,
     denied("x.internal.example.com", "*.internal.example.com")),
    ("pol", "y.z.internal.example.com", None,
     denied("y.z.internal.example.com", "*.internal.example.com")),
    ("pol", "other.test", None, not_allowed("other.test")),
    ("pol", "*.example.com", None, "wildcard name '*.example.com' is not allowed by policy"),
    ("polw", "*.example.com", None, None),
    ("polw", "*.a.example.com", None, not_allowed("*.a.example.com")),
    ("pol", "ip.example.com", ["ip.example.com", "10.1.2.3"], None),
    ("pol", "ip.example.com", ["ip.example.com", "192.168.1.1"], not_allowed("192.168.1.1")),
    ("pol", "mail.example.com", ["mail.example.com", "ops@example.com"], None),
    ("pol", "mail.example.com", ["mail.example.com", "ops@evil.test"],
     not_allowed("ops@evil.test")),
    ("pol", "uri.example.com", ["uri.example.com", "spiffe://uri.example.com/svc"],
     not_allowed("spiffe://uri.example.com/svc", "no allow uri rules")),
    ("pol", "forbidden.example.com", ["ok.example.com"],
     "common name 'forbidden.example.com' is denied by policy "
     "(deny cn 'forbidden.example.com')"),
    # The authority's policy applies to every provisioner, on top of their own.
    (PROVISIONER, "x.blocked.test", None, denied("x.blocked.test", "*.blocked.test")),
    (PROVISIONER, "deep.x.blocked.test", None, denied("deep.x.blocked.test", "*.blocked.test")),
    ("pol", "x.blocked.test", None, denied("x.blocked.test", "*.blocked.test")),
    (PROVISIONER, "blocked.test", None, None),  # '*.' covers names below, not the domain
]


@pytest.mark.parametrize(("provisioner", "cn", "sans", "refusal"), POLICY_CASES,
                         ids=[f"{c[0]}:{c[1]}:{','.join(c[2] or [])}" for c in POLICY_CASES])
async def test_name_policy_over_the_api(policies: CaServer, api: Api, provisioner: str, cn: str,
                                        sans: list[str] | None, refusal: str | None) -> None:
    resp = await api.post_json("/1.0/sign", sign_body(policies, provisioner, cn, sans))
    if refusal is None:
        cert = leaf(resp)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    else:
        assert error_message(resp, 403) == refusal


@pytest.mark.parametrize(("provisioner", "cn", "refusal"), [
    ("pol", "bad.example.com", denied("bad.example.com", "bad.example.com")),
    ("pol", "a.b.example.com", not_allowed("a.b.example.com")),
    ("pol", "y.z.internal.example.com",
     denied("y.z.internal.example.com", "*.internal.example.com")),
    ("pol", "*.example.com", "wildcard name '*.example.com' is not allowed by policy"),
    (PROVISIONER, "x.blocked.test", denied("x.blocked.test", "*.blocked.test")),
])
def test_name_policy_refusals_over_the_cli(policies: CaServer, provisioner: str, cn: str,
                                           refusal: str) -> None:
    crt, key = policies.work / "policy-cli.crt", policies.work / "policy-cli.key"
    result = policies.run_cli("certificate", cn, crt, key, "--provisioner", provisioner,
                              "--password-file", policies.provisioner_password_file,
                              check=False)
    assert one_error_line(result) == f"{REFUSED}{refusal}"
    assert not crt.exists() and not key.exists()


def test_renewal_rechecks_the_policy(policies: CaServer) -> None:
    crt, key = policies.work / "pre.blocked.test.crt", policies.work / "pre.blocked.test.key"
    before = crt.read_bytes()
    line = one_error_line(policies.run_cli("renew", crt, key, "--force", check=False))
    assert line == f"{REFUSED}{denied('pre.blocked.test', '*.blocked.test')}"
    assert crt.read_bytes() == before


# -- certificate templates ------------------------------------------------------------------------
TEMPLATE = """\
{
  "subject": {
    "commonName": {{ Subject.CommonName | toJson }},
    "organization": {{ Data.organization | toJson }},
    "organizationalUnit": {{ Insecure.User.ou | default("Unassigned") | toJson }}
  },
  "sans": {{ SANs | toJson }},
  "extKeyUsage": ["serverAuth"],
  "extensions": [{"id": "1.3.6.1.4.1.55555.1", "critical": false, "value": "DAVoZWxsbw=="}]
}
"""
TEMPLATE_EXTENSION = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")

# One template, many ways to go wrong, chosen by the requester's templateData "mode". Sample data
# at add time has no "mode", so the check renders the plain branch.
FAILING_TEMPLATE = """\
{%- set u = Insecure.User -%}
{%- set mode = u.mode if "mode" in u else "none" -%}
{%- if mode == "fail" -%}
  {{ fail("no certificates for " ~ Subject.CommonName ~ " today") }}
{%- endif -%}
{
  "subject": {% if mode == "subject" %}{{ u.subject | toJson }}{% else %}{
    "commonName": {{ Subject.CommonName | toJson }}
    {%- if mode == "undefined" %}, "organization": {{ u.nosuch.deeper | toJson }}{% endif %}
    {%- if mode == "divide" %}, "organization": {{ (100 / u.n) | string | toJson }}{% endif %}
    {%- if mode == "raw" %}, "organization": "{{ u.org }}"{% endif %}
  }{% endif %},
  "sans": {% if mode == "sans" %}{{ u.sans | toJson }}{% else %}{{ SANs | toJson }}{% endif %}
  {%- if mode == "ca" %}, "basicConstraints": {"isCA": true}{% endif %}
  {%- if mode == "huge" %}, "extensions": [
    {"id": "1.2.3.4", "value": {{ ("A" * u.n) | toJson }}}]{% endif %}
  {%- if mode == "eku" %}, "extKeyUsage": {{ u.eku | toJson }}{% endif %}
  {%- if mode == "crl" %}, "crlDistributionPoints": {{ u.crl | toJson }}{% endif %}
  {%- if mode == "loop" %}{% for i in range(u.n) %} {% endfor %}{% endif %}
  {%- if mode == "recurse" -%}
    {% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}
  {%- endif %}
}
"""


@pytest.fixture(scope="module")
def templates(client: CaServer) -> CaServer:
    template, data = client.work / "org.tpl", client.work / "org.json"
    template.write_text(TEMPLATE)
    data.write_text(json.dumps({"organization": "Example Org"}))
    add(client, "tpl", "--x509-template", template, "--x509-template-data", data)
    failing = client.work / "failing.tpl"
    failing.write_text(FAILING_TEMPLATE)
    add(client, "tplx", "--x509-template", failing)
    sighup_and_wait(client)
    return client


def subject_values(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


async def test_template_sets_organization_unit_and_key_usage(templates: CaServer,
                                                             api: Api) -> None:
    resp = await api.post_json("/1.0/sign", sign_body(
        templates, "tpl", "tpl.example.com", ["tpl.example.com", "10.3.3.3"],
        templateData={"ou": "Platform"}))
    cert = leaf(resp)
    assert subject_values(cert, NameOID.ORGANIZATION_NAME) == ["Example Org"]
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["Platform"]
    assert subject_values(cert, NameOID.COMMON_NAME) == ["tpl.example.com"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tpl.example.com"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.3.3.3"]
    # What the authority adds is still there: its provisioner extension and the CRL location.
    assert provisioner_of(cert) == "tpl"
    cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)

    crt = templates.work / "tpl-api.crt"
    crt.write_text("".join(resp.json()["certChain"]))
    templates.openssl_verify(crt, purpose="sslserver")
    with pytest.raises(AssertionError, match="openssl verify failed"):
        templates.openssl_verify(crt, purpose="sslclient")  # serverAuth only, as asked


def test_template_over_the_cli(templates: CaServer) -> None:
    certificate(templates, "tpl-cli.example.com", "--provisioner", "tpl")
    cert = load_chain(templates.work / "tpl-cli.example.com.crt")[0]
    assert subject_values(cert, NameOID.ORGANIZATION_NAME) == ["Example Org"]
    assert subject_values(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["Unassigned"]


async def test_template_certificate_keeps_its_subject_when_renewed_with_x5c(
        templates: CaServer, api: Api) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    body = sign_body(templates, "tpl", "tpl-renew.example.com", templateData={"ou": "Ops"})
    body["csr"] = make_csr(key, "tpl-renew.example.com", ["tpl-renew.example.com"]).public_bytes(
        serialization.Encoding.PEM).decode()
    cert = leaf(await api.post_json("/1.0/sign", body))
    now = int(time.time())
    token = jwt.encode(
        {"aud": f"{templates.url}/1.0/renew", "iat": now, "nbf": now, "exp": now + 300,
         "jti": os.urandom(16).hex()}, key, algorithm="ES256",
        headers={"x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER))
                         .decode()]})
    renewed = leaf(await api.request("POST", "/1.0/renew", json={},
                                     headers={"Authorization": f"Bearer {token}"}))
    assert renewed.subject == cert.subject
    assert (renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            == cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    # The extension the template added carries over (UTF8String "hello"), once.
    assert cert.extensions.get_extension_for_oid(TEMPLATE_EXTENSION).value.value == (
        b"\x0c\x05hello")  # type: ignore[attr-defined]
    carried = [e for e in renewed.extensions if e.oid == TEMPLATE_EXTENSION]
    assert len(carried) == 1 and carried[0].value.value == b"\x0c\x05hello"  # type: ignore[attr-defined]
    assert provisioner_of(renewed) == "tpl"


def test_cli_renews_a_server_auth_only_certificate(templates: CaServer) -> None:
    """`applianctl renew` on a template certificate without clientAuth (valid, so over mTLS).
    It should renew it (e.g. with an x5c token when the certificate cannot be a TLS client
    certificate) or at least say why it cannot."""
    certificate(templates, "tpl-mtls.example.com", "--provisioner", "tpl")
    crt = templates.work / "tpl-mtls.example.com.crt"
    key = templates.work / "tpl-mtls.example.com.key"
    old = load_chain(crt)[0]
    result = templates.run_cli("renew", crt, key, "--force", check=False)
    if result.returncode == 0:
        new = load_chain(crt)[0]
        assert new.serial_number != old.serial_number and new.subject == old.subject
    else:
        line = one_error_line(result)
        assert "clientAuth" in line or "client authentication" in line, (
            f"renewing a serverAuth-only certificate failed without saying why: {line}")


TEMPLATE_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("fail", {"mode": "fail"},
     "the certificate template refused the request: no certificates for tx.example.com today"),
    ("undefined", {"mode": "undefined"}, "UndefinedError"),
    ("divide-by-zero", {"mode": "divide", "n": 0}, "ZeroDivisionError"),
    ("raw-quote", {"mode": "raw", "org": 'a"b'}, "template output is not valid JSON"),
    ("ca", {"mode": "ca"}, "basicConstraints isCA true is refused"),
    ("huge", {"mode": "huge", "n": 10**6}, "would be too large"),
    ("eku", {"mode": "eku", "eku": ["bogus"]}, "extKeyUsage 'bogus' is unknown"),
    ("loop", {"mode": "loop", "n": 10**9}, "Range too big"),
    ("recursion", {"mode": "recurse"}, "recursion is too deep"),
    ("country", {"mode": "subject", "subject": {"country": "USA"}},
     "subject country 'USA' must be a two-letter code"),
    ("san-type", {"mode": "sans", "sans": [{"type": "x400", "value": "v"}]},
     "SAN type 'x400' is not supported"),
    # Requester data that reaches the certificate's fields through the template:
    ("uri-san-bad-ipv6", {"mode": "sans", "sans": [{"type": "uri", "value": "http://[::1"}]},
     ""),
    ("uri-san-unicode-host", {"mode": "sans",
                              "sans": [{"type": "uri", "value": "https://\u00e9x.example/"}]},
     ""),
    ("email-san-unicode-local", {"mode": "sans",
                                 "sans": [{"type": "email", "value": "\u00e9@example.com"}]},
     ""),
    ("crl-bad-ipv6", {"mode": "crl", "crl": ["http://[::1/crl"]}, ""),
    ("cn-lone-surrogate", {"mode": "subject", "subject": {"commonName": "\ud800x"}}, ""),
    ("o-lone-surrogate", {"mode": "subject",
                          "subject": {"commonName": "tx.example.com",
                                      "organization": "\ud800x"}}, ""),
]


@pytest.mark.parametrize(("template_data", "fragment"), [c[1:] for c in TEMPLATE_REFUSALS],
                         ids=[c[0] for c in TEMPLATE_REFUSALS])
async def test_template_errors_at_request_time_are_4xx(templates: CaServer, api: Api,
                                                       template_data: dict[str, Any],
                                                       fragment: str) -> None:
    since = templates.log_size()
    resp = await api.post_json("/1.0/sign", sign_body(templates, "tplx", "tx.example.com",
                                                      templateData=template_data))
    logged = [str(e.get("exception") or e.get("error") or "")[-300:]
              for e in server_errors(templates, since)]
    assert 400 <= resp.status < 500, (
        f"templateData {template_data!r} gave {resp.status} {resp.text[:300]}; logged: {logged}")
    message = error_message(resp, resp.status)
    assert fragment in message, message
    assert "Traceback" not in message and 'File "' not in message
    health = await api.get("/health")
    assert health.status == 200
    assert not server_errors(templates, since)


def test_template_without_failure_modes_still_issues(templates: CaServer) -> None:
    certificate(templates, "tx-plain.example.com", "--provisioner", "tplx")
    cert = load_chain(templates.work / "tx-plain.example.com.crt")[0]
    assert provisioner_of(cert) == "tplx"


def test_template_line_is_in_the_add_time_error(client: CaServer) -> None:
    template = client.work / "undefined-filter.tpl"
    template.write_text(textwrap.dedent("""\
        {
          "subject": {{ Subject | toJson }},
          "sans": {{ SANs | nosuchfilter }}
        }
        """))
    before = client.config_path.read_bytes()
    line = one_error_line(add(client, "bad", "--x509-template", template, check=False))
    assert line.startswith("error: provisioner 'bad' template: line 3: "), line
    assert "nosuchfilter" in line, line
    config_unchanged(client, before)
