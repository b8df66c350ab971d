import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.authority.claims import Claims
from appliance.authority.provisioners.jwk import JwkProvisioner
from appliance.authority.provisioners.jwk_keys import (
    decrypt_private_key,
    encrypt_private_key,
    generate_key,
    public_jwk,
    thumbprint,
)
from appliance.authority.provisioners.jwk_tokens import TokenSigner
from appliance.config import JwkProvisionerConfig
from appliance.errors import Unauthorized

AUD = "https://ca.test:9000/1.0/sign"
FP = "ab" * 32


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    k = generate_key("EC", "P-256")
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return k


@pytest.fixture(scope="module")
def provisioner(key: ec.EllipticCurvePrivateKey) -> JwkProvisioner:
    cfg = JwkProvisionerConfig(type="JWK", name="admin", key=public_jwk(key))
    return JwkProvisioner(cfg, Claims())


@pytest.fixture(scope="module")
def signer(key: ec.EllipticCurvePrivateKey) -> TokenSigner:
    return TokenSigner.for_key(key, "admin")


def test_kid_is_rfc7638_thumbprint(key: ec.EllipticCurvePrivateKey) -> None:
    pub = public_jwk(key)
    assert pub["kid"] == thumbprint(pub)
    assert pub["alg"] == "ES256" and "d" not in pub


def test_encrypted_key_round_trip_and_wrong_password(key: ec.EllipticCurvePrivateKey) -> None:
    jwe = encrypt_private_key(key, b"correct horse")
    assert jwe.count(".") == 4  # compact JWE
    back, kid = decrypt_private_key(jwe, b"correct horse")
    assert kid == public_jwk(key)["kid"]
    assert back.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    with pytest.raises(Unauthorized, match="wrong password"):
        decrypt_private_key(jwe, b"wrong")


def test_valid_token(provisioner: JwkProvisioner, signer: TokenSigner) -> None:
    token = signer.mint("a.test", AUD, sans=["a.test", "10.0.0.1"], root_fingerprint=FP)
    claims = provisioner.verify_token(token, [AUD], FP)
    assert (claims.subject, claims.sans, claims.provisioner) == (
        "a.test", ("a.test", "10.0.0.1"), "admin")
    assert len(claims.jti) == 64


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"now": time.time() - 3600}, "expired"),
    ({"now": time.time() + 600}, "not yet valid"),
    ({"audience": "https://evil.test/1.0/sign"}, "audience"),
    ({"lifetime": 7200}, "longer than the allowed hour"),
    ({"root_fingerprint": "cd" * 32}, "sha claim"),
])
def test_refused_tokens(provisioner: JwkProvisioner, signer: TokenSigner,
                        kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    args = {"audience": AUD, "root_fingerprint": FP, **kwargs}
    token = signer.mint("a.test", **args)
    with pytest.raises(Unauthorized, match=message):
        provisioner.verify_token(token, [AUD], FP)


def test_leeway_of_one_minute(provisioner: JwkProvisioner, signer: TokenSigner) -> None:
    token = signer.mint("a.test", AUD, now=time.time() - 330)  # expired 30 s ago
    provisioner.verify_token(token, [AUD], FP)


def test_other_key_and_algorithms_refused(provisioner: JwkProvisioner) -> None:
    other = TokenSigner.for_key(generate_key("EC", "P-256"), "admin")
    with pytest.raises(Unauthorized, match="signature is invalid"):
        provisioner.verify_token(other.mint("a.test", AUD), [AUD], FP)
    now = int(time.time())
    claims = {"iss": "admin", "sub": "a.test", "aud": AUD, "exp": now + 60, "nbf": now,
              "jti": "x" * 16}
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(Unauthorized, match="algorithm does not match the provisioner key"):
        provisioner.verify_token(unsigned, [AUD], FP)
    hmac = jwt.encode(claims, "secret-secret-secret-secret-secret", algorithm="HS256")
    with pytest.raises(Unauthorized, match="algorithm does not match the provisioner key"):
        provisioner.verify_token(hmac, [AUD], FP)


def test_missing_claims_refused(provisioner: JwkProvisioner, key: ec.EllipticCurvePrivateKey
                                ) -> None:
    now = int(time.time())
    token = jwt.encode({"iss": "admin", "aud": AUD, "exp": now + 60, "nbf": now,
                        "sub": "a.test"}, key, algorithm="ES256",
                       headers={"kid": provisioner.kid})
    with pytest.raises(Unauthorized, match="missing the 'jti' claim"):
        provisioner.verify_token(token, [AUD], FP)


def _token(key: ec.EllipticCurvePrivateKey, kid: str, headers: dict | None = None,  # type: ignore[type-arg]
           **claims: object) -> str:
    now = int(time.time())
    payload = {"iss": "admin", "sub": "a.test", "aud": AUD, "exp": now + 60, "nbf": now,
               "iat": now, "jti": "j" * 16, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid, **(headers or {})})


