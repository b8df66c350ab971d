"""Names that must never reach a certificate, over real HTTPS to /1.0/sign (issue 12).

- a DNS name that reads as an IPv4 address ('127.1', '2130706433', '0x7f.0.0.1' ...): 400, from
  a token, a CSR or a template; IP policy judges every address form (a common name '0x7f.1');
- a CSR with two subjectAltName extensions or an undecodable one: 400, not a 500;
- names with a space, a control character or non-ASCII text, in every SAN type: 400.
Each refusal is the step-ca JSON error naming what is wrong, and the database holds no new
certificate. The ACME side of the same rules is in test_acme_protocol.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from e2e_support import (
    Api,
    CaServer,
    Response,
    Tokens,
    provisioner_tokens,
    reconfigured,
    sighup_and_wait,
)

from tests.support.forged_csr import pem, two_san_csr, undecodable_san_csr

pytestmark = pytest.mark.e2e

SIGN = "/1.0/sign"
ADDRESS_FORMS = ["127.1", "2130706433", "0x7f.0.0.1", "10.1", "127.0.1", "0177.0.0.1",
                 "127.0.0.1.", "0X7F.1"]
LEAKS = ("Traceback", "File \"", "ValueError", "DuplicateExtension", "asn1")


def subject(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def csr_with(cn: str | None, sans: list[x509.GeneralName]) -> str:
    """A CSR built with cryptography itself (the product's make_csr refuses these names)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject(cn))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return pem(builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))


def certificate_count(ca: CaServer) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{ca.db_path}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT count(*) FROM certificates").fetchone()
    return int(count)


async def refused(api: Api, ca: CaServer, body: dict[str, Any], status: int,
                  *fragments: str) -> str:
    """POST /1.0/sign: `status` with a step-ca error naming `fragments`, and nothing issued."""
    before = certificate_count(ca)
    resp: Response = await api.post_json(SIGN, body)
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.text[:500]}"
    assert resp.content_type == "application/json", resp
    doc = resp.json()
    assert set(doc) == {"status", "message"} and doc["status"] == status, doc
    message = str(doc["message"])
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{message!r} does not say {fragment!r}"
    for leak in LEAKS:
        assert leak not in message, f"the error leaks internals: {message!r}"
    assert certificate_count(ca) == before, "a refused request left a certificate behind"
    return message


def issued(resp: Response) -> x509.Certificate:
    assert resp.status == 201, f"expected 201, got {resp.status}: {resp.text[:500]}"
    return x509.load_pem_x509_certificate(resp.json()["crt"].encode())


# -- addresses written as DNS names ---------------------------------------------------------------
@pytest.mark.parametrize("form", ADDRESS_FORMS)
async def test_an_address_in_token_sans_is_not_a_dns_name(api: Api, ca: CaServer, tokens: Tokens,
                                                          form: str) -> None:
    body = {"csr": csr_with("addr.example", [x509.DNSName(form)]),
            "ott": tokens.mint("addr.example", [form])}
    await refused(api, ca, body, 400, form, "not a DNS name", "IPv4")


@pytest.mark.parametrize("form", ["127.1", "0x7f.0.0.1"])
async def test_an_address_as_a_csr_dns_name_is_refused(api: Api, ca: CaServer, tokens: Tokens,
                                                       form: str) -> None:
    """The token names only a good name; the CSR adds the disguised address."""
    body = {"csr": csr_with("csr.example", [x509.DNSName("csr.example"), x509.DNSName(form)]),
            "ott": tokens.mint("csr.example", ["csr.example"])}
    await refused(api, ca, body, 400, form, "not a DNS name")


POLICY = {"x509": {"deny": {"ip": ["127.0.0.0/8"]}}}


@pytest.fixture
def deny_loopback(ca: CaServer) -> Iterator[None]:
    """authority.policy denies 127.0.0.0/8 (reloaded by SIGHUP), restored afterwards."""
    authority = json.loads(ca.config_path.read_text())["authority"]
    with reconfigured(ca, authority={**authority, "policy": POLICY}):
        yield


@pytest.mark.parametrize("cn", ["0x7f.1", "2130706433", "127.0.1"])
async def test_ip_policy_judges_an_address_common_name_in_any_form(
        api: Api, ca: CaServer, tokens: Tokens, deny_loopback: None, cn: str) -> None:
    body = {"csr": csr_with(cn, [x509.DNSName("cn.example")]),
            "ott": tokens.mint(cn, ["cn.example"])}
    await refused(api, ca, body, 403, cn, "denied by policy", "127.0.0.0/8")
    # The control: the same request with an ordinary common name is issued under this policy.
    good = {"csr": csr_with("cn.example", [x509.DNSName("cn.example")]),
            "ott": tokens.mint("cn.example", ["cn.example"])}
    issued(await api.post_json(SIGN, good))


async def test_ip_policy_still_refuses_the_address_itself_and_its_disguises(
        api: Api, ca: CaServer, tokens: Tokens, deny_loopback: None) -> None:
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    body = {"csr": csr_with("lo.example", [loopback]),
            "ott": tokens.mint("lo.example", ["127.0.0.1"])}
    await refused(api, ca, body, 403, "127.0.0.1", "denied by policy")
    for form in ("127.1", "0x7f.0.0.1"):
        body = {"csr": csr_with("lo.example", [x509.DNSName(form)]),
                "ott": tokens.mint("lo.example", [form])}
        await refused(api, ca, body, 400, form, "not a DNS name")


