"""The authority's decisions, in-process: every provisioner's plan takes `Authority.issue`.

A real Issuer and SQLite store, a fake clock the test moves, and software CA keys (the token's
part is proven by the integration and e2e suites).
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.authority.lifecycle import RevokeRequest
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.authority.requests import SignRequest
from appliance.errors import (
    AlreadyRevoked,
    BadCsr,
    BadRequest,
    Forbidden,
    PolicyViolation,
    Unauthorized,
)
from appliance.issuance.provisioner_ext import PROVISIONER_OID
from tests.support.inprocess import REVOKE_AUDIENCE, InProcessCa, build_ca, csr_for

BACKDATE = timedelta(minutes=1)


def sans_of(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


async def sign(ca: InProcessCa, subject: str, sans: list[str], **fields: str | None
               ) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for s in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.DNSName(s))
    _, pem = csr_for(subject, names)
    issued, _ = await ca.authority.sign(SignRequest(pem, ca.token(subject, sans), **fields))
    return issued.certificate


@pytest.fixture
async def ca(tmp_path: Path) -> InProcessCa:
    built = await build_ca(tmp_path)
    yield built  # type: ignore[misc]
    await built.store.close()


async def test_jwk_sign_default_leaf(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test", "10.0.0.1"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a.test"
    assert sans_of(cert) == ["a.test", "10.0.0.1"]
    start = ca.clock.datetime()
    assert cert.not_valid_before_utc == start - BACKDATE
    assert cert.not_valid_after_utc == start + timedelta(hours=24)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_oid(PROVISIONER_OID) is not None
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == "http://ca.test/crl"
    record = await ca.store.get_certificate(cert.serial_number)
    assert record is not None and record.status == "issued" and record.provisioner == "admin"
    assert len(ca.issuer.requests) == 1


async def test_jwk_token_is_single_use(ca: InProcessCa) -> None:
    _, pem = csr_for("a.test", [x509.DNSName("a.test")])
    token = ca.token("a.test", ["a.test"])
    await ca.authority.sign(SignRequest(pem, token))
    with pytest.raises(Unauthorized, match="already used"):
        await ca.authority.sign(SignRequest(pem, token))


async def test_jwk_token_expiry_follows_the_clock(ca: InProcessCa) -> None:
    _, pem = csr_for("a.test", [x509.DNSName("a.test")])
    token = ca.token("a.test", ["a.test"], lifetime=300)
    ca.clock.advance(300 + 61)  # past exp and the minute of leeway
    with pytest.raises(Unauthorized, match="expired"):
        await ca.authority.sign(SignRequest(pem, token))
    assert ca.issuer.requests == []


async def test_jwk_csr_must_ask_for_the_tokens_names_only(ca: InProcessCa) -> None:
    _, pem = csr_for("b.test", [x509.DNSName("a.test")])
    with pytest.raises(Forbidden, match="does not match the token subject"):
        await ca.authority.sign(SignRequest(pem, ca.token("a.test", ["a.test"])))
    _, pem = csr_for("a.test", [x509.DNSName("a.test"), x509.DNSName("evil.test")])
    with pytest.raises(Forbidden, match="evil.test"):
        await ca.authority.sign(SignRequest(pem, ca.token("a.test", ["a.test"])))
    assert ca.issuer.requests == []


async def test_requested_validity_and_claims(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test"], untrusted_not_after="2h")
    assert cert.not_valid_after_utc == ca.clock.datetime() + timedelta(hours=2)
    with pytest.raises(Forbidden, match="more than the authorized maximum"):
        await sign(ca, "a.test", ["a.test"], untrusted_not_after="25h")
    with pytest.raises(Forbidden, match="less than the authorized minimum"):
        await sign(ca, "a.test", ["a.test"], untrusted_not_after="1m")
    with pytest.raises(BadRequest, match="more than a day in the past"):
        await sign(ca, "a.test", ["a.test"], untrusted_not_before="-48h",
                   untrusted_not_after="1h")


async def test_go_zero_time_means_unset(ca: InProcessCa) -> None:
    zero = "0001-01-01T00:00:00Z"
    cert = await sign(ca, "a.test", ["a.test"], untrusted_not_before=zero,
                      untrusted_not_after=zero)
    assert cert.not_valid_after_utc == ca.clock.datetime() + timedelta(hours=24)
    acme = ca.authority.provisioner_named("acme")
    assert isinstance(acme, AcmeProvisioner)
    grant = ca.authority.authorize_order(acme, (x509.DNSName("a.test"),), zero, zero)
    assert (grant.not_before, grant.not_after) == (None, None)


async def test_renew_keeps_identity_and_lifetime_and_starts_now(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test"], untrusted_not_after="12h")
    ca.clock.advance(3600)
    renewed, name = await ca.authority.renew(cert)
    new = renewed.certificate
    assert name == "admin" and new.serial_number != cert.serial_number
    assert new.subject == cert.subject and sans_of(new) == sans_of(cert)
    assert new.not_valid_before_utc == ca.clock.datetime() - BACKDATE
    assert (new.not_valid_after_utc - new.not_valid_before_utc
            == cert.not_valid_after_utc - cert.not_valid_before_utc)
    assert new.public_key() == cert.public_key()
    assert ca.issuer.requests[-1].audit_event == "cert.renew"


async def test_rekey_takes_the_new_key(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test"])
    new_key = ec.generate_private_key(ec.SECP384R1())
    _, pem = csr_for("a.test", [x509.DNSName("a.test")], key=new_key)
    rekeyed, _ = await ca.authority.rekey(cert, pem)
    assert rekeyed.certificate.public_key() == new_key.public_key()
    assert sans_of(rekeyed.certificate) == ["a.test"]
    assert ca.issuer.requests[-1].audit_event == "cert.rekey"


async def test_renewal_claims(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test"], untrusted_not_after="1h")
    ca.clock.advance(2 * 3600)  # expired
    with pytest.raises(Unauthorized, match="has expired"):
        await ca.authority.renew(cert)  # mTLS cannot present an expired certificate
    ca.reconfigure(claims={"disableRenewal": True})
    ca.clock.advance(-2 * 3600)
    with pytest.raises(Forbidden, match="renewal is disabled"):
        await ca.authority.renew(cert)


async def test_revoked_certificate_cannot_renew(ca: InProcessCa) -> None:
    cert = await sign(ca, "a.test", ["a.test"])
    token = ca.token(str(cert.serial_number), audience=REVOKE_AUDIENCE)
    assert await ca.authority.revoke(RevokeRequest(cert.serial_number, token, 1, "x"),
                                     None) == "admin"
    with pytest.raises(Unauthorized, match="revoked"):
        await ca.authority.renew(cert)
    with pytest.raises(AlreadyRevoked):
        await ca.authority.revoke(RevokeRequest(cert.serial_number, None, 1, "x"), cert)


async def test_acme_finalize_accepts_ip_common_name(ca: InProcessCa) -> None:
    acme = ca.authority.provisioner_named("acme")
    assert isinstance(acme, AcmeProvisioner)
    order: tuple[x509.GeneralName, ...] = (
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),)
    csr, _ = csr_for("127.0.0.1", list(order))
    plan = acme.authorize_finalize(order, csr, not_before=None, not_after=None,
                                   account_id="acct1")
    cert = (await ca.authority.issue(plan)).certificate
    assert sans_of(cert) == ["127.0.0.1"]
    assert ca.issuer.requests[-1].provisioner == "acme"


async def test_acme_finalize_refuses_names_outside_the_order(ca: InProcessCa) -> None:
    acme = ca.authority.provisioner_named("acme")
    assert isinstance(acme, AcmeProvisioner)
    order: tuple[x509.GeneralName, ...] = (x509.DNSName("a.test"),)
    csr, _ = csr_for("b.test", [x509.DNSName("a.test")])
    with pytest.raises(BadCsr, match="common name 'b.test' is not an identifier"):
        acme.authorize_finalize(order, csr, not_before=None, not_after=None, account_id="a")
    csr, _ = csr_for(None, [x509.DNSName("a.test"), x509.DNSName("c.test")])
    with pytest.raises(BadCsr, match="not in the order: c.test"):
        acme.authorize_finalize(order, csr, not_before=None, not_after=None, account_id="a")


async def test_order_names_meet_the_policy_at_new_order(tmp_path: Path) -> None:
    ca = await build_ca(tmp_path, authority_fields={
        "policy": {"x509": {"deny": {"dns": ["*.internal.test"]}}}})
    acme = ca.authority.provisioner_named("acme")
    assert isinstance(acme, AcmeProvisioner)
    with pytest.raises(PolicyViolation):
        ca.authority.authorize_order(acme, (x509.DNSName("x.internal.test"),), None, None)
    await ca.store.close()


async def test_server_tls_certificate_is_a_plan_of_the_system_provisioner(
        tmp_path: Path) -> None:
    # A policy written for leaves does not stop the CA from serving its own names.
    ca = await build_ca(tmp_path, authority_fields={
        "policy": {"x509": {"deny": {"ip": ["127.0.0.0/8"]}}}})
    key = ec.generate_private_key(ec.SECP256R1())
    issued = await ca.authority.issue_server_tls(key.public_key(), ["ca.test", "127.0.0.1"])
    cert = issued.certificate
    assert sans_of(cert) == ["ca.test", "127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert PROVISIONER_OID not in [e.oid for e in cert.extensions]
    assert (await ca.store.get_certificate(cert.serial_number)) is not None
    assert ca.issuer.requests[-1].provisioner == "appliance-tls"
    await ca.store.close()


async def test_a_certificate_that_cannot_be_built_says_so(ca: InProcessCa) -> None:
    """A request the builder refuses is reported as such, not as a token failure."""
    import dataclasses

    from appliance.errors import ApplianceError

    cert = await sign(ca, "a.test", ["a.test"])
    request = ca.issuer.requests[-1]
    twice = x509.Extension(x509.OID_KEY_USAGE, True, cert.extensions.get_extension_for_class(
        x509.KeyUsage).value)
    with pytest.raises(ApplianceError, match="could not be built") as refused:
        await ca.issuer.issue(dataclasses.replace(request, token_use=None,
                                                  extra_extensions=(twice,)))
    assert "token" not in refused.value.message


async def test_default_leaf_is_the_default_template(ca: InProcessCa) -> None:
    """The built-in leaf describes what step-ca's default leaf template renders."""
    from appliance.authority.leaf_templates import DEFAULT_LEAF, OperatorTemplate
    from appliance.issuance.templates import X509Template

    jwk = ca.authority.provisioner_named("admin")
    assert jwk is not None and jwk.template is DEFAULT_LEAF
    csr, pem = csr_for("a.test", [x509.DNSName("a.test")])
    plan = jwk.authorize_sign(SignRequest(pem, ca.token("a.test", ["a.test", "10.0.0.1"])),
                              ca.authority.context)
    assert DEFAULT_LEAF.describe(plan) == OperatorTemplate(
        X509Template.default_leaf()).describe(plan)
