"""JWS (RFC 7515) in compact form (JWTs) and in the flattened JSON form (ACME), over strict JSON.

Both forms are decoded once, strictly (canonical base64url, UTF-8, no duplicate JSON members,
no NaN), and checked over the exact bytes that were signed with the one verifier in jwa.py.
Detached payloads (`b64: false`) and critical header extensions are refused: nothing this CA
accepts uses them. Which algorithms a caller allows, and which key it checks against, is the
caller's choice: `none` and HMAC never verify a signature here; the only MAC check is the
explicitly named one for ACME's external account binding.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from appliance import strict_json
from appliance.jose import jwa
from appliance.jose.base64url import b64url_decode, b64url_encode
from appliance.jose.errors import InvalidToken, JoseError, quoted

_FLATTENED_MEMBERS = ("protected", "payload", "signature")
MAC_ALGS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


# -- strict JSON -----------------------------------------------------------------------------
def json_value(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate member names (parsers disagree on them), no NaN.

    JoseError naming `what` when the bytes are not such JSON.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JoseError(f"{what} is not UTF-8") from None
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as e:
        raise JoseError(f"{what} is not valid JSON: {e.msg} at position {e.pos}") from None
    except RecursionError:
        raise JoseError(f"{what} is not valid JSON: it is nested too deeply") from None
    except ValueError as e:
        raise JoseError(f"{what} is not valid JSON: {e}") from None


def json_kind(value: object) -> str:
    """What a JSON value is, for a message: 'an object', 'an array', ..."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "a value")


def json_bytes(value: Mapping[str, Any]) -> bytes:
    """Compact JSON, as signed."""
    return json.dumps(value, separators=(",", ":")).encode()


# -- compact JWS (JWTs) ----------------------------------------------------------------------
@dataclass(frozen=True)
class CompactJws:
    """A compact JWS split and decoded, not yet verified: `untrusted_*` until its signature is."""

    untrusted_header: dict[str, Any]
    untrusted_payload: bytes
    signing_input: bytes
    signature: bytes
    what: str = "token"

    @property
    def alg(self) -> str:
        return str(self.untrusted_header.get("alg"))

    @property
    def kid(self) -> str:
        return str(self.untrusted_header.get("kid"))

    def signed_by(self, key: PublicKeyTypes) -> bool:
        """True when the signature is the header alg's signature by `key`."""
        return jwa.signature_is_valid(key, self.alg, self.signature, self.signing_input)

    def claims(self) -> dict[str, Any]:
        """The payload as a JSON object (call it once the signature is checked)."""
        try:
            claims = strict_json.loads(self.untrusted_payload.decode("utf-8"))
        except (ValueError, RecursionError):
            raise InvalidToken(f"{self.what} is invalid: its payload is not JSON") from None
        if not isinstance(claims, dict):
            raise InvalidToken(f"{self.what} is invalid: its payload is not a JSON object")
        return claims


def parse_compact(untrusted_token: str, what: str = "token") -> CompactJws:
    """Split and decode a compact JWS; InvalidToken (401) when it is not one."""
    malformed = f"{what} is malformed: expected a signed JWT"
    if not isinstance(untrusted_token, str):
        raise InvalidToken(malformed)
    segments = untrusted_token.split(".")
    # Each segment's alphabet is checked as it is decoded; the signature is empty for alg none.
    if len(segments) != 3 or not segments[0] or not segments[1]:
        raise InvalidToken(malformed)
    header_b64, payload_b64, signature_b64 = segments
    try:
        header = json_value(b64url_decode(header_b64), "header")
        payload = b64url_decode(payload_b64)
        signature = b64url_decode(signature_b64)
    except JoseError:
        raise InvalidToken(malformed) from None
    if not isinstance(header, dict):
        raise InvalidToken(malformed)
    if "crit" in header or header.get("b64", True) is not True:
        raise InvalidToken(f"{what} uses JWS header extensions (crit, b64) this CA does not "
                           "accept")
    return CompactJws(header, payload, f"{header_b64}.{payload_b64}".encode("ascii"),
                      signature, what)


def verify_compact(token: CompactJws, key: PublicKeyTypes, alg: str) -> dict[str, Any]:
    """Check the signature with `key` under `alg` (the key's one algorithm); return the claims.

    InvalidToken when the header names another algorithm, the signature does not verify or the
    payload is not a JSON object.
    """
    if token.alg != alg:
        raise InvalidToken(f"{token.what} algorithm does not match the provisioner key ({alg})")
    if not token.signed_by(key):
        raise InvalidToken(f"{token.what} signature is invalid")
    return token.claims()


def sign_compact(claims: Mapping[str, Any], key: PrivateKeyTypes, alg: str,
                 header: Mapping[str, Any]) -> str:
    """A compact JWS of `claims` signed by `key` under `alg`, with `header` besides alg."""
    signing_input = (f"{b64url_encode(json_bytes({'alg': alg, **header}))}."
                     f"{b64url_encode(json_bytes(claims))}")
    signature = jwa.sign(key, alg, signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(signature)}"


