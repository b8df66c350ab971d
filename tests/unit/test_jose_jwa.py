"""The one RFC 7518 signature check (jose.jwa): each alg with the key it suits, nothing else."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from appliance.jose.jwa import signature_is_valid

DATA = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0"


def raw_ecdsa(key: ec.EllipticCurvePrivateKey, hash_: hashes.HashAlgorithm, size: int) -> bytes:
    r, s = decode_dss_signature(key.sign(DATA, ec.ECDSA(hash_)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_each_algorithm_verifies_with_its_key(rsa_key: rsa.RSAPrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    cases = [
        (p256.public_key(), "ES256", raw_ecdsa(p256, hashes.SHA256(), 32)),
        (p384.public_key(), "ES384", raw_ecdsa(p384, hashes.SHA384(), 48)),
        (rsa_key.public_key(), "RS256", rsa_key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())),
        (rsa_key.public_key(), "PS256", rsa_key.sign(DATA, pss, hashes.SHA256())),
        (ed.public_key(), "EdDSA", ed.sign(DATA)),
    ]
    for public, alg, signature in cases:
        assert signature_is_valid(public, alg, signature, DATA), alg
        assert not signature_is_valid(public, alg, signature, DATA + b"x"), alg
        tampered = bytes([signature[0] ^ 1]) + signature[1:]
        assert not signature_is_valid(public, alg, tampered, DATA), alg


def test_ecdsa_needs_raw_r_s_of_the_curve_size_and_the_matching_curve() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    raw = raw_ecdsa(p256, hashes.SHA256(), 32)
    der = p256.sign(DATA, ec.ECDSA(hashes.SHA256()))
    assert not signature_is_valid(p256.public_key(), "ES256", der, DATA)  # DER, not r || s
    assert not signature_is_valid(p256.public_key(), "ES256", raw[:-1], DATA)
    assert not signature_is_valid(p256.public_key(), "ES256", b"\0" + raw, DATA)
    # ES384 is P-384 with SHA-384: a P-256 key signing SHA-384 is not ES384.
    p256_sha384 = raw_ecdsa(p256, hashes.SHA384(), 48)
    assert not signature_is_valid(p256.public_key(), "ES384", p256_sha384, DATA)


def test_an_algorithm_that_does_not_suit_the_key_or_is_unknown_fails(
        rsa_key: rsa.RSAPrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    rs256 = rsa_key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    assert not signature_is_valid(p256.public_key(), "RS256", rs256, DATA)
    assert not signature_is_valid(rsa_key.public_key(), "ES256", rs256[:64], DATA)
    for alg in ("none", "HS256", "RS512", ""):
        assert not signature_is_valid(rsa_key.public_key(), alg, rs256, DATA)
