"""ACME JWS layer and problem documents: what a client sees for good and bad request bodies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils

from appliance.acme import jws
from appliance.acme.jws import (
    SUPPORTED_ALGS,
    dns01_txt_value,
    key_authorization,
    parse,
    public_jwk,
    sign,
    sign_eab,
    thumbprint,
    verify,
    verify_external_account_binding,
    verify_key_change,
)
from appliance.acme.problems import DEFAULT_STATUS, AcmeProblem, from_appliance_error
from appliance.errors import (
    ApplianceError,
    BadCsr,
    BadRequest,
    ConfigError,
    NotFound,
    PolicyViolation,
    StorageError,
    Unauthorized,
)
from tests.support.rfc7638 import RFC7638_KEY, RFC7638_THUMBPRINT

NEW_ACCOUNT = "https://ca.test/acme/acme/new-account"
KEY_CHANGE = "https://ca.test/acme/acme/key-change"
ACCOUNT = "https://ca.test/acme/acme/account/evOfKhNU60wg"
NONCE = "K60BWPrMQG9SDxBDS_xtSw"



# -- keys and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "rsa1024": rsa.generate_private_key(65537, 1024),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p256b": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed25519b": ed25519.Ed25519PrivateKey.generate(),
    }


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def body(flattened: dict[str, Any]) -> bytes:
    return json.dumps(flattened).encode()


def raw(protected: dict[str, Any] | bytes, payload: bytes = b"{}",
        signature: bytes = b"\x01" * 64, **members: Any) -> bytes:
    """A flattened JWS body with any protected header; parse refuses it before any signature."""
    header = protected if isinstance(protected, bytes) else json.dumps(protected).encode()
    return body({"protected": b64(header), "payload": b64(payload), "signature": b64(signature),
                 **members})


def header(keys: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"alg": "ES256", "jwk": public_jwk(keys["p256"]), "nonce": NONCE,
                         "url": NEW_ACCOUNT}
    for name, value in overrides.items():
        if value is None:
            h.pop(name, None)
        else:
            h[name] = value
    return h


def refused(problem_type: str, fragment: str, action: Callable[[], object]) -> AcmeProblem:
    with pytest.raises(AcmeProblem) as caught:
        action()
    problem = caught.value
    assert problem.type == problem_type, f"expected {problem_type}, got {problem!r}"
    assert fragment in problem.detail, f"{fragment!r} is not in the detail {problem.detail!r}"
    assert problem.to_json()["type"] == "urn:ietf:params:acme:error:" + problem_type
    return problem


def mac_jws(key: bytes, protected: dict[str, Any], payload: bytes,
            digest: str = "sha256") -> dict[str, Any]:
    """An EAB MACed with hmac directly, to test headers the signing helper would not write."""
    p, q = b64(json.dumps(protected).encode()), b64(payload)
    mac = hmac.new(key, f"{p}.{q}".encode(), digest).digest()
    return {"protected": p, "payload": q, "signature": b64(mac)}


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "alg"), [("rsa", "RS256"), ("rsa", "PS256"), ("p256", "ES256"),
                                           ("p384", "ES384"), ("ed25519", "EdDSA")])
def test_round_trip_with_embedded_jwk(keys: dict[str, Any], name: str, alg: str) -> None:
    key = keys[name]
    payload = {"termsOfServiceAgreed": True, "contact": ["mailto:a@example.org"]}
    message = parse(body(sign(key, payload, url=NEW_ACCOUNT, nonce=NONCE, alg=alg)))
    assert (message.alg, message.nonce, message.url, message.kid) == (alg, NONCE, NEW_ACCOUNT,
                                                                      None)
    assert message.jwk == public_jwk(key) and not message.post_as_get
    assert message.payload_json() == payload
    verify(message, message.jwk)


@pytest.mark.parametrize("name", ["rsa", "p256", "p384", "ed25519"])
def test_round_trip_with_kid_and_stored_key(keys: dict[str, Any], name: str) -> None:
    key = keys[name]
    message = parse(body(sign(key, {"status": "deactivated"}, url=ACCOUNT, nonce=NONCE,
                              kid=ACCOUNT)))
    assert message.kid == ACCOUNT and message.jwk is None
    assert message.alg == jws.default_alg(key)
    verify(message, public_jwk(key))


def test_post_as_get_has_an_empty_payload(keys: dict[str, Any]) -> None:
    message = parse(body(sign(keys["p256"], None, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)))
    assert message.post_as_get and message.payload == b""
    verify(message, public_jwk(keys["p256"]))
    refused("malformed", "POST-as-GET", message.payload_json)
    empty_object = parse(body(sign(keys["p256"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)))
    assert not empty_object.post_as_get and empty_object.payload_json() == {}


# -- refusals of parse -----------------------------------------------------------------------
def test_oversized_body_is_413(keys: dict[str, Any]) -> None:
    signed = body(sign(keys["p256"], {"pad": "x" * 1000}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT))
    problem = refused("malformed", "larger than 512 bytes", lambda: parse(signed, max_bytes=512))
    assert problem.status == 413
    parse(signed)  # the default limit is 64 KiB


@pytest.mark.parametrize(("untrusted", "fragment"), [
    (b"\xff\xfe{}", "request body is not UTF-8"),
    (b"{\"protected\": ", "request body is not valid JSON"),
    (b"eyJhbGciOiJFUzI1NiJ9.e30.c2ln", "request body is not valid JSON"),  # compact form
    (b"[]", "flattened JWS JSON serialization, not an array"),
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (b'{"payload": "", "signatures": []}', "general JWS JSON serialization"),
    (b'{"protected": "e30", "payload": "", "signature": "AA"}', 'has no "alg"'),
    (b'{"protected": "e30", "payload": ""}', 'has no "signature" member'),
    (b'{"protected": "e30", "payload": "", "signature": "AA", "extra": 1}',
     'unexpected member(s) "extra"'),
    (b'{"protected": "e30", "payload": "", "signature": ""}', '"signature" is empty'),
    (b'{"protected": "e30=", "payload": "", "signature": "AA"}', 'no "=" padding'),
    (b'{"protected": "e30", "payload": "a+b/", "signature": "AA"}', '"payload" is not base64url'),
    (b'{"protected": "e31", "payload": "", "signature": "AA"}', "not canonical base64url"),
    (b'{"protected": 7, "payload": "", "signature": "AA"}', "must be a base64url string"),
])
def test_bodies_that_are_not_a_flattened_jws(untrusted: bytes, fragment: str) -> None:
    refused("malformed", fragment, lambda: parse(untrusted))


def test_unprotected_header_is_refused(keys: dict[str, Any]) -> None:
    signed = sign(keys["p256"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)
    signed["header"] = {"kid": ACCOUNT}
    refused("malformed", 'unprotected "header"', lambda: parse(body(signed)))


@pytest.mark.parametrize(("protected", "fragment"), [
    (b"[1]", "protected header must be a JSON object, not an array"),
    (b"\xc3\x28", "protected header is not UTF-8"),
    (b'{"alg": "ES256", "alg": "none"}', "duplicate member 'alg'"),
    (b'{"alg": NaN}', "NaN is not JSON"),
])
def test_protected_header_must_be_a_json_object(protected: bytes, fragment: str) -> None:
    refused("malformed", fragment, lambda: parse(raw(protected)))


@pytest.mark.parametrize(("overrides", "problem_type", "fragment"), [
    ({"b64": False}, "malformed", '"b64"'),
    ({"crit": ["b64"], "b64": False}, "malformed", '"b64"'),
    ({"crit": ["exp"], "exp": 1}, "malformed", '"crit"'),
    ({"alg": None}, "malformed", 'no "alg"'),
    ({"alg": 256}, "malformed", '"alg" must be a string'),
    ({"alg": "none"}, "badSignatureAlgorithm", 'alg "none" is not allowed'),
    ({"alg": "HS256"}, "badSignatureAlgorithm", "MAC algorithm"),
    ({"alg": "HS512"}, "badSignatureAlgorithm", "MAC algorithm"),
    ({"alg": "ES512"}, "badSignatureAlgorithm", 'alg "ES512" is not supported'),
    ({"alg": "RS384"}, "badSignatureAlgorithm", "not supported; use one of RS256, ES256"),
    ({"kid": ACCOUNT}, "malformed", 'both "jwk" and "kid"'),
    ({"jwk": None}, "malformed", 'neither "jwk" nor "kid"'),
    ({"nonce": None}, "badNonce", 'no "nonce"'),
    ({"nonce": "not+base64/url"}, "malformed", '"nonce" must be a non-empty base64url'),
    ({"nonce": ""}, "malformed", '"nonce" must be a non-empty base64url'),
    ({"nonce": 12}, "malformed", '"nonce" must be a non-empty base64url'),
    ({"url": None}, "malformed", 'no "url"'),
    ({"url": ["https://ca.test/"]}, "malformed", 'no "url"'),
    ({"jwk": None, "kid": 5}, "malformed", '"kid" must be the account URL'),
    ({"jwk": "key"}, "badPublicKey", "must be a JSON object"),
])
def test_protected_header_refusals(keys: dict[str, Any], overrides: dict[str, Any],
                                   problem_type: str, fragment: str) -> None:
    problem = refused(problem_type, fragment, lambda: parse(raw(header(keys, **overrides))))
    if problem_type == "badSignatureAlgorithm":
        assert problem.to_json()["algorithms"] == list(SUPPORTED_ALGS)
        assert problem.status == 400


def test_jwk_must_be_a_public_key_that_suits_alg(keys: dict[str, Any]) -> None:
    def jwk_refused(alg: str, jwk: dict[str, Any], fragment: str) -> None:
        refused("badPublicKey", fragment, lambda: parse(raw(header(keys, alg=alg, jwk=jwk))))

    p256 = public_jwk(keys["p256"])
    jwk_refused("ES256", {**p256, "d": b64(b"\x01" * 32)}, 'private key material ("d")')
    jwk_refused("ES256", {"kty": "oct", "k": b64(b"secret" * 6)}, 'private key material ("k")')
    jwk_refused("ES256", public_jwk(keys["rsa"]), "alg ES256 needs an EC P-256 key, but JWS jwk "
                                                  "has kty 'RSA'")
    jwk_refused("ES256", public_jwk(keys["p384"]), "has crv 'P-384'")
    jwk_refused("ES384", p256, "alg ES384 needs an EC P-384 key")
    jwk_refused("RS256", p256, "alg RS256 needs an RSA key")
    jwk_refused("EdDSA", {"kty": "OKP", "crv": "Ed448", "x": b64(b"\x01" * 57)},
                "has crv 'Ed448'")
    jwk_refused("EdDSA", public_jwk(keys["p256"]), "alg EdDSA needs an OKP Ed25519 key")
    jwk_refused("RS256", public_jwk(keys["rsa1024"]), "RSA key of 1024 bits; at least 2048")
    jwk_refused("ES256", {**p256, "y": p256["x"]}, "is not a valid EC P-256 public key")
    jwk_refused("ES256", {**p256, "x": b64(b"\x01" * 31)}, '"x" must be 32 bytes for P-256')
    jwk_refused("ES256", {"kty": "EC", "crv": "P-256", "x": p256["x"]}, 'has no "y" member')
    jwk_refused("EdDSA", {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"},
                '"x" must be 32 bytes for Ed25519')
    jwk_refused("RS256", {**public_jwk(keys["rsa"]), "e": b64(b"\x01" + b"\x00" * 32)},
                "RSA exponent of 2^256 or more")


@pytest.mark.parametrize(("payload", "fragment"), [
    (b"\xff", "JWS payload is not UTF-8"),
    (b"{", "JWS payload is not valid JSON"),
    (b"[]", "JWS payload must be a JSON object, not an array"),
    (b'{"a": 1, "a": 2}', "duplicate member 'a'"),
])
def test_payload_is_checked_when_read(keys: dict[str, Any], payload: bytes,
                                      fragment: str) -> None:
    message = parse(raw(header(keys), payload=payload))  # parsing alone accepts it
    refused("malformed", fragment, message.payload_json)


# -- refusals of verify ----------------------------------------------------------------------
def test_tampered_payload_fails_verification(keys: dict[str, Any]) -> None:
    signed = sign(keys["p256"], {"status": "valid"}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)
    signed["payload"] = b64(b'{"status":"deactivated"}')
    message = parse(body(signed))
    refused("malformed", "JWS signature is invalid", lambda: verify(message,
                                                                    public_jwk(keys["p256"])))


def test_tampered_protected_header_fails_verification(keys: dict[str, Any]) -> None:
    signed = sign(keys["ed25519"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)
    protected = json.loads(base64.urlsafe_b64decode(signed["protected"] + "=="))
    signed["protected"] = b64(json.dumps({**protected, "nonce": "b3RoZXI"}).encode())
    message = parse(body(signed))
    refused("malformed", "JWS signature is invalid",
            lambda: verify(message, public_jwk(keys["ed25519"])))


@pytest.mark.parametrize(("signer", "claimed"), [("p256b", "p256"), ("ed25519b", "ed25519")])
def test_signature_by_another_key_fails(keys: dict[str, Any], signer: str, claimed: str) -> None:
    forged = sign(keys[signer], {}, url=NEW_ACCOUNT, nonce=NONCE, jwk=public_jwk(keys[claimed]))
    message = parse(body(forged))
    refused("malformed", "JWS signature is invalid", lambda: verify(message, message.jwk or {}))


def test_der_ecdsa_signature_is_refused_with_a_hint(keys: dict[str, Any]) -> None:
    signed = sign(keys["p256"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)
    raw_sig = base64.urlsafe_b64decode(signed["signature"] + "==")
    r, s = int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big")
    signed["signature"] = b64(utils.encode_dss_signature(r, s))
    message = parse(body(signed))
    refused("malformed", "not DER", lambda: verify(message, public_jwk(keys["p256"])))


def test_account_key_that_does_not_suit_alg(keys: dict[str, Any]) -> None:
    message = parse(body(sign(keys["p256"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT)))
    problem = refused("badSignatureAlgorithm", "does not suit the account key",
                      lambda: verify(message, public_jwk(keys["rsa"])))
    assert problem.algorithms == ["RS256", "PS256"]
    refused("badSignatureAlgorithm", "use ES384",
            lambda: verify(message, public_jwk(keys["p384"])))


# -- thumbprints and challenge values --------------------------------------------------------
def test_thumbprint_is_the_rfc7638_example_value() -> None:
    assert thumbprint(RFC7638_KEY) == RFC7638_THUMBPRINT
    bare = {name: RFC7638_KEY[name] for name in ("kty", "n", "e")}
    assert thumbprint(bare) == RFC7638_THUMBPRINT  # optional members do not count


@pytest.mark.parametrize("name", ["p256", "p384", "ed25519"])
def test_thumbprint_hashes_the_required_members_in_order(keys: dict[str, Any],
                                                         name: str) -> None:
    jwk = public_jwk(keys[name])
    canonical = json.dumps(dict(sorted(jwk.items())), separators=(",", ":")).encode()
    assert thumbprint({**jwk, "kid": "ignored", "use": "sig"}) == b64(
        hashlib.sha256(canonical).digest())


def test_thumbprint_of_a_key_it_cannot_read() -> None:
    refused("badPublicKey", "kty 'oct'", lambda: thumbprint({"kty": "oct", "k": "AAAA"}))
    refused("badPublicKey", "incomplete EC key", lambda: thumbprint({"kty": "EC", "crv": "P-256"}))


def test_key_authorization_and_dns01_value() -> None:
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    key_auth = key_authorization(token, RFC7638_KEY)
    assert key_auth == f"{token}.{RFC7638_THUMBPRINT}"
    txt = dns01_txt_value(key_auth)
    assert txt == b64(hashlib.sha256(key_auth.encode()).digest())
    assert len(txt) == 43 and "=" not in txt


def test_public_jwk_of_a_public_key_matches_the_private_one(keys: dict[str, Any]) -> None:
    for name in ("rsa", "p256", "ed25519"):
        assert public_jwk(keys[name].public_key()) == public_jwk(keys[name])
    assert set(public_jwk(keys["p256"])) == {"kty", "crv", "x", "y"}


# -- external account binding ----------------------------------------------------------------
EAB_KID = "kid-1"
EAB_KEY = b"\x5a" * 32
EAB_LONG_KEY = b"\xa5" * 64


def eab_keys(kid: str) -> bytes | None:
    return {EAB_KID: EAB_KEY, "long": EAB_LONG_KEY}.get(kid)


def test_eab_in_a_new_account_request(keys: dict[str, Any]) -> None:
    account_jwk = public_jwk(keys["p256"])
    payload = {"termsOfServiceAgreed": True,
               "externalAccountBinding": sign_eab(EAB_KEY, EAB_KID, account_jwk, NEW_ACCOUNT)}
    message = parse(body(sign(keys["p256"], payload, url=NEW_ACCOUNT, nonce=NONCE)))
    verify(message, message.jwk or {})
    eab = message.payload_json()["externalAccountBinding"]
    assert verify_external_account_binding(eab, account_jwk, message.url, eab_keys) == EAB_KID


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_eab_with_longer_macs(keys: dict[str, Any], alg: str) -> None:
    jwk = public_jwk(keys["ed25519"])
    eab = sign_eab(EAB_LONG_KEY, "long", jwk, NEW_ACCOUNT, alg=alg)
    assert verify_external_account_binding(eab, jwk, NEW_ACCOUNT, eab_keys) == "long"


def test_eab_made_by_another_implementation_verifies(keys: dict[str, Any]) -> None:
    jwk = public_jwk(keys["p256"])
    eab = mac_jws(EAB_KEY, {"alg": "HS256", "kid": EAB_KID, "url": NEW_ACCOUNT},
                  json.dumps(jwk).encode())
    assert verify_external_account_binding(eab, jwk, NEW_ACCOUNT, eab_keys) == EAB_KID


def test_eab_refusals(keys: dict[str, Any]) -> None:
    jwk = public_jwk(keys["p256"])
    good_header = {"alg": "HS256", "kid": EAB_KID, "url": NEW_ACCOUNT}
    payload = json.dumps(jwk).encode()

    def eab_refused(problem_type: str, fragment: str, eab: Any) -> None:
        refused(problem_type, fragment,
                lambda: verify_external_account_binding(eab, jwk, NEW_ACCOUNT, eab_keys))

    eab_refused("unauthorized", "externalAccountBinding MAC is invalid",
                sign_eab(b"\x00" * 32, EAB_KID, jwk, NEW_ACCOUNT))
    eab_refused("unauthorized", "is not the newAccount URL",
                sign_eab(EAB_KEY, EAB_KID, jwk, "https://ca.test/acme/other/new-account"))
    eab_refused("unauthorized", "payload is not the account key of this request",
                sign_eab(EAB_KEY, EAB_KID, public_jwk(keys["p256b"]), NEW_ACCOUNT))
    eab_refused("unauthorized", "unknown external account key 'nobody'",
                sign_eab(EAB_KEY, "nobody", jwk, NEW_ACCOUNT))
    eab_refused("malformed", 'must not have a "nonce"',
                mac_jws(EAB_KEY, {**good_header, "nonce": NONCE}, payload))
    eab_refused("malformed", "'RS256' is not a MAC algorithm",
                mac_jws(EAB_KEY, {**good_header, "alg": "RS256"}, payload))
    eab_refused("malformed", 'needs "kid"', mac_jws(EAB_KEY, {"alg": "HS256",
                                                              "url": NEW_ACCOUNT}, payload))
    eab_refused("malformed", 'not carry a "jwk"',
                mac_jws(EAB_KEY, {**good_header, "jwk": jwk}, payload))
    eab_refused("malformed", "needs a MAC key of at least 512 bits, and this external account "
                             "key is shorter; use HS256",
                mac_jws(EAB_KEY, {**good_header, "alg": "HS512"}, payload, "sha512"))
    eab_refused("malformed", "externalAccountBinding payload is not valid JSON",
                mac_jws(EAB_KEY, good_header, b"not json"))
    eab_refused("malformed", "externalAccountBinding must be a JSON object", "a.b.c")
    eab_refused("malformed", 'externalAccountBinding has an unprotected "header"',
                {**sign_eab(EAB_KEY, EAB_KID, jwk, NEW_ACCOUNT), "header": {}})


# -- key rollover ----------------------------------------------------------------------------
def key_change_body(old: Any, new: Any, *, inner_payload: dict[str, Any] | None = None,
                    **inner_options: Any) -> bytes:
    change = inner_payload or {"account": ACCOUNT, "oldKey": public_jwk(old)}
    options: dict[str, Any] = {"url": KEY_CHANGE, "nonce": None, **inner_options}
    inner = sign(new, change, **options)
    return body(sign(old, inner, url=KEY_CHANGE, nonce=NONCE, kid=ACCOUNT))


@pytest.mark.parametrize(("old", "new"), [("p256", "rsa"), ("rsa", "ed25519"),
                                          ("ed25519", "p384")])
def test_key_change_success(keys: dict[str, Any], old: str, new: str) -> None:
    old_jwk = public_jwk(keys[old])
    outer = parse(key_change_body(keys[old], keys[new]))
    verify(outer, old_jwk)
    assert verify_key_change(outer.payload_json(), outer, ACCOUNT, old_jwk) == public_jwk(
        keys[new])


def test_key_change_compares_the_old_key_by_thumbprint(keys: dict[str, Any]) -> None:
    old_jwk = public_jwk(keys["p256"])
    decorated = {"account": ACCOUNT, "oldKey": {**old_jwk, "kid": "OLD key", "use": "sig"}}
    outer = parse(key_change_body(keys["p256"], keys["p384"], inner_payload=decorated))
    assert verify_key_change(outer.payload_json(), outer, ACCOUNT, old_jwk) == public_jwk(
        keys["p384"])


@pytest.mark.parametrize(("case", "problem_type", "fragment"), [
    ("nonce", "malformed", 'inner JWS must not have a "nonce"'),
    ("kid", "malformed", 'not name a "kid"'),
    ("url", "malformed", "differs from the outer JWS url"),
    ("forged", "malformed", "inner JWS signature is invalid"),
    ("account", "malformed", "is not the account that signed the request"),
    ("old_key", "malformed", '"oldKey" is not the current key of the account'),
    ("no_old_key", "malformed", 'no "oldKey"'),
    ("same_key", "malformed", "new key is the same as the current account key"),
    ("weak_key", "badPublicKey", "RSA key of 1024 bits"),
    ("mac", "badSignatureAlgorithm", "MAC algorithm"),
    ("not_jws", "malformed", 'inner JWS has no "signature" member'),
])
def test_key_change_refusals(keys: dict[str, Any], case: str, problem_type: str,
                             fragment: str) -> None:
    old, new = keys["p256"], keys["ed25519"]
    change = {"account": ACCOUNT, "oldKey": public_jwk(old)}
    inner: Any
    if case == "nonce":
        inner = sign(new, change, url=KEY_CHANGE, nonce=NONCE)
    elif case == "kid":
        inner = sign(new, change, url=KEY_CHANGE, nonce=None, kid=ACCOUNT)
    elif case == "url":
        inner = sign(new, change, url=NEW_ACCOUNT, nonce=None)
    elif case == "forged":
        inner = sign(keys["ed25519b"], change, url=KEY_CHANGE, nonce=None, jwk=public_jwk(new))
    elif case == "account":
        inner = sign(new, {**change, "account": ACCOUNT + "x"}, url=KEY_CHANGE, nonce=None)
    elif case == "old_key":
        inner = sign(new, {**change, "oldKey": public_jwk(keys["p256b"])}, url=KEY_CHANGE,
                     nonce=None)
    elif case == "no_old_key":
        inner = sign(new, {"account": ACCOUNT}, url=KEY_CHANGE, nonce=None)
    elif case == "same_key":
        inner = sign(old, change, url=KEY_CHANGE, nonce=None)
    elif case == "weak_key":
        inner = sign(keys["rsa1024"], change, url=KEY_CHANGE, nonce=None)
    elif case == "mac":
        inner = mac_jws(EAB_KEY, {"alg": "HS256", "jwk": public_jwk(new), "url": KEY_CHANGE},
                        json.dumps(change).encode())
    else:
        inner = {"protected": "e30", "payload": "e30"}
    outer = parse(body(sign(old, inner, url=KEY_CHANGE, nonce=NONCE, kid=ACCOUNT)))
    verify(outer, public_jwk(old))
    refused(problem_type, fragment,
            lambda: verify_key_change(outer.payload_json(), outer, ACCOUNT, public_jwk(old)))


def test_key_change_inner_must_be_a_flattened_jws_object(keys: dict[str, Any]) -> None:
    outer = parse(key_change_body(keys["p256"], keys["ed25519"]))
    refused("malformed", "inner JWS must be a JSON object in the flattened JWS JSON serialization",
            lambda: verify_key_change("a.b.c", outer, ACCOUNT, public_jwk(keys["p256"])))


# -- signing helpers -------------------------------------------------------------------------
def test_sign_refuses_kid_and_jwk_together(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="kid or jwk"):
        sign(keys["p256"], {}, url=ACCOUNT, nonce=NONCE, kid=ACCOUNT,
             jwk=public_jwk(keys["p256"]))


def test_default_alg_has_no_answer_for_p521(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no supported JWS alg"):
        jws.default_alg(keys["p521"])


# -- problem documents -----------------------------------------------------------------------
CONSTRUCTORS: dict[str, Callable[[str], AcmeProblem]] = {
    "accountDoesNotExist": AcmeProblem.account_does_not_exist,
    "alreadyRevoked": AcmeProblem.already_revoked,
    "badCSR": AcmeProblem.bad_csr,
    "badNonce": AcmeProblem.bad_nonce,
    "badPublicKey": AcmeProblem.bad_public_key,
    "badRevocationReason": AcmeProblem.bad_revocation_reason,
    "badSignatureAlgorithm": lambda d: AcmeProblem.bad_signature_algorithm(d, ["ES256"]),
    "caa": AcmeProblem.caa,
    "compound": lambda d: AcmeProblem.compound(d, []),
    "connection": AcmeProblem.connection,
    "dns": AcmeProblem.dns,
    "externalAccountRequired": AcmeProblem.external_account_required,
    "incorrectResponse": AcmeProblem.incorrect_response,
    "invalidContact": AcmeProblem.invalid_contact,
    "malformed": AcmeProblem.malformed,
    "orderNotReady": AcmeProblem.order_not_ready,
    "rateLimited": AcmeProblem.rate_limited,
    "rejectedIdentifier": AcmeProblem.rejected_identifier,
    "serverInternal": AcmeProblem.server_internal,
    "tls": AcmeProblem.tls,
    "unauthorized": AcmeProblem.unauthorized,
    "unsupportedContact": AcmeProblem.unsupported_contact,
    "unsupportedIdentifier": AcmeProblem.unsupported_identifier,
    "userActionRequired": lambda d: AcmeProblem.user_action_required(d, "https://ca.test/tos"),
}
EXPECTED_STATUS = {"caa": 403, "incorrectResponse": 403, "orderNotReady": 403,
                   "rateLimited": 429, "serverInternal": 500, "unauthorized": 403,
                   "userActionRequired": 403}


@pytest.mark.parametrize("problem_type", sorted(CONSTRUCTORS))
def test_every_rfc8555_type_has_a_constructor_and_status(problem_type: str) -> None:
    problem = CONSTRUCTORS[problem_type]("what went wrong")
    assert problem.type == problem_type
    assert problem.status == EXPECTED_STATUS.get(problem_type, 400)
    document = problem.to_json()
    assert document["type"] == f"urn:ietf:params:acme:error:{problem_type}"
    assert (document["detail"], document["status"]) == ("what went wrong", problem.status)
    assert str(problem) == "what went wrong"


def test_constructors_cover_the_registry() -> None:
    assert set(CONSTRUCTORS) == set(DEFAULT_STATUS)


def test_problem_document_optional_members() -> None:
    rejected = AcmeProblem.rejected_identifier('this CA will not issue for "example.net"',
                                               identifier={"type": "dns",
                                                           "value": "example.net"})
    top = AcmeProblem.malformed("some identifiers were rejected", status=403,
                                subproblems=[rejected, {"type": "urn:x", "detail": "d"}])
    assert top.to_json() == {
        "type": "urn:ietf:params:acme:error:malformed",
        "detail": "some identifiers were rejected",
        "status": 403,
        "subproblems": [{"type": "urn:ietf:params:acme:error:rejectedIdentifier",
                         "detail": 'this CA will not issue for "example.net"', "status": 400,
                         "identifier": {"type": "dns", "value": "example.net"}},
                        {"type": "urn:x", "detail": "d"}],
    }
    tos = AcmeProblem.user_action_required("terms of service have changed",
                                           "https://ca.test/acme/agreement?t=1")
    assert tos.to_json()["instance"] == "https://ca.test/acme/agreement?t=1"
    assert set(AcmeProblem.malformed("x").to_json()) == {"type", "detail", "status"}


def test_problem_refuses_unknown_types_and_statuses() -> None:
    with pytest.raises(ValueError, match="not an RFC 8555 problem type"):
        AcmeProblem("badSignature", "the RFC has no such type")
    with pytest.raises(ValueError, match="4xx or 5xx"):
        AcmeProblem.malformed("x", status=200)


@pytest.mark.parametrize(("error", "problem_type", "status"), [
    (BadRequest("csr is missing"), "malformed", 400),
    (BadCsr("csr signature is invalid"), "badCSR", 400),
    (Unauthorized("the account is deactivated"), "unauthorized", 401),
    (PolicyViolation("name example.net is not allowed"), "rejectedIdentifier", 403),
    (NotFound("no such order"), "malformed", 404),
])
def test_client_errors_keep_their_message(error: ApplianceError, problem_type: str,
                                          status: int) -> None:
    problem = from_appliance_error(error)
    assert (problem.type, problem.status, problem.detail) == (problem_type, status,
                                                              error.message)


@pytest.mark.parametrize(("error", "status", "detail"), [
    (StorageError("sqlite3.OperationalError: database /var/lib/appliance/db locked"), 503,
     "temporarily unavailable"),
    (ConfigError("issuer PIN file /etc/appliance/pin has mode 0644"), 500,
     "internal server error"),
    (ApplianceError("CKR_DEVICE_ERROR from C_Sign"), 500, "internal server error"),
])
def test_server_errors_become_server_internal_without_internals(
        error: ApplianceError, status: int, detail: str) -> None:
    problem = from_appliance_error(error)
    assert (problem.type, problem.status) == ("serverInternal", status)
    assert detail in problem.detail
    rendered = json.dumps(problem.to_json())
    for secret in ("/var/lib", "sqlite3", "/etc/appliance", "PIN", "CKR_", "C_Sign"):
        assert secret not in rendered, f"{secret!r} leaked into {rendered}"
