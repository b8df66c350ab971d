import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.authority.claims import Claims
from appliance.authority.provisioners.jwk import JwkProvisioner, TokenSigner
from appliance.authority.provisioners.jwk_keys import (
    decrypt_private_key,
    encrypt_private_key,
    generate_key,
    public_jwk,
    thumbprint,
)
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
