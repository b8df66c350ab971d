"""Provisioner keys: generation, the public JWK with its RFC 7638 kid, the encrypted private key.

The private key is stored as the password-encrypted JWE step uses (appliance.jose.jwe), so
`applianctl token` can fetch it from /provisioners/{kid}/encrypted-key and decrypt it locally.
The server never decrypts it.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from appliance.errors import BadRequest, ConfigError
from appliance.jose import jwa, jwe, jwk
from appliance.jose.jwk import thumbprint

__all__ = ["decrypt_private_key", "encrypt_private_key", "generate_key", "jwk_alg",
           "public_jwk", "thumbprint"]


def jwk_alg(public_jwk: dict[str, Any]) -> str:
    """The one signature algorithm a provisioner key may use (its preferred one)."""
    algs = jwa.algs_for(public_jwk.get("kty"), public_jwk.get("crv"))
    if not algs or algs[0] == "ES512":  # step-ca's JWK provisioners sign with P-256/P-384
        raise ConfigError(f"unsupported provisioner key {public_jwk.get('kty')} "
                          f"{public_jwk.get('crv')}")
    return algs[0]


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


def _key_members(public: dict[str, Any]) -> dict[str, Any]:
    return {"kid": thumbprint(public), "use": "sig", "alg": jwk_alg(public)}


def public_jwk(key: PrivateKeyTypes) -> dict[str, Any]:
    """Public JWK with `kid` = RFC 7638 thumbprint, `use` sig and `alg`."""
    public = jwk.public_jwk(key)
    return {**public, **_key_members(public)}


def encrypt_private_key(key: PrivateKeyTypes, password: bytes) -> str:
    """Compact JWE of the private JWK under a password."""
    return jwe.encrypt_private_jwk(key, password, _key_members(jwk.public_jwk(key)))


def decrypt_private_key(encrypted: str, password: bytes) -> tuple[PrivateKeyTypes, str]:
    """Decrypt a provisioner key; return (private key, kid). Wrong password -> Unauthorized."""
    key, members = jwe.decrypt_private_jwk(encrypted, password)
    return key, str(members.get("kid") or thumbprint(jwk.public_jwk(key)))
