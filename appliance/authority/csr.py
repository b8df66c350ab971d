"""CSR parsing and the key policy: PEM only, valid self-signature, no weak keys."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from appliance.errors import ApplianceError, BadCsr
from appliance.issuance.names import check_san

MAX_CSR_BYTES = 16384
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


def parse_csr_pem(untrusted_pem: str) -> x509.CertificateSigningRequest:
    """Load a PEM CSR and check its signature and key; raise BadCsr saying what is wrong."""
    if "-----BEGIN CERTIFICATE REQUEST-----" not in untrusted_pem:
        raise BadCsr("csr must be a PEM-encoded CERTIFICATE REQUEST")
    if len(untrusted_pem) > MAX_CSR_BYTES:
        raise BadCsr(f"csr is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(untrusted_pem.encode())
    except ValueError:
        raise BadCsr("csr is not a valid PEM certificate request") from None
    return check_csr(csr)


def check_csr(csr: x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    try:
        valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - an unsupported algorithm is a bad CSR, not a 500
        valid = False
    if not valid:
        raise BadCsr("csr signature is invalid")
    check_public_key(csr.public_key())
    check_csr_names(csr)
    return csr


def check_csr_names(csr: x509.CertificateSigningRequest) -> None:
    """The subject and the extensions decode, with at most one subjectAltName; BadCsr if not.

    cryptography parses these lazily, on first use, so a CSR with two subjectAltName extensions
    or an undecodable one loads and verifies, and then raises wherever its names are first read:
    here, once, with a message instead.
    """
    try:
        csr.subject.rfc4514_string()
    except ValueError:
        raise BadCsr("csr subject cannot be decoded") from None
    try:
        extensions = csr.extensions
    except x509.DuplicateExtension as e:
        raise BadCsr(f"csr has the extension {e.oid.dotted_string} more than once") from None
    except ValueError:
        raise BadCsr("csr has an extension that cannot be decoded") from None
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            for name in extension.value:
                try:
                    check_san(name)
                except ApplianceError as e:
                    raise BadCsr(f"csr subjectAltName: {e.message}") from None


def check_public_key(key: object) -> None:
    """Key policy: RSA 2048-8192 bits, EC P-256/P-384/P-521, Ed25519."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadCsr(f"RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} "
                         "bits are required")
        if key.key_size > MAX_RSA_BITS:
            raise BadCsr(f"RSA key of {key.key_size} bits is larger than {MAX_RSA_BITS}")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise BadCsr(f"elliptic curve {key.curve.name} is not allowed; use P-256, P-384 or "
                         "P-521")
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise BadCsr(f"key type {type(key).__name__} is not allowed")
