"""Minting JWK one-time tokens, the client's side of the JWK provisioner (`applianctl token`).

Kept apart from the provisioner's verification so that the client commands import neither the
ca.json schema nor the template engine (`applianctl token` starts in a fraction of a second).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from appliance.authority.provisioners.jwk_keys import public_jwk
from appliance.jose import jws as jose_jws

DEFAULT_TOKEN_LIFETIME = 300


@dataclass(frozen=True)
class TokenSigner:
    """Mints one-time tokens with a decrypted provisioner key, as `applianctl token` does."""

    key: PrivateKeyTypes
    kid: str
    alg: str
    issuer: str

    @classmethod
    def for_key(cls, key: PrivateKeyTypes, issuer: str) -> TokenSigner:
        public = public_jwk(key)
        return cls(key=key, kid=public["kid"], alg=public["alg"], issuer=issuer)

    def mint(
        self,
        subject: str,
        audience: str,
        *,
        sans: list[str] | None = None,
        root_fingerprint: str | None = None,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        now: float | None = None,
    ) -> str:
        now = time.time() if now is None else now
        payload: dict[str, Any] = {
            "iss": self.issuer, "sub": subject, "aud": audience, "nbf": int(now),
            "iat": int(now), "exp": int(now) + lifetime, "jti": secrets.token_hex(32),
            "sans": sans if sans is not None else [subject],
        }
        if root_fingerprint:
            payload["sha"] = root_fingerprint
        return jose_jws.sign_compact(payload, self.key, self.alg, {"kid": self.kid, "typ": "JWT"})
