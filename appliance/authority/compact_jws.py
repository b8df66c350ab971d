"""Signed JWTs in compact form, read once and checked with cryptography directly.

One-time tokens arrive with every /sign and /revoke request. PyJWT spends most of its time on
the token in Python (a per-character base64url check, three parses of the same token when it is
first routed and then verified); here the token is split and decoded once, its header routes it,
and its signature is checked by cryptography over the exact bytes that were signed.

Only the algorithms a provisioner key can have are known (ES256, ES384, RS256, EdDSA); `none`,
HMAC and anything else are refused before a key is looked at. Detached payloads (`b64: false`)
and critical header extensions are refused: no token this CA accepts uses them.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from appliance import strict_json
from appliance.errors import Unauthorized
from appliance.jws_signature import signature_is_valid

_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # alg none: no signature
TOKEN_ALGS = frozenset({"ES256", "ES384", "RS256", "EdDSA"})  # the algs a provisioner key has
MALFORMED = "token is malformed: expected a signed JWT"


@dataclass(frozen=True)
class CompactJws:
    """A token split and decoded, not yet verified: `untrusted_*` until its signature is."""

    untrusted_header: dict[str, Any]
    untrusted_payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.untrusted_header.get("alg"))

    @property
    def kid(self) -> str:
        return str(self.untrusted_header.get("kid"))


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def parse(untrusted_token: str) -> CompactJws:
    """Split and decode a compact JWS; Unauthorized when it is not one."""
    if not isinstance(untrusted_token, str) or not _COMPACT.fullmatch(untrusted_token):
        raise Unauthorized(MALFORMED)
    header_b64, payload_b64, signature_b64 = untrusted_token.split(".")
    try:
        header = strict_json.loads(_b64url(header_b64).decode("utf-8"))
        payload = _b64url(payload_b64)
        signature = _b64url(signature_b64)
    except (ValueError, binascii.Error, RecursionError):
        raise Unauthorized(MALFORMED) from None
    if not isinstance(header, dict):
        raise Unauthorized(MALFORMED)
    if "crit" in header or header.get("b64", True) is not True:
        raise Unauthorized("token uses JWS header extensions (crit, b64) this CA does not "
                           "accept")
    return CompactJws(header, payload, f"{header_b64}.{payload_b64}".encode("ascii"),
                      signature)


def verify(token: CompactJws, key: PublicKeyTypes, alg: str) -> dict[str, Any]:
    """Check the signature with `key` under `alg` (the key's one algorithm); return the claims.

    Unauthorized when the header names another algorithm, the signature does not verify or the
    payload is not a JSON object.
    """
    if token.alg != alg:
        raise Unauthorized(f"token algorithm does not match the provisioner key ({alg})")
    if alg not in TOKEN_ALGS or not signature_is_valid(key, alg, token.signature,
                                                       token.signing_input):
        raise Unauthorized("token signature is invalid")
    try:
        claims = strict_json.loads(token.untrusted_payload.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Unauthorized("token is invalid: its payload is not JSON") from None
    if not isinstance(claims, dict):
        raise Unauthorized("token is invalid: its payload is not a JSON object")
    return claims


def claim_time(claims: dict[str, Any], name: str) -> int:
    """A NumericDate claim as whole seconds; Unauthorized when it is not a number."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"token is invalid: the {name!r} claim must be a number")
    try:
        return int(value)
    except (OverflowError, ValueError):
        raise Unauthorized(f"token is invalid: the {name!r} claim must be a number") from None

