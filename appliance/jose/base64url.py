"""RFC 7515 base64url without padding, decoded strictly.

Only the canonical form is accepted: no padding, nothing outside the URL-safe alphabet and no
set bits in the unused tail of the last character. A lenient decoder lets two different strings
stand for the same bytes, which breaks replay checks keyed on the text (nonces, token ids) and
hides tampering with a signed segment.
"""

from __future__ import annotations

import base64
import binascii
import re

from appliance.jose.errors import JoseError

__all__ = ["JoseError", "b64url_decode", "b64url_encode", "b64url_uint", "b64url_uint_encode"]

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last characters whose unused low bits are zero: 4 bits after 2 characters, 2 after 3.
_CANONICAL_LAST = {2: frozenset(_SYMBOLS[::16]), 3: frozenset(_SYMBOLS[::4])}


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url text."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str = "base64url value",
                  error: type[JoseError] = JoseError) -> bytes:
    """Decode canonical unpadded base64url text; raise `error` (JoseError) for any other form.

    `what` names the value in the message ('JWS "payload"'), so the requester sees which one.
    """
    if not isinstance(text, str):
        raise error(f"{what} must be a base64url string")
    tail = len(text) % 4
    if tail == 1 or _ALPHABET.fullmatch(text) is None:
        raise error(f"{what} is not base64url (URL-safe alphabet, no \"=\" padding)")
    # The last character of a 2- or 3-character tail carries 4 or 2 unused bits, which must
    # be zero (RFC 4648 section 3.5); checking that one character is what re-encoding and
    # comparing would tell, without the copy. This runs on every token /sign reads.
    if tail and text[-1] not in _CANONICAL_LAST[tail]:
        raise error(f"{what} is not canonical base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-tail % 4))
    except (binascii.Error, ValueError):
        raise error(f"{what} is not base64url (URL-safe alphabet, no \"=\" padding)") from None


def b64url_uint(text: str, what: str = "base64url value",
                error: type[JoseError] = JoseError) -> int:
    """Decode a JWK/JWA big-endian unsigned integer (RFC 7518 section 2, Base64urlUInt)."""
    return int.from_bytes(b64url_decode(text, what, error), "big")


def b64url_uint_encode(value: int, length: int | None = None) -> str:
    """Encode an unsigned integer big-endian, in `length` bytes or the fewest that hold it."""
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))