# -- malformed CSR extensions ---------------------------------------------------------------------
async def test_a_csr_with_two_subject_alt_name_extensions_is_a_400(
        api: Api, ca: CaServer, tokens: Tokens) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = two_san_csr(key, [x509.DNSName("two.example")], [x509.DNSName("evil.example")],
                      subject("two.example"))
    body = {"csr": pem(csr), "ott": tokens.mint("two.example", ["two.example"])}
    await refused(api, ca, body, 400, "2.5.29.17", "more than once")


async def test_a_csr_with_an_undecodable_subject_alt_name_is_a_400(
        api: Api, ca: CaServer, tokens: Tokens) -> None:
    csr = undecodable_san_csr(ec.generate_private_key(ec.SECP256R1()), subject("bad.example"))
    body = {"csr": pem(csr), "ott": tokens.mint("bad.example", ["bad.example"])}
    await refused(api, ca, body, 400, "cannot be decoded")


# -- spaces, control characters, non-ASCII: every SAN type ----------------------------------------
UNPRINTABLE = {
    "uri_non_ascii": ("https://é.example.com/", "not ASCII"),
    "email_non_ascii": ("é@example.com", "not ASCII"),
    "uri_space": ("https://a.example/ x", "space or control"),
    "uri_nul": ("https://a.example/\x00x", "space or control"),
    "uri_newline": ("https://a.example/\nx", "space or control"),
    "email_nul": ("a\x00b@example.com", "space or control"),
    "email_space": ("a b@example.com", "space or control"),
    "dns_tab": ("a\tb.example", "space or control"),
    "dns_leading_space": (" lead.example", "space or control"),
}


@pytest.mark.parametrize("case", UNPRINTABLE.values(), ids=UNPRINTABLE.keys())
async def test_token_sans_with_unprintable_or_non_ascii_text_are_refused(
        api: Api, ca: CaServer, tokens: Tokens, case: tuple[str, str]) -> None:
    name, fragment = case
    body = {"csr": csr_with("sans.example", []), "ott": tokens.mint("sans.example", [name])}
    await refused(api, ca, body, 400, fragment, repr(name)[1:-1][:12])


# -- template output ------------------------------------------------------------------------------
# The check at `provisioner add` renders sample data, where every user key is a string.
TEMPLATE = ('{% set u = Insecure.User.sans %}'
            '{"subject": {"commonName": {{ Subject.CommonName | toJson }}},'
            ' "sans": {{ (SANs if u is string else u) | toJson }}}')


@pytest.fixture(scope="module")
def templated(ca: CaServer) -> Tokens:
    """A JWK provisioner whose template takes its SANs from the requester's templateData."""
    template = ca.work / "names.tpl"
    template.write_text(TEMPLATE)
    ca.run_cli("provisioner", "add", "names", "--create", "--password-file",
               ca.provisioner_password_file, "--x509-template", template,
               home=ca.ca_home)
    sighup_and_wait(ca)
    return provisioner_tokens(ca, "names")


TEMPLATE_SANS = {
    "auto_address": (["127.1"], "not a DNS name"),
    "dns_address": ([{"type": "dns", "value": "0x7f.0.0.1"}], "not a DNS name"),
    "auto_uri_space": (["https://t.example/ x"], "space or control"),
    "auto_email_nul": (["a\x00@t.example"], "space or control"),
    "auto_uri_non_ascii": (["https://é.t.example/"], "not ASCII"),
}


@pytest.mark.parametrize("case", TEMPLATE_SANS.values(), ids=TEMPLATE_SANS.keys())
async def test_template_output_names_are_checked_too(api: Api, ca: CaServer, templated: Tokens,
                                                     case: tuple[list[Any], str]) -> None:
    sans, fragment = case
    body = {"csr": csr_with("tpl.example", []), "ott": templated.mint("tpl.example", []),
            "templateData": {"sans": sans}}
    await refused(api, ca, body, 400, fragment)


async def test_template_with_good_names_still_issues(api: Api, templated: Tokens) -> None:
    body = {"csr": csr_with("tpl.example", []), "ott": templated.mint("tpl.example", []),
            "templateData": {"sans": ["tpl.example", "10.9.9.9", "https://tpl.example/x"]}}
    leaf = issued(await api.post_json(SIGN, body))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["tpl.example"], sans
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["https://tpl.example/x"]


def test_the_forged_csrs_are_well_signed() -> None:
    """The refusals above are the name checks', not a signature check's."""
    key = ec.generate_private_key(ec.SECP256R1())
    for csr in (two_san_csr(key, [x509.DNSName("a.example")], [x509.DNSName("b.example")]),
                undecodable_san_csr(key)):
        assert csr.is_signature_valid
        assert x509.load_pem_x509_csr(csr.public_bytes(serialization.Encoding.PEM)
                                      ).is_signature_valid
