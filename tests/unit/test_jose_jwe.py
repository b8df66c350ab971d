"""The provisioner-key JWE: step-ca's wire format, a round trip, and a wrong password."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwcrypto import jwe, jwk

from appliance.errors import Unauthorized
from appliance.jose.base64url import b64url_decode
from appliance.jose.jwe import WrongPassword, decrypt_private_jwk, encrypt_private_jwk
from appliance.jose.jwk import public_jwk, thumbprint

PASSWORD = b"correct horse battery staple"


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()),
                                 ed25519.Ed25519PrivateKey.generate(),
                                 rsa.generate_private_key(65537, 2048)],
                         ids=["p256", "ed25519", "rsa"])
def test_round_trip_in_the_step_format(key: PrivateKeyTypes) -> None:
    kid = thumbprint(public_jwk(key))
    token = encrypt_private_jwk(key, PASSWORD, {"kid": kid, "use": "sig"})
    parts = token.split(".")
    assert len(parts) == 5, "a compact JWE has five parts"
    header = json.loads(b64url_decode(parts[0]))
    assert (header["alg"], header["enc"], header["cty"], header["p2c"]) == (
        "PBES2-HS256+A128KW", "A256GCM", "jwk+json", 600_000)
    assert len(b64url_decode(header["p2s"])) >= 8
    back, members = decrypt_private_jwk(token, PASSWORD)
    assert public_jwk(back) == public_jwk(key) and members["kid"] == kid
    assert members["use"] == "sig" and "d" in members


def test_a_jwe_made_by_jwcrypto_directly_decrypts() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    private = jwk.JWK.from_pyca(key)
    token = jwe.JWE(private.export_private().encode(), protected=json.dumps(
        {"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "cty": "jwk+json", "p2c": 100_000}))
    token.add_recipient(jwk.JWK.from_password(PASSWORD.decode()))
    back, _ = decrypt_private_jwk(token.serialize(compact=True), PASSWORD)
    assert public_jwk(back) == public_jwk(key)


def test_a_wrong_password_or_a_damaged_jwe_is_unauthorized() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = encrypt_private_jwk(key, PASSWORD, {})
    for password, text in [(b"wrong", token), (PASSWORD, token[:-4] + "AAAA"),
                           (PASSWORD, "not a jwe")]:
        with pytest.raises(WrongPassword, match="wrong password") as caught:
            decrypt_private_jwk(text, password)
        assert isinstance(caught.value, Unauthorized) and caught.value.status == 401