@pytest.mark.parametrize(("claims", "message"), [
    ({"iat": "123"}, "'iat' claim must be a number"),
    ({"nbf": True}, "'nbf' claim must be a number"),
    ({"exp": 1e400}, "payload is not JSON"),  # Infinity
    ({"aud": [AUD + "x", 5]}, "audience is not this CA"),
    ({"aud": {"a": AUD}}, "audience is not this CA"),
    ({"iss": "other"}, "issuer does not match"),
    ({"sub": 7}, "subject must be a non-empty string"),
    ({"jti": ["x" * 16]}, "jti must be a string"),
    ({"iat": int(time.time()) + 600}, "not yet valid"),
])
def test_claims_of_the_wrong_type_or_value_refused(
        provisioner: JwkProvisioner, key: ec.EllipticCurvePrivateKey,
        claims: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(Unauthorized, match=message):
        provisioner.verify_token(_token(key, provisioner.kid, **claims), [AUD], FP)


def test_audience_list_with_ours_accepted(provisioner: JwkProvisioner,
                                          key: ec.EllipticCurvePrivateKey) -> None:
    token = _token(key, provisioner.kid, aud=["https://other.test/1.0/sign", AUD])
    assert provisioner.verify_token(token, [AUD], FP).subject == "a.test"


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda t: t + ".extra", "malformed"),
    (lambda t: t.replace(".", "!", 1), "malformed"),
    (lambda t: "e30." + t.split(".", 1)[1], "algorithm does not match"),  # header {}
    (lambda t: t.rsplit(".", 1)[0] + ".AAAA", "signature is invalid"),  # wrong length
    (lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"), "signature is invalid"),
    (lambda t: "W10." + t.split(".", 1)[1], "malformed"),  # header is a JSON array
])
def test_mangled_tokens_refused(provisioner: JwkProvisioner, key: ec.EllipticCurvePrivateKey,
                                mangle: object, message: str) -> None:
    token = mangle(_token(key, provisioner.kid))  # type: ignore[operator]
    with pytest.raises(Unauthorized, match=message):
        provisioner.verify_token(token, [AUD], FP)


@pytest.mark.parametrize("headers", [{"crit": ["exp"]}, {"b64": False}])
def test_jws_header_extensions_refused(provisioner: JwkProvisioner,
                                       key: ec.EllipticCurvePrivateKey,
                                       headers: dict) -> None:  # type: ignore[type-arg]
    import base64
    import json
    header = base64.urlsafe_b64encode(json.dumps(
        {"alg": "ES256", "kid": provisioner.kid, **headers}).encode()).rstrip(b"=").decode()
    token = header + "." + _token(key, provisioner.kid).split(".", 1)[1]
    with pytest.raises(Unauthorized, match="header extensions"):
        provisioner.verify_token(token, [AUD], FP)


def test_duplicate_header_member_refused(provisioner: JwkProvisioner,
                                         key: ec.EllipticCurvePrivateKey) -> None:
    import base64
    raw = ('{"alg":"none","alg":"ES256","kid":"' + provisioner.kid + '"}').encode()
    header = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    token = header + "." + _token(key, provisioner.kid).split(".", 1)[1]
    with pytest.raises(Unauthorized, match="malformed"):
        provisioner.verify_token(token, [AUD], FP)
