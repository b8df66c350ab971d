"""The RFC 7518 signature check shared by one-time tokens (compact JWTs) and ACME (flattened JWS).

Both verify over the exact base64url bytes the client sent. ECDSA signatures arrive as the raw
r || s of RFC 7518 section 3.4 and must be exactly twice the curve's size; cryptography wants
DER. The algorithm must suit the key: ES256 needs a P-256 key, ES384 a P-384 key, RS256 and
PS256 an RSA key, EdDSA an Ed25519 key. Anything else does not verify.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

# alg -> (curve, hash, bytes of r and of s)
_ECDSA = {
    "ES256": (ec.SECP256R1, hashes.SHA256, 32),
    "ES384": (ec.SECP384R1, hashes.SHA384, 48),
}


def signature_is_valid(key: PublicKeyTypes, alg: str, signature: bytes,
                       signing_input: bytes) -> bool:
    """True when `signature` is `alg`'s signature of `signing_input` by `key`; never raises."""
    try:
        if alg in _ECDSA:
            curve, hash_class, half = _ECDSA[alg]
            if (not isinstance(key, ec.EllipticCurvePublicKey)
                    or not isinstance(key.curve, curve) or len(signature) != 2 * half):
                return False
            der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                       int.from_bytes(signature[half:], "big"))
            key.verify(der, signing_input, ec.ECDSA(hash_class()))
        elif alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input,
                       padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
