"""Checkpoint signatures: the issuer key signs the chain head, so records before it are sealed.

A `checkpoint` record carries the key's signature over `checkpoint_message(seq, head)`; the
records up to it cannot be rewritten without the key. `kms check` signs its test challenge with
the same functions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from appliance.audit.record import AuditError

Signer = Callable[[bytes], Awaitable[bytes]]
"""Signs a checkpoint message with the issuer key; see `checkpoint_algorithm` for the scheme."""

CHECKPOINT_CONTEXT: Final = b"appliance-audit-checkpoint/v1"
CHECKPOINT_FIELDS: Final = frozenset({"head", "seq", "alg", "signature", "certificate_sha256"})


def checkpoint_message(seq: int, head: str) -> bytes:
    """The bytes a checkpoint signs: records 1..seq, whose last line hashes to `head`."""
    return b"%s seq=%d head=%s" % (CHECKPOINT_CONTEXT, seq, head.encode())


def checkpoint_algorithm(public_key: CertificatePublicKeyTypes) -> str:
    """The signature scheme a checkpoint uses for this key.

    EC: "ecdsa-with-SHA256" (DER signature). RSA: "rsa-pss-sha256" (MGF1-SHA256, salt length 32).
    Ed25519: "ed25519". The message always starts with CHECKPOINT_CONTEXT, which no DER
    certificate, CRL or OCSP response does, so the signature cannot stand for one of those.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ecdsa-with-SHA256"
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa-pss-sha256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise AuditError(f"cannot sign checkpoints with a {type(public_key).__name__}")


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign_message(key: PrivateKeyTypes, message: bytes) -> bytes:
    """Sign a checkpoint message with `key` (a token key from hsm.keys, or a software key).

    The server's Signer runs this on the PKCS#11 thread; tests run it on software keys.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _pss(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise AuditError(f"cannot sign checkpoints with a {type(key).__name__}")


def verify_signature(public_key: CertificatePublicKeyTypes, alg: str, signature: bytes,
                      message: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `alg` over `message` by `public_key`."""
    if alg != checkpoint_algorithm(public_key):
        raise InvalidSignature(f"alg {alg} does not fit the certificate's key")
    verify_message(public_key, signature, message)


def verify_message(public_key: CertificatePublicKeyTypes, signature: bytes,
                   message: bytes) -> None:
    """Raise InvalidSignature unless `sign_message` with the matching key made `signature`."""
    checkpoint_algorithm(public_key)  # AuditError for a key type it cannot sign with
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, message, _pss(), hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, message)


def certificate_sha256(certificate: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER, as in checkpoint details."""
    return certificate.fingerprint(hashes.SHA256()).hex()
