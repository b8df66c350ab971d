"""Renew, rekey and revoke: who may act on an existing certificate, and how.

A certificate is accepted as a credential only if it is the very one this CA recorded
(same DER in the database): OpenSSL's chain check in the TLS handshake, or the issuer signature
check for x5c tokens, is defence in depth, not the authority.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.errors import BadRequest, Unauthorized
from appliance.jose import jwa
from appliance.jose import jws as jose_jws
from appliance.storage import TokenUse

RENEW_TOKEN_MAX_BYTES = 16384
LEEWAY = 60


@dataclass(frozen=True)
class RevokeRequest:
    """The body of POST /revoke, type-checked but not yet trusted."""

    serial: int
    untrusted_ott: str | None
    reason_code: int
    reason: str

    @classmethod
    def from_json(cls, body: Any) -> RevokeRequest:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        raw_serial = body.get("serial")
        if not isinstance(raw_serial, str | int) or isinstance(raw_serial, bool):
            raise BadRequest("missing serial: give the serial number in decimal or 0x hex")
        ott = body.get("ott")
        if ott is not None and not isinstance(ott, str):
            raise BadRequest("ott must be a string")
        code = body.get("reasonCode", 0)
        if not isinstance(code, int) or isinstance(code, bool) or code not in (
                0, 1, 2, 3, 4, 5, 6, 8, 9, 10):
            raise BadRequest("reasonCode must be an RFC 5280 reason code (0-6, 8-10)")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 1024:
            raise BadRequest("reason must be a string of at most 1024 characters")
        if body.get("passive", True) is not True:
            raise BadRequest("only passive revocation (CRL) is supported; set passive to true")
        return cls(parse_serial(str(raw_serial)), ott or None, code, reason)


def parse_serial(untrusted: str) -> int:
    """A serial number in decimal, or hex with a 0x prefix (colons allowed)."""
    text = untrusted.strip().lower()
    try:
        if text.startswith("0x"):
            value = int(text[2:].replace(":", ""), 16)
        else:
            value = int(text, 10)
    except ValueError:
        raise BadRequest(f"serial {untrusted[:80]!r} is neither decimal nor 0x hex") from None
    if value <= 0 or value.bit_length() > 160:
        raise BadRequest("serial must be a positive number of at most 160 bits")
    return value


def verify_renew_token(untrusted_bearer: str, audiences: list[str], now: float
                       ) -> tuple[x509.Certificate, TokenUse]:
    """An x5c token: a JWT signed by the certificate's own key, carrying the certificate.

    The token's time checks are the token's own; the certificate may have expired (whether that
    is allowed is the provisioner's allowRenewalAfterExpiry claim, checked by the caller).
    """
    if len(untrusted_bearer) > RENEW_TOKEN_MAX_BYTES:
        raise BadRequest("renewal token is too large")
    token = jose_jws.parse_compact(untrusted_bearer, "renewal token")
    chain = token.untrusted_header.get("x5c")
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise Unauthorized("renewal token has no x5c certificate chain")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
    except ValueError:
        raise Unauthorized("renewal token x5c does not hold a certificate") from None
    cert_key = cert.public_key()
    algs = jwa.algs_for_key(cert_key)
    if not algs:
        raise Unauthorized("the certificate's key type cannot sign a renewal token")
    if token.alg not in algs:
        raise Unauthorized(f"renewal token algorithm {token.untrusted_header.get('alg')!r} does "
                           "not match the certificate key")
    if not token.signed_by(cert_key):
        raise Unauthorized("renewal token signature does not match the certificate")
    claims = token.claims()
    exp = jose_jws.check_claims(claims, audiences=audiences, now=now, leeway=LEEWAY,
                                max_lifetime=3600, required=("exp", "aud", "jti"),
                                what="renewal token")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
        raise Unauthorized("renewal token jti must be a string of 8 to 256 characters")
    expires = datetime.fromtimestamp(exp, UTC)
    return cert, TokenUse("x5c-renew", jti, expires)


def mint_renew_token(cert: x509.Certificate, key: Any, audience: str, lifetime: int = 300,
                     now: float | None = None) -> str:
    """What `applianctl renew` sends when mTLS is not possible (e.g. the certificate expired)."""
    import secrets
    import time

    now = time.time() if now is None else now
    return jose_jws.sign_compact(
        {"aud": audience, "sub": cert.subject.rfc4514_string(), "iat": int(now),
         "nbf": int(now), "exp": int(now) + lifetime, "jti": secrets.token_hex(16),
         "iss": "applianctl"},
        key, jwa.alg_for_key(cert.public_key()),
        {"x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
         "typ": "JWT"})
