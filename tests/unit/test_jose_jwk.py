"""JWK <-> key, RFC 7638 thumbprints and key -> alg in appliance.jose, checked against jwcrypto."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto.jwk import JWK

from appliance.jose import jwa
from appliance.jose.base64url import b64url_encode
from appliance.jose.errors import BadJwk, UnsupportedAlgorithm
from appliance.jose.jwk import public_jwk, public_key, thumbprint
from tests.support.rfc7638 import RFC7638_KEY, RFC7638_THUMBPRINT


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"p256": ec.generate_private_key(ec.SECP256R1()),
            "p384": ec.generate_private_key(ec.SECP384R1()),
            "p521": ec.generate_private_key(ec.SECP521R1()),
            "rsa": rsa.generate_private_key(65537, 2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate()}


def test_rfc7638_example_thumbprint() -> None:
    assert thumbprint(RFC7638_KEY) == RFC7638_THUMBPRINT
    assert thumbprint({m: RFC7638_KEY[m] for m in ("e", "kty", "n")}) == RFC7638_THUMBPRINT


@pytest.mark.parametrize("name", ["p256", "p384", "p521", "rsa", "ed25519"])
def test_public_jwk_and_thumbprint_match_jwcrypto(keys: dict[str, Any], name: str) -> None:
    key = keys[name]
    reference = JWK.from_pyca(key.public_key())
    exported = json.loads(reference.export_public())
    exported.pop("kid", None)  # jwcrypto names the key by its thumbprint
    assert public_jwk(key) == public_jwk(key.public_key()) == exported
    assert thumbprint(public_jwk(key)) == reference.thumbprint()


@pytest.mark.parametrize(("name", "alg"), [("p256", "ES256"), ("p384", "ES384"),
                                           ("p521", "ES512"), ("rsa", "RS256"),
                                           ("ed25519", "EdDSA")])
def test_key_to_alg_and_back(keys: dict[str, Any], name: str, alg: str) -> None:
    key = keys[name]
    assert jwa.alg_for_key(key) == jwa.alg_for_key(key.public_key()) == alg
    assert jwa.algs_for(public_jwk(key)["kty"], public_jwk(key).get("crv"))[0] == alg
    back = public_key(public_jwk(key), alg)
    assert public_jwk(back) == public_jwk(key)


def test_rsa_keys_sign_rs256_and_ps256_and_unknown_keys_nothing(keys: dict[str, Any]) -> None:
    assert jwa.algs_for_key(keys["rsa"]) == ("RS256", "PS256")
    dsa_like = ec.generate_private_key(ec.SECP256K1())
    assert jwa.algs_for_key(dsa_like) == ()
    with pytest.raises(UnsupportedAlgorithm, match="no supported JWS alg"):
        jwa.alg_for_key(dsa_like)


def test_public_key_refusals(keys: dict[str, Any]) -> None:
    p256 = public_jwk(keys["p256"])
    for jwk, alg, message in [
        ("key", "ES256", "must be a JSON object"),
        ({**p256, "d": "AA"}, "ES256", 'private key material \\("d"\\)'),
        (public_jwk(keys["p384"]), "ES256", "alg ES256 needs an EC P-256 key, but JWK has crv"),
        (p256, "ES384", "alg ES384 needs an EC P-384 key"),  # ES384 needs P-384
        (p256, "RS256", "alg RS256 needs an RSA key, but JWK has kty 'EC'"),
        ({**p256, "y": p256["x"]}, "ES256", "is not a valid EC P-256 public key"),
        ({**p256, "x": b64url_encode(b"\x01" * 31)}, "ES256", '"x" must be 32 bytes'),
        ({**p256, "x": p256["x"] + "="}, "ES256", 'JWK "x" is not base64url'),
        ({"kty": "EC", "crv": "P-256", "x": p256["x"]}, "ES256", 'has no "y" member'),
        ({**public_jwk(keys["rsa"]), "e": b64url_encode(b"\x01" + bytes(32))}, "RS256",
         "exponent of 2\\^256"),
    ]:
        with pytest.raises(BadJwk, match=message):
            public_key(jwk, alg)
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(BadJwk, match="RSA key of 1024 bits; at least 2048"):
        public_key(public_jwk(small), "RS256", rsa_bits=(2048, 8192))


def test_thumbprint_refusals() -> None:
    with pytest.raises(BadJwk, match="kty 'oct'"):
        thumbprint({"kty": "oct", "k": "AAAA"})
    with pytest.raises(BadJwk, match="incomplete EC key"):
        thumbprint({"kty": "EC", "crv": "P-256"})
