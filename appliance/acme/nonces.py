"""Replay nonces that every worker process can check: HMAC-signed, single use in the database.

Issuing a nonce writes nothing (it is a random value, an expiry and a MAC under a key kept in
the database); using one inserts it into a table with a unique key, so a replay fails in any
process, and after a restart. Expired nonces are refused by their MAC'd expiry and purged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable

from appliance.errors import ApplianceError
from appliance.jose.base64url import b64url_decode, b64url_encode

NONCE_LIFETIME = 3600


class NonceIssuer:
    def __init__(self, key: bytes, clock: Callable[[], float]) -> None:
        self._key = key
        self._clock = clock

    def new(self) -> str:
        expires = int(self._clock()) + NONCE_LIFETIME
        body = secrets.token_bytes(16) + struct.pack(">Q", expires)
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return b64url_encode(body + mac)

    def check(self, nonce: str) -> int | None:
        """The nonce's expiry if it is ours and unexpired; None otherwise (not yet 'used')."""
        if not isinstance(nonce, str) or len(nonce) > 64:
            return None
        # Canonical spelling only, and that is what makes single use hold: the store records a
        # used nonce by its text, and 40 bytes are 54 characters whose last one carries 4
        # unused bits, so a lenient decoder would take 16 spellings of one nonce, each usable
        # once. b64url_decode refuses all but the one whose unused bits are zero.
        try:
            raw = b64url_decode(nonce)
        except ApplianceError:
            return None
        if len(raw) != 40:
            return None
        body, mac = raw[:24], raw[24:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()[:16]):
            return None
        (expires,) = struct.unpack(">Q", body[16:])
        if expires < self._clock():
            return None
        return int(expires)
