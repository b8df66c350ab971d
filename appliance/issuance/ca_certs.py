"""The CA's own certificates: a self-signed root and an intermediate under it, signed in tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from cryptography.x509.oid import NameOID

ROOT_VALIDITY = timedelta(days=3650)
INTERMEDIATE_VALIDITY = timedelta(days=3650)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False)


def build_root(
    name: str, key: CertificateIssuerPrivateKeyTypes, now: datetime | None = None
) -> x509.Certificate:
    """`<name> Root CA`, 10 years, pathlen 1, self-signed by the token key."""
    # Here, not at the top: issuer.py brings the store and the audit log, and the client
    # commands that only read fingerprint() (bootstrap, root) must start fast.
    from appliance.issuance.issuer import signature_hash

    now = now or datetime.now(UTC)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Root CA"),
    ])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, signature_hash(key))  # type: ignore[arg-type]
    )


def build_intermediate(
    name: str,
    public_key: CertificateIssuerPublicKeyTypes,
    root_cert: x509.Certificate,
    root_key: CertificateIssuerPrivateKeyTypes,
    now: datetime | None = None,
) -> x509.Certificate:
    """`<name> Intermediate CA`, pathlen 0, signed by the root key in the root token."""
    from appliance.issuance.issuer import signature_hash  # see build_root

    now = now or datetime.now(UTC)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Intermediate CA"),
    ])
    not_after = min(now + INTERMEDIATE_VALIDITY, root_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(root_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            root_cert.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(root_key, signature_hash(root_key))  # type: ignore[arg-type]
    )


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER certificate, as step prints it."""
    return cert.fingerprint(hashes.SHA256()).hex()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
