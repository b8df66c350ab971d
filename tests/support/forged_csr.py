"""Certificate requests that cryptography's builder refuses to make: two subjectAltName
extensions, or one whose value is not GeneralNames. Validly signed, so only the name checks can
refuse them.

The builder places each extension under a stand-in OID of the same encoded length as
subjectAltName's (2.5.29.99 for 2.5.29.17); the stand-ins are then renamed in the
CertificationRequestInfo, which is signed again with the same key.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_STAND_IN = x509.ObjectIdentifier("2.5.29.99")
_STAND_IN_DER = b"\x06\x03\x55\x1d\x63"
_SAN_DER = b"\x06\x03\x55\x1d\x11"
_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def san_value(names: list[x509.GeneralName]) -> bytes:
    """The DER value of a subjectAltName extension holding `names`."""
    return x509.SubjectAlternativeName(names).public_bytes()


def forged_csr(key: ec.EllipticCurvePrivateKey, subject: x509.Name,
               san_values: list[bytes]) -> x509.CertificateSigningRequest:
    """A CSR signed by `key` with one subjectAltName extension per entry of `san_values` (each
    the extension's DER value, well-formed or not)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for i, value in enumerate(san_values):
        # Distinct stand-ins so the builder accepts them; renamed below, all to subjectAltName.
        oid = _STAND_IN if i == 0 else x509.ObjectIdentifier(f"2.5.29.{99 + i}")
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    info = builder.sign(key, hashes.SHA256()).tbs_certrequest_bytes
    for i in range(len(san_values)):
        stand_in = _STAND_IN_DER[:-1] + bytes([0x63 + i])
        assert info.count(stand_in) == 1, "a stand-in OID is ambiguous in the request"
        info = info.replace(stand_in, _SAN_DER)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    der = _der(0x30, info + _ECDSA_WITH_SHA256 + _der(0x03, b"\x00" + signature))
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid, "the forged request does not verify"
    return csr


def two_san_csr(key: ec.EllipticCurvePrivateKey, first: list[x509.GeneralName],
                second: list[x509.GeneralName], subject: x509.Name | None = None
                ) -> x509.CertificateSigningRequest:
    return forged_csr(key, subject or x509.Name([]), [san_value(first), san_value(second)])


def undecodable_san_csr(key: ec.EllipticCurvePrivateKey, subject: x509.Name | None = None
                        ) -> x509.CertificateSigningRequest:
    """A subjectAltName whose value is a truncated SEQUENCE, not GeneralNames."""
    return forged_csr(key, subject or x509.Name([]), [b"\x30\x05\x82\x03ab"])


def pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)