# -- JWT claims (RFC 7519 section 4.1) -------------------------------------------------------
def claim_time(claims: Mapping[str, Any], name: str, what: str = "token") -> int:
    """A NumericDate claim as whole seconds; InvalidToken when it is not a number."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{what} is invalid: the {name!r} claim must be a number")
    try:
        return int(value)
    except (OverflowError, ValueError):
        raise InvalidToken(f"{what} is invalid: the {name!r} claim must be a number") from None


def check_claims(claims: Mapping[str, Any], *, audiences: Collection[str], now: float,
                 leeway: int, max_lifetime: int, required: tuple[str, ...],
                 what: str = "token") -> int:
    """Check a JWT's required claims, times (with leeway), audience and lifetime.

    Returns `exp`. A token without nbf and iat counts its lifetime from `now`.
    """
    for name in required:
        if claims.get(name) is None:
            raise InvalidToken(f"{what} is missing the {name!r} claim")
    for name in ("iat", "nbf"):
        if name in claims and claim_time(claims, name, what) > now + leeway:
            raise InvalidToken(f"{what} is not yet valid (nbf or iat is in the future)")
    exp = claim_time(claims, "exp", what)
    if exp <= now - leeway:
        raise InvalidToken(f"{what} has expired")
    token_audiences = claims["aud"]
    if isinstance(token_audiences, str):
        token_audiences = [token_audiences]
    if not isinstance(token_audiences, list) or not any(
            isinstance(a, str) and a in audiences for a in token_audiences):
        raise InvalidToken(f"{what} audience is not this CA; expected one of "
                           f"{list(audiences)[:2]}")
    start = claim_time(claims, "nbf", what) if "nbf" in claims else (
        claim_time(claims, "iat", what) if "iat" in claims else now)
    if exp - start > max_lifetime + leeway:
        raise InvalidToken(f"{what} lifetime is longer than the allowed hour"
                           if max_lifetime == 3600 else
                           f"{what} lifetime is longer than {max_lifetime} seconds")
    return exp


# -- flattened JWS JSON serialization (ACME) -------------------------------------------------
@dataclass(frozen=True)
class FlattenedJws:
    """A flattened JWS object decoded, not yet verified."""

    protected: dict[str, Any]
    payload: bytes
    signature: bytes
    protected_b64: str = field(repr=False)
    payload_b64: str = field(repr=False)
    signature_b64: str = field(repr=False)

    @property
    def signing_input(self) -> bytes:
        return f"{self.protected_b64}.{self.payload_b64}".encode("ascii")

    def signed_by(self, key: PublicKeyTypes, alg: str) -> bool:
        """True when the signature is `alg`'s signature by `key` (never for none or HMAC)."""
        return jwa.signature_is_valid(key, alg, self.signature, self.signing_input)

    def mac_is_valid(self, alg: str, mac_key: bytes) -> bool:
        """True when the signature is the `alg` (HS256/384/512) MAC under `mac_key`.

        Only for ACME's external account binding, which RFC 8555 section 7.3.4 makes a MAC.
        """
        digest = MAC_ALGS.get(alg)
        return digest is not None and hmac.compare_digest(
            hmac.new(mac_key, self.signing_input, digest).digest(), self.signature)


def parse_flattened(untrusted: object, what: str = "JWS") -> FlattenedJws:
    """Decode a flattened JWS object whose members are exactly protected, payload, signature."""
    if not isinstance(untrusted, dict):
        _malformed(f"{what} must be a JSON object in the flattened JWS JSON serialization, "
                   f"not {json_kind(untrusted)}")
    if "signatures" in untrusted:
        _malformed(f"{what} uses the general JWS JSON serialization (\"signatures\"); "
                   "only the flattened serialization with one signature is accepted")
    if "header" in untrusted:
        _malformed(f"{what} has an unprotected \"header\"; every header parameter must be in "
                   "\"protected\"")
    missing = [m for m in _FLATTENED_MEMBERS if m not in untrusted]
    if missing:
        _malformed(f"{what} has no {quoted(missing)} member")
    extra = sorted(set(untrusted) - set(_FLATTENED_MEMBERS))
    if extra:
        _malformed(f"{what} has unexpected member(s) {quoted(extra)}; only \"protected\", "
                   "\"payload\" and \"signature\" are allowed")
    protected_b64, payload_b64, signature_b64 = (untrusted[m] for m in _FLATTENED_MEMBERS)
    protected_raw = b64url_decode(protected_b64, f"{what} \"protected\"")
    payload = b64url_decode(payload_b64, f"{what} \"payload\"")
    signature = b64url_decode(signature_b64, f"{what} \"signature\"")
    if not signature:
        _malformed(f"{what} \"signature\" is empty")
    header = json_value(protected_raw, f"{what} protected header")
    if not isinstance(header, dict):
        _malformed(f"{what} protected header must be a JSON object, not {json_kind(header)}")
    if "b64" in header:
        # RFC 7797 unencoded payloads are refused by RFC 8555 section 6.2; "b64" needs "crit".
        _malformed(f"{what} protected header has \"b64\"; the unencoded payload option "
                   "(RFC 7797) is not allowed")
    if "crit" in header:
        _malformed(f"{what} protected header has \"crit\"; no critical extensions are supported")
    return FlattenedJws(header, payload, signature, protected_b64, payload_b64, signature_b64)


def sign_flattened(key: PrivateKeyTypes, header: Mapping[str, Any],
                   payload: bytes) -> dict[str, Any]:
    """A flattened JWS of `payload` signed by `key` under the alg `header` names."""
    protected_b64, payload_b64 = b64url_encode(json_bytes(header)), b64url_encode(payload)
    signature = jwa.sign(key, str(header["alg"]), f"{protected_b64}.{payload_b64}".encode())
    return {"protected": protected_b64, "payload": payload_b64,
            "signature": b64url_encode(signature)}


def mac_flattened(mac_key: bytes, header: Mapping[str, Any], payload: bytes) -> dict[str, Any]:
    """A flattened JWS MACed under `mac_key` (ACME external account binding only)."""
    digest = MAC_ALGS[str(header["alg"])]
    protected_b64, payload_b64 = b64url_encode(json_bytes(header)), b64url_encode(payload)
    mac = hmac.new(mac_key, f"{protected_b64}.{payload_b64}".encode(), digest).digest()
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url_encode(mac)}


def _malformed(message: str) -> NoReturn:
    raise JoseError(message)
