"""The provisioner-key JWE: a private JWK encrypted under a password, as step-ca stores it.

Compact JWE, PBES2-HS256+A128KW key wrapping and A256GCM content encryption, `cty` jwk+json:
the form `step` reads, so `applianctl token` can fetch the key from
/provisioners/{kid}/encrypted-key and decrypt it locally. The server never decrypts it.
jwcrypto does the cryptography; it is imported on first use because it costs 50 ms to load
and most `applianctl` commands never touch a provisioner key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from appliance.errors import Unauthorized

# PBKDF2-HMAC-SHA256 iterations for new keys (OWASP's figure). jwcrypto refuses to decrypt
# more than 16384 by default, so its cap is raised to what our own keys use.
PBES2_ITERATIONS = 600_000
MAX_PBES2_ITERATIONS = 1_000_000
HEADER = {"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "cty": "jwk+json"}


class WrongPassword(Unauthorized):
    """The JWE does not decrypt under this password (or is not a JWE at all)."""


def _jwcrypto() -> Any:
    import jwcrypto.jwa
    from jwcrypto import jwe, jwk

    jwcrypto.jwa.default_max_pbkdf2_iterations = max(
        jwcrypto.jwa.default_max_pbkdf2_iterations, MAX_PBES2_ITERATIONS)
    return jwe, jwk


def encrypt_private_jwk(key: PrivateKeyTypes, password: bytes,
                        members: Mapping[str, Any]) -> str:
    """Compact JWE of the private JWK of `key`, with `members` (kid, use, alg) added."""
    jwe, jwk = _jwcrypto()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    payload = json.loads(jwk.JWK.from_pem(pem).export_private())
    payload.update(members)
    token = jwe.JWE(json.dumps(payload).encode(),
                    protected=json.dumps({**HEADER, "p2c": PBES2_ITERATIONS}))
    token.add_recipient(jwk.JWK.from_password(password.decode("utf-8")))
    return str(token.serialize(compact=True))


def decrypt_private_jwk(encrypted: str, password: bytes) -> tuple[PrivateKeyTypes, dict[str, Any]]:
    """Decrypt a private-key JWE; return the key and the JWK's members. WrongPassword if not."""
    jwe, jwk = _jwcrypto()
    from jwcrypto.common import JWException

    try:
        token = jwe.JWE()
        token.deserialize(encrypted.strip(), key=jwk.JWK.from_password(password.decode("utf-8")))
        members = json.loads(token.payload)
        pem = jwk.JWK(**members).export_to_pem(private_key=True, password=None)
    except (JWException, ValueError, TypeError, UnicodeDecodeError):
        raise WrongPassword("cannot decrypt the provisioner key: wrong password?") from None
    if not isinstance(members, dict):
        raise WrongPassword("cannot decrypt the provisioner key: wrong password?")
    return serialization.load_pem_private_key(pem, password=None), members
