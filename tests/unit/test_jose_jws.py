"""Compact and flattened JWS in appliance.jose: what verifies, what is refused and why."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from appliance.errors import Unauthorized
from appliance.jose import jwa
from appliance.jose.base64url import b64url_decode, b64url_encode
from appliance.jose.errors import InvalidToken, JoseError, UnsupportedAlgorithm
from appliance.jose.jws import (
    check_claims,
    mac_flattened,
    parse_compact,
    parse_flattened,
    sign_compact,
    sign_flattened,
    verify_compact,
)

CLAIMS = {"sub": "a.test", "aud": "https://ca.test/1.0/sign", "jti": "j" * 16}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"ES256": ec.generate_private_key(ec.SECP256R1()),
            "ES384": ec.generate_private_key(ec.SECP384R1()),
            "ES512": ec.generate_private_key(ec.SECP521R1()),
            "RS256": rsa.generate_private_key(65537, 2048),
            "EdDSA": ed25519.Ed25519PrivateKey.generate()}


def segments(token: str) -> list[str]:
    return token.split(".")


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "EdDSA"])
def test_compact_round_trip_and_interop_with_pyjwt(keys: dict[str, Any], alg: str) -> None:
    key = keys[alg]
    ours = sign_compact(CLAIMS, key, alg, {"kid": "k1", "typ": "JWT"})
    assert jwt.decode(ours, key.public_key(), algorithms=[alg],
                      audience=CLAIMS["aud"]) == CLAIMS
    theirs = jwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": "k1"})
    for token in (ours, theirs):
        parsed = parse_compact(token)
        assert (parsed.alg, parsed.kid) == (alg, "k1")
        assert verify_compact(parsed, key.public_key(), alg) == CLAIMS


def test_tampered_compact_tokens_do_not_verify(keys: dict[str, Any]) -> None:
    key = keys["ES256"]
    header, payload, signature = segments(sign_compact(CLAIMS, key, "ES256", {}))
    other = b64url_encode(json.dumps({**CLAIMS, "sub": "evil.test"}).encode())
    flipped = bytearray(b64url_decode(signature))
    flipped[5] ^= 1
    for token in (f"{header}.{other}.{signature}",
                  f"{header}.{payload}.{b64url_encode(bytes(flipped))}"):
        with pytest.raises(InvalidToken, match="token signature is invalid"):
            verify_compact(parse_compact(token), key.public_key(), "ES256")
    another = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidToken, match="signature is invalid"):
        verify_compact(parse_compact(sign_compact(CLAIMS, another, "ES256", {})),
                       key.public_key(), "ES256")


def test_the_algorithm_must_be_the_keys(keys: dict[str, Any]) -> None:
    token = parse_compact(sign_compact(CLAIMS, keys["ES256"], "ES256", {}))
    with pytest.raises(InvalidToken, match=r"algorithm does not match the provisioner key \(ES384"):
        verify_compact(token, keys["ES256"].public_key(), "ES384")
    # ES384 needs P-384: a P-256 key cannot verify (or make) an ES384 signature.
    assert not jwa.signature_is_valid(keys["ES256"].public_key(), "ES384", token.signature,
                                      token.signing_input)
    with pytest.raises(UnsupportedAlgorithm):
        sign_compact(CLAIMS, keys["ES256"], "ES384", {})
    # An RSA key under an EC alg the header claims: refused, whatever the header says.
    rs = parse_compact(sign_compact(CLAIMS, keys["RS256"], "RS256", {}))
    with pytest.raises(InvalidToken, match="algorithm does not match"):
        verify_compact(rs, keys["ES256"].public_key(), "ES256")


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_none_and_hmac_never_verify(keys: dict[str, Any], alg: str) -> None:
    public = keys["RS256"].public_key()
    if alg == "none":
        token = jwt.encode(CLAIMS, None, algorithm="none")
    else:
        # The HMAC key is the RSA public key's PEM: the classic key-confusion attack.
        token = f"{b64url_encode(json.dumps({'alg': alg}).encode())}." \
                f"{b64url_encode(json.dumps(CLAIMS).encode())}.{b64url_encode(b'x' * 32)}"
    parsed = parse_compact(token)
    assert not parsed.signed_by(public)
    with pytest.raises(InvalidToken):
        verify_compact(parsed, public, alg)  # even a caller that asks for it
    assert not jwa.signature_is_valid(public, alg, parsed.signature, parsed.signing_input)


@pytest.mark.parametrize("token", [
    "", "a.b", "a.b.c.d", "e30.e30.AA==", "e30!.e30.AA", "W10.e30.AA",  # header an array
    "eyJhbGciOiJFUzI1NiIsImFsZyI6Im5vbmUifQ.e30.AA",  # duplicate "alg"
    "e31.e30.AA",  # non-canonical base64url
])
def test_malformed_compact_tokens(token: str) -> None:
    with pytest.raises(InvalidToken, match="token is malformed: expected a signed JWT"):
        parse_compact(token)
    with pytest.raises(Unauthorized, match="renewal token is malformed"):
        parse_compact(token, "renewal token")


@pytest.mark.parametrize("extra", [{"crit": ["exp"]}, {"b64": False}])
def test_header_extensions_are_refused(keys: dict[str, Any], extra: dict[str, Any]) -> None:
    token = sign_compact(CLAIMS, keys["ES256"], "ES256", extra)
    with pytest.raises(InvalidToken, match="header extensions"):
        parse_compact(token)


def test_check_claims_times_audience_lifetime() -> None:
    now = 1_700_000_000
    good = {**CLAIMS, "nbf": now, "iat": now, "exp": now + 300}
    options: dict[str, Any] = {"audiences": [CLAIMS["aud"]], "now": now, "leeway": 60,
                               "max_lifetime": 3600, "required": ("exp", "aud", "jti")}
    assert check_claims(good, **options) == now + 300
    assert check_claims({**good, "aud": [CLAIMS["aud"], "x"]}, **options) == now + 300
    for claims, message in [
        ({**good, "exp": now - 61}, "token has expired"),
        ({**good, "nbf": now + 61}, "not yet valid"),
        ({**good, "iat": now + 61}, "not yet valid"),
        ({**good, "aud": "https://other/1.0/sign"}, "audience is not this CA"),
        ({**good, "exp": now + 3661 + 1}, "longer than the allowed hour"),
        ({**good, "exp": "soon"}, "'exp' claim must be a number"),
        ({**good, "nbf": True}, "'nbf' claim must be a number"),
        ({k: v for k, v in good.items() if k != "jti"}, "missing the 'jti' claim"),
    ]:
        with pytest.raises(InvalidToken, match=message):
            check_claims(claims, **options)


# -- flattened --------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "EdDSA"])
def test_flattened_round_trip_and_interop_with_jwcrypto(keys: dict[str, Any], alg: str) -> None:
    key = keys[alg]
    header = {"alg": alg, "nonce": "bm9uY2U", "url": "https://ca.test/acme/new-order"}
    ours = sign_flattened(key, header, b'{"a":1}')
    theirs = JWS(b'{"a":1}')
    theirs.add_signature(JWK.from_pyca(key), alg=None, protected=json.dumps(header))
    theirs_flat = json.loads(theirs.serialize(compact=False))
    check = JWS()
    check.deserialize(json.dumps(ours))
    check.verify(JWK.from_pyca(key.public_key()), alg=alg)  # jwcrypto accepts ours
    for flattened in (ours, theirs_flat):
        parsed = parse_flattened(flattened)
        assert parsed.protected == header and parsed.payload == b'{"a":1}'
        assert parsed.signed_by(key.public_key(), alg)
        assert not parsed.signed_by(key.public_key(), "HS256")


def test_flattened_tampering_and_refusals(keys: dict[str, Any]) -> None:
    key = keys["ES256"]
    good = sign_flattened(key, {"alg": "ES256"}, b"{}")
    tampered = parse_flattened({**good, "payload": b64url_encode(b'{"x":1}')})
    assert not tampered.signed_by(key.public_key(), "ES256")
    for untrusted, message in [
        ([], "JWS must be a JSON object in the flattened JWS JSON serialization, not an array"),
        ({**good, "header": {}}, 'unprotected "header"'),
        ({**good, "signatures": []}, "general JWS JSON serialization"),
        ({"protected": good["protected"], "payload": ""}, 'has no "signature" member'),
        ({**good, "signature": ""}, '"signature" is empty'),
        ({**good, "payload": "e30="}, 'JWS "payload" is not base64url'),
        ({**good, "protected": b64url_encode(b'{"alg":"ES256","crit":["x"]}')}, '"crit"'),
    ]:
        with pytest.raises(JoseError, match=message):
            parse_flattened(untrusted)


def test_mac_is_only_the_named_eab_check() -> None:
    mac_key = b"k" * 32
    macked = parse_flattened(mac_flattened(mac_key, {"alg": "HS256", "kid": "x"}, b"{}"))
    assert macked.mac_is_valid("HS256", mac_key)
    assert not macked.mac_is_valid("HS256", b"j" * 32)
    assert not macked.mac_is_valid("HS384", mac_key)
    assert not macked.mac_is_valid("none", mac_key)
