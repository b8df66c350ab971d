"""Public JWKs (RFC 7517, 7518 section 6, RFC 8037) <-> cryptography keys, RFC 7638 thumbprints.

Written over cryptography's key numbers rather than through jwcrypto: the member encodings are
a few lines each, they sit on the verification path (an ACME account key is read here), and
jwcrypto costs 50 ms to import, which every `applianctl` start would pay. The unit tests check
the results against jwcrypto. Private JWKs exist only inside the provisioner-key JWE (jwe.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from appliance.jose.base64url import b64url_decode, b64url_encode
from appliance.jose.errors import BadJwk, clip, quoted
from appliance.jose.jwa import KEY_FOR_ALG, PublicKey, key_type

# RFC 7638 section 3.2: the members a thumbprint covers, which are also all a public key needs.
PUBLIC_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
COORDINATE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66, "Ed25519": 32}
# NIST SP 800-89 bounds e from above; a huge exponent would make each verification costly.
_MAX_RSA_EXPONENT = 2**256


def public_jwk(key: PublicKeyTypes | PrivateKeyTypes) -> dict[str, Any]:
    """The public JWK of a key (private or public), with only the RFC 7638 members, sorted."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"e": _uint(numbers.e), "kty": "RSA", "n": _uint(numbers.n)}
    if isinstance(public, ec.EllipticCurvePublicKey):
        crv = key_type(public)[1]
        if crv not in _CURVES:
            raise BadJwk(f"no JWK form for the curve {public.curve.name}")
        size = COORDINATE_BYTES[crv]
        point = public.public_numbers()
        return {"crv": crv, "kty": "EC", "x": b64url_encode(point.x.to_bytes(size, "big")),
                "y": b64url_encode(point.y.to_bytes(size, "big"))}
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
    raise BadJwk(f"no JWK form for {type(key).__name__}")


def _uint(value: int) -> str:
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_key(untrusted_jwk: object, alg: str, what: str = "JWK", *,
               rsa_bits: tuple[int, int] | None = None) -> PublicKey:
    """The cryptography key of a public JWK that suits `alg`; BadJwk saying what is wrong.

    `rsa_bits` (least, most) bounds the size of an RSA key; None leaves it to the caller.
    """
    if not isinstance(untrusted_jwk, dict):
        raise BadJwk(f"{what} must be a JSON object")
    private = [m for m in PRIVATE_MEMBERS if m in untrusted_jwk]
    if private:
        raise BadJwk(f"{what} holds private key material ({quoted(private)}); send only the "
                     "public key")
    kty, crv = untrusted_jwk.get("kty"), untrusted_jwk.get("crv")
    want_kty, want_crv = KEY_FOR_ALG[alg]
    wanted = f"an {want_kty} {want_crv} key" if want_crv else f"an {want_kty} key"
    if kty != want_kty:
        raise BadJwk(f"alg {alg} needs {wanted}, but {what} has kty {clip(repr(kty))}")
    if want_crv is not None and crv != want_crv:
        raise BadJwk(f"alg {alg} needs {wanted}, but {what} has crv {clip(repr(crv))}")
    members: dict[str, str] = {}
    for name in PUBLIC_MEMBERS[want_kty]:
        value = untrusted_jwk.get(name)
        if not isinstance(value, str) or not value:
            raise BadJwk(f"{what} has no \"{name}\" member (a non-empty string)")
        members[name] = value
    values = {name: b64url_decode(members[name], f"{what} \"{name}\"", BadJwk)
              for name in members if name not in ("kty", "crv")}
    if want_crv is not None:
        for name in ("x", "y"):
            if name in values and len(values[name]) != COORDINATE_BYTES[want_crv]:
                raise BadJwk(f"{what} \"{name}\" must be {COORDINATE_BYTES[want_crv]} bytes for "
                             f"{want_crv}, not {len(values[name])}")
    try:
        if want_kty == "RSA":
            n, e = (int.from_bytes(values[m], "big") for m in ("n", "e"))
            bits = n.bit_length()
            if rsa_bits is not None and bits < rsa_bits[0]:
                raise BadJwk(f"{what} is an RSA key of {bits} bits; at least {rsa_bits[0]} "
                             "are required")
            if rsa_bits is not None and bits > rsa_bits[1]:
                raise BadJwk(f"{what} is an RSA key of {bits} bits; at most {rsa_bits[1]} are "
                             "allowed")
            if e >= _MAX_RSA_EXPONENT:
                raise BadJwk(f"{what} has an RSA exponent of 2^256 or more")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if want_kty == "EC":
            # cryptography refuses a point that is not on the curve (an invalid-curve attack).
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(values["x"], "big"), int.from_bytes(values["y"], "big"),
                _CURVES[str(want_crv)]()).public_key()
        return ed25519.Ed25519PublicKey.from_public_bytes(values["x"])
    except (ValueError, TypeError):
        raise BadJwk(f"{what} is not a valid {want_kty}{' ' + want_crv if want_crv else ''} "
                     "public key") from None


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    kty = jwk.get("kty")
    if kty not in PUBLIC_MEMBERS:
        raise BadJwk(f"cannot take the thumbprint of a key with kty {clip(repr(kty))}")
    names = PUBLIC_MEMBERS[str(kty)]
    values = tuple(jwk.get(name) for name in names)
    if not all(isinstance(value, str) and value for value in values):
        raise BadJwk(f"cannot take the thumbprint of an incomplete {kty} key")
    return _thumbprint(names, values)


@functools.lru_cache(maxsize=4096)
def _thumbprint(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    # Cached: an ACME account's thumbprint is taken for every challenge it validates.
    # RFC 7638 section 3.3: the required members in lexicographic order, no whitespace.
    canonical = json.dumps(dict(zip(names, values, strict=True)), separators=(",", ":"),
                           sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())
