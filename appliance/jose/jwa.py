"""RFC 7518 signature algorithms: which key each suits, and the signature check itself.

This is the only JWS signature verifier in the appliance (one-time tokens, x5c renewal tokens,
ACME requests). It is written over cryptography rather than taken from a JOSE library because
it is the /sign hot path: a library re-parses the token and checks base64url per character in
Python, and costs about a third more per token (measured, see the commit that made it).

Signatures are checked over the exact bytes the client sent. ECDSA signatures arrive as the raw
r || s of RFC 7518 section 3.4 and must be exactly twice the curve's size; cryptography wants
DER. The algorithm must suit the key: ES256 needs a P-256 key, ES384 P-384, ES512 P-521, RS256
and PS256 an RSA key, EdDSA an Ed25519 key. `none`, HMAC and anything else never verify.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from appliance.jose.errors import UnsupportedAlgorithm

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# alg -> the JWK (kty, crv) it needs; crv None: any RSA key. The order is the order of
# preference: the first alg that suits a key is the one it signs with by default.
KEY_FOR_ALG: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"), "EdDSA": ("OKP", "Ed25519"), "PS256": ("RSA", None),
}
SIGNATURE_ALGS: tuple[str, ...] = tuple(KEY_FOR_ALG)
# alg -> (curve, signature algorithm, bytes of r and of s). The algorithm objects are
# immutable and made once: building them per token is measurable on the /sign path.
_ECDSA = {
    "ES256": (ec.SECP256R1, ec.ECDSA(hashes.SHA256()), 32),
    "ES384": (ec.SECP384R1, ec.ECDSA(hashes.SHA384()), 48),
    "ES512": (ec.SECP521R1, ec.ECDSA(hashes.SHA512()), 66),
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_PSS = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def key_type(key: PublicKeyTypes | PrivateKeyTypes) -> tuple[str, str | None]:
    """The JWK (kty, crv) of a cryptography key, public or private; crv None for RSA."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RSA", None
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "OKP", "Ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "EC", _CURVE_NAMES.get(key.curve.name, key.curve.name)
    return type(key).__name__, None


def algs_for(kty: object, crv: object = None) -> tuple[str, ...]:
    """The algs a key of this JWK kty (and crv) can sign with, preferred first."""
    return tuple(alg for alg, (want_kty, want_crv) in KEY_FOR_ALG.items()
                 if kty == want_kty and (want_crv is None or crv == want_crv))


def algs_for_key(key: PublicKeyTypes | PrivateKeyTypes) -> tuple[str, ...]:
    """The algs a cryptography key can sign with, preferred first (empty: none)."""
    return algs_for(*key_type(key))


def alg_for_key(key: PublicKeyTypes | PrivateKeyTypes) -> str:
    """The alg a key signs with by default: RS256, ES256, ES384, ES512 or EdDSA."""
    algs = algs_for_key(key)
    if not algs:
        raise UnsupportedAlgorithm(f"no supported JWS alg for {type(key).__name__}", ())
    return algs[0]


def signature_size(alg: str, key: PublicKeyTypes) -> int | None:
    """How many bytes an `alg` signature by `key` has (None when alg does not suit key)."""
    if alg in _ECDSA:
        return 2 * _ECDSA[alg][2]
    if alg == "EdDSA":
        return 64
    if alg in ("RS256", "PS256") and isinstance(key, rsa.RSAPublicKey):
        return (key.key_size + 7) // 8
    return None


def signature_is_valid(key: PublicKeyTypes, alg: str, signature: bytes,
                       signing_input: bytes) -> bool:
    """True when `signature` is `alg`'s signature of `signing_input` by `key`; never raises."""
    try:
        if alg in _ECDSA:
            curve, ecdsa, half = _ECDSA[alg]
            if (not isinstance(key, ec.EllipticCurvePublicKey)
                    or not isinstance(key.curve, curve) or len(signature) != 2 * half):
                return False
            der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                       int.from_bytes(signature[half:], "big"))
            key.verify(der, signing_input, ecdsa)
        elif alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, _PKCS1, _SHA256)
        elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, _PSS, _SHA256)
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def sign(key: PrivateKeyTypes, alg: str, signing_input: bytes) -> bytes:
    """`alg`'s signature of `signing_input` by `key` (ECDSA as raw r || s)."""
    if alg not in algs_for_key(key):
        raise UnsupportedAlgorithm(f"alg {alg} does not suit a {type(key).__name__}",
                                   algs_for_key(key))
    if alg in _ECDSA and isinstance(key, ec.EllipticCurvePrivateKey):
        _, ecdsa, half = _ECDSA[alg]
        r, s = decode_dss_signature(key.sign(signing_input, ecdsa))
        return r.to_bytes(half, "big") + s.to_bytes(half, "big")
    if alg == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, _PKCS1, _SHA256)
    if alg == "PS256" and isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, _PSS, _SHA256)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(signing_input)
    raise UnsupportedAlgorithm(f"alg {alg} does not suit a {type(key).__name__}", ())
