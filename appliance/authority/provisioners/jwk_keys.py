"""Provisioner keys: JWK generation, RFC 7638 kids, and the password-encrypted private key (JWE).

The private key is stored as a compact JWE (PBES2-HS256+A128KW, A256GCM), the form step uses,
so `applianctl token` can fetch it from /provisioners/{kid}/encrypted-key and decrypt it locally.
The server never decrypts it.
"""

from __future__ import annotations

import json
from typing import Any

import jwcrypto.jwa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwcrypto import jwe, jwk
from jwcrypto.common import JWException

from appliance.errors import BadRequest, ConfigError, Unauthorized

# PBKDF2-HMAC-SHA256 iterations for new keys (OWASP's figure); jwcrypto caps decryption at
# 16384 by default, so the cap is raised for the one place that decrypts our own keys.
PBES2_ITERATIONS = 600_000
jwcrypto.jwa.default_max_pbkdf2_iterations = max(
    jwcrypto.jwa.default_max_pbkdf2_iterations, 1_000_000)

ALG_FOR = {("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384", ("OKP", "Ed25519"): "EdDSA"}


def jwk_alg(public_jwk: dict[str, Any]) -> str:
    """The one signature algorithm a provisioner key may use."""
    kty = public_jwk.get("kty")
    if kty == "RSA":
        return "RS256"
    alg = ALG_FOR.get((str(kty), str(public_jwk.get("crv"))))
    if alg is None:
        raise ConfigError(f"unsupported provisioner key {kty} {public_jwk.get('crv')}")
    return alg


def generate_key(kty: str = "EC", curve: str = "P-256", size: int = 2048) -> PrivateKeyTypes:
    if kty == "EC":
        curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
        if curve not in curves:
            raise BadRequest(f"unsupported curve {curve}; use P-256 or P-384")
        return ec.generate_private_key(curves[curve])
    if kty == "RSA":
        if size < 2048:
            raise BadRequest("RSA keys must have at least 2048 bits")
        return rsa.generate_private_key(65537, size)
    if kty == "OKP":
        return ed25519.Ed25519PrivateKey.generate()
    raise BadRequest(f"unsupported key type {kty}; use EC, RSA or OKP")


def _to_jwk(key: PrivateKeyTypes) -> jwk.JWK:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return jwk.JWK.from_pem(pem)


def public_jwk(key: PrivateKeyTypes) -> dict[str, Any]:
    """Public JWK with `kid` = RFC 7638 thumbprint, `use` sig and `alg`."""
    k = _to_jwk(key)
    data: dict[str, Any] = json.loads(k.export_public())
    data["kid"] = k.thumbprint()
    data["use"] = "sig"
    data["alg"] = jwk_alg(data)
    return data


def thumbprint(public: dict[str, Any]) -> str:
    clean = {k: v for k, v in public.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    return str(jwk.JWK(**clean).thumbprint())


def encrypt_private_key(key: PrivateKeyTypes, password: bytes) -> str:
    """Compact JWE of the private JWK under a password."""
    k = _to_jwk(key)
    payload = json.loads(k.export_private())
    payload["kid"] = k.thumbprint()
    payload["use"] = "sig"
    payload["alg"] = jwk_alg(payload)
    header = {"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "cty": "jwk+json",
              "p2c": PBES2_ITERATIONS}
    token = jwe.JWE(json.dumps(payload).encode(), protected=json.dumps(header))
    token.add_recipient(jwk.JWK.from_password(password.decode("utf-8")))
    return str(token.serialize(compact=True))


def decrypt_private_key(encrypted: str, password: bytes) -> tuple[PrivateKeyTypes, str]:
    """Decrypt a provisioner key; return (private key, kid). Wrong password -> Unauthorized."""
    try:
        token = jwe.JWE()
        token.deserialize(encrypted.strip(), key=jwk.JWK.from_password(password.decode("utf-8")))
        data = json.loads(token.payload)
    except (JWException, ValueError, UnicodeDecodeError):
        raise Unauthorized("cannot decrypt the provisioner key: wrong password?") from None
    k = jwk.JWK(**data)
    priv = serialization.load_pem_private_key(k.export_to_pem(private_key=True, password=None),
                                              password=None)
    return priv, str(data.get("kid") or k.thumbprint())
