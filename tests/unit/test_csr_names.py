import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from appliance.authority.csr import parse_csr_pem
from appliance.errors import BadCsr, BadRequest
from appliance.issuance.names import canonical_san, parse_san


def csr_pem(key, cn: str = "a.test", algorithm=hashes.SHA256()) -> str:  # type: ignore[no-untyped-def]
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_good_csrs_pass() -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
                rsa.generate_private_key(65537, 2048)):
        assert parse_csr_pem(csr_pem(key)).subject.rfc4514_string() == "CN=a.test"
    assert parse_csr_pem(csr_pem(ed25519.Ed25519PrivateKey.generate(), algorithm=None))


def test_weak_keys_refused() -> None:
    with pytest.raises(BadCsr, match="1024 bits is too weak"):
        parse_csr_pem(csr_pem(rsa.generate_private_key(65537, 1024)))
    with pytest.raises(BadCsr, match="secp256k1 is not allowed"):
        parse_csr_pem(csr_pem(ec.generate_private_key(ec.SECP256K1())))


def test_not_pem_and_bad_signature_refused() -> None:
    with pytest.raises(BadCsr, match="PEM-encoded"):
        parse_csr_pem("hello")
    pem = csr_pem(ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    import base64
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(BadCsr, match="signature is invalid|not a valid"):
        parse_csr_pem(tampered)
    garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(BadCsr, match="not a valid"):
        parse_csr_pem(garbage)


def test_parse_san_classifies_like_step() -> None:
    assert parse_san("10.0.0.1") == x509.IPAddress(ipaddress.ip_address("10.0.0.1"))
    assert parse_san("::1") == x509.IPAddress(ipaddress.ip_address("::1"))
    assert parse_san("Foo.Example.") == x509.DNSName("foo.example")
    assert parse_san("*.example.test") == x509.DNSName("*.example.test")
    assert parse_san("ops@Example.com") == x509.RFC822Name("ops@example.com")
    assert parse_san("spiffe://example.org/x") == x509.UniformResourceIdentifier(
        "spiffe://example.org/x")
    for bad in ("", "bad_name.test", "-x.test", "a..b", "x" * 64 + ".test"):
        with pytest.raises(BadRequest):
            parse_san(bad)


def test_canonical_san_compares_case_insensitively() -> None:
    assert canonical_san(x509.DNSName("A.test")) == canonical_san(parse_san("a.test"))
    assert canonical_san(parse_san("10.0.0.1")) != canonical_san(parse_san("10.0.0.2"))
