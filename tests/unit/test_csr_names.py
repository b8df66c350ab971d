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


# -- addresses written as names, unprintable names, malformed CSR extensions (issue 12) ---------
ADDRESS_FORMS = ["127.1", "2130706433", "0x7f.0.0.1", "10.1", "127.0.1", "0177.0.0.1",
                 "0X7F.1", "127.0.0.1.", "0x7f.0x0.0.01"]


def test_ipv4_of_name_reads_what_inet_aton_reads() -> None:
    import socket

    from appliance.issuance.names import ipv4_of_name, reads_as_ipv4

    for text in [*ADDRESS_FORMS[:-2], "0x7f.0x0.0.01", "0xffffffff", "4294967296", "1.2.3.256",
                 "1.16777216", "08.1", "0x1_0.1", "+1.1", "1.-1", "a.1", "a.example"]:
        try:
            expected: ipaddress.IPv4Address | None = ipaddress.IPv4Address(
                socket.inet_aton(text))
        except OSError:
            expected = None
        assert ipv4_of_name(text) == expected, text
    assert all(reads_as_ipv4(f) for f in ADDRESS_FORMS)
    assert reads_as_ipv4("a.example.1") and reads_as_ipv4("x.0x")  # unreadable, still refused
    assert not reads_as_ipv4("1.example") and not reads_as_ipv4("0xdead.beef")


@pytest.mark.parametrize("form", ADDRESS_FORMS)
def test_a_name_that_reads_as_an_address_is_no_dns_name(form: str) -> None:
    from appliance.issuance.names import check_san, normalise_dns

    with pytest.raises(BadRequest, match="is not a DNS name: it reads as the IPv4 address"):
        parse_san(form)
    with pytest.raises(BadRequest, match="not a DNS name"):
        normalise_dns(form)
    with pytest.raises(BadRequest, match="not a DNS name"):
        check_san(x509.DNSName(form))  # a template's or a renewal copy's name
    with pytest.raises(BadRequest, match="not a DNS name"):
        parse_san(f"ops@{form}")


@pytest.mark.parametrize("name", [
    "https://é.example.com/", "é@example.com", "é.example.com", "https://a.example/ x",
    "https://a.example/\x00", "a\x00@example.com", "a b@example.com", "a\tb.example",
    " a.example", "a.example\n", "urn:x:\x7f"])
def test_unprintable_or_non_ascii_names_are_refused_in_every_type(name: str) -> None:
    from appliance.issuance.names import check_san

    with pytest.raises(BadRequest, match="space or control|not ASCII|not a valid DNS name"):
        parse_san(name)
    for made in (x509.UniformResourceIdentifier, x509.RFC822Name, x509.DNSName):
        try:
            general_name = made(name)
        except ValueError:  # cryptography refuses non-ASCII values itself
            continue
        with pytest.raises(BadRequest):
            check_san(general_name)


def test_csrs_with_malformed_subject_alt_names_are_bad_csrs() -> None:
    from tests.support.forged_csr import pem, two_san_csr, undecodable_san_csr

    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(BadCsr, match="2.5.29.17 more than once"):
        parse_csr_pem(pem(two_san_csr(key, [x509.DNSName("a.test")],
                                      [x509.DNSName("b.test")])))
    with pytest.raises(BadCsr, match="cannot be decoded"):
        parse_csr_pem(pem(undecodable_san_csr(key)))
    spaced = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://a.test/ x")]),
        critical=False).sign(key, hashes.SHA256())
    with pytest.raises(BadCsr, match="subjectAltName: URI 'https://a.test/ x' contains a space"):
        parse_csr_pem(spaced.public_bytes(serialization.Encoding.PEM).decode())
