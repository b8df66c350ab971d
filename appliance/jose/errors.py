"""The errors of the JOSE layer; each message is written for the requester.

A malformed JOSE object is a 400 (`JoseError`, ACME's `malformed`); a JWT presented as a
credential (one-time token, x5c renewal token) that is malformed or does not verify is a 401
(`InvalidToken`), as step-ca answers.
"""

from __future__ import annotations

from appliance.errors import BadRequest, Unauthorized


class JoseError(BadRequest):
    """A JOSE object (base64url text, JSON, JWS, JWK, JWE) is malformed or does not verify."""


class BadJwk(JoseError):
    """A JWK is not a usable public key for the algorithm (ACME `badPublicKey`)."""

    acme_type = "badPublicKey"


class UnsupportedAlgorithm(JoseError):
    """A JWS names an algorithm that is refused here or does not suit the key."""

    acme_type = "badSignatureAlgorithm"

    def __init__(self, message: str, algorithms: tuple[str, ...]) -> None:
        super().__init__(message)
        self.algorithms = algorithms


class InvalidToken(Unauthorized):
    """A compact JWT presented as a credential is malformed or does not verify."""


def clip(text: str, limit: int = 80) -> str:
    """Requester text echoed in a message, cut short so an error stays small."""
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(names: list[str]) -> str:
    """Member names for a message: "a", "b"."""
    return ", ".join(f"\"{clip(name)}\"" for name in names)
