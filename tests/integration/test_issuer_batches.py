"""Concurrent issuance in batches, with a real token key, a real database and a real audit log.

Requests that arrive together share commits, one audit write and one trip to the token's thread;
each must still get its own outcome: a replayed token or a certificate the builder refuses fails
that request alone, and every certificate handed out is recorded and audited first.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.audit import AuditLog
from appliance.errors import Unauthorized
from appliance.issuance.issuer import CertificateNotBuilt, IssuanceRequest, Issuer
from appliance.storage import TokenUse
from appliance.storage.sqlite import SqliteStore
from hsm.keystore import KeySpec, TokenPrivateKey
from hsm.pkcs11_store import Pkcs11KeyStore

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca_key(keystore: Pkcs11KeyStore) -> Iterator[tuple[TokenPrivateKey, x509.Certificate]]:
    ref = keystore.generate(KeySpec("EC", "P-256"), f"batch-ca {secrets.token_hex(4)}")
    key = keystore.private_key(ref)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Batch Test Intermediate")])
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    try:
        yield key, cert
    finally:
        keystore.destroy(ref)


def leaf_request(cn: str, jti: str | None, **kwargs: object) -> IssuanceRequest:
    return IssuanceRequest(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        sans=(x509.DNSName(cn),),
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        not_before=NOW, not_after=NOW + timedelta(hours=1), provisioner="admin",
        token_use=TokenUse("admin", jti, NOW + timedelta(minutes=5)) if jti else None,
        **kwargs)  # type: ignore[arg-type]


async def test_a_batch_gives_each_request_its_own_outcome(
        tmp_path: Path, keystore: Pkcs11KeyStore,
        ca_key: tuple[TokenPrivateKey, x509.Certificate]) -> None:
    key, ca_cert = ca_key
    store = SqliteStore.open(tmp_path / "db" / "ca.db")
    audit = AuditLog(tmp_path / "audit" / "audit.log")
    (tmp_path / "audit").mkdir()
    issuer = Issuer(ca_cert, (ca_cert,), key, keystore.run_async, store, audit)
    await issuer.issue(leaf_request("first.test", "jti-used-before"))

    # A second BasicConstraints makes cryptography's builder refuse this one certificate.
    refused_by_builder = leaf_request("broken.test", "jti-broken-0001", extra_extensions=(
        x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(False, None)),))
    requests = [leaf_request(f"n{i}.test", f"jti-{i:08d}") for i in range(40)]
    results = await asyncio.gather(
        *(issuer.issue(r) for r in requests),
        issuer.issue(leaf_request("replay.test", "jti-used-before")),
        issuer.issue(refused_by_builder),
        return_exceptions=True)

    issued, replayed, broken = results[:40], results[40], results[41]
    assert isinstance(replayed, Unauthorized) and "already used" in replayed.message
    assert isinstance(broken, CertificateNotBuilt) and "could not be built" in broken.message
    for request, result in zip(requests, issued, strict=True):
        assert not isinstance(result, BaseException), result
        cert = result.certificate
        cert.verify_directly_issued_by(ca_cert)  # signed by the token key
        assert cert.subject == request.subject
        record = await store.get_certificate(cert.serial_number)
        assert record is not None and record.status == "issued"
        assert record.der == cert.public_bytes(serialization.Encoding.DER)
    assert await store.count_certificates("issued") == 41
    assert await store.count_certificates("failed") == 1  # the builder's refusal, recorded
    assert await store.count_certificates("intent") == 0
    await store.close()
    await audit.close()

    records = [json.loads(line) for line in (tmp_path / "audit" / "audit.log").read_text()
               .splitlines()]
    successes = {r["details"]["serial"] for r in records
                 if r["event"] == "cert.issue" and r["outcome"] == "success"}
    failures = [r for r in records if r["event"] == "cert.issue" and r["outcome"] == "failure"]
    # Every certificate handed out was audited; the refused one was audited before the attempt
    # and its failure after; the replay never reached the audit log as an issuance.
    assert {format(r.certificate.serial_number, "x") for r in issued  # type: ignore[union-attr]
            } <= successes
    assert len(successes) == 42 and len(failures) == 1
    assert failures[0]["details"]["subject"] == "CN=broken.test"


async def test_a_caller_that_goes_away_does_not_abandon_its_certificate(
        tmp_path: Path, keystore: Pkcs11KeyStore,
        ca_key: tuple[TokenPrivateKey, x509.Certificate]) -> None:
    key, ca_cert = ca_key
    store = SqliteStore.open(tmp_path / "ca.db")
    issuer = Issuer(ca_cert, (ca_cert,), key, keystore.run_async, store, None)
    tasks = [asyncio.ensure_future(issuer.issue(leaf_request(f"c{i}.test", f"jti-cancel-{i:04d}")))
             for i in range(10)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(100):  # the cancelled callers' certificates finish without them
        if await store.count_certificates("issued") == 10:
            break
        await asyncio.sleep(0.05)
    assert await store.count_certificates("issued") == 10
    assert await store.count_certificates("intent") == 0
    await store.close()
