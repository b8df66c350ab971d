"""Replay nonces that every worker process can check: HMAC-signed, single use in the database.

Issuing a nonce writes nothing (it is a random value, an expiry and a MAC under a key kept in
the database); using one inserts it into a table with a unique key, so a replay fails in any
process, and after a restart. Expired nonces are refused by their MAC'd expiry and purged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time

NONCE_LIFETIME = 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class NonceIssuer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def new(self, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + NONCE_LIFETIME
        body = secrets.token_bytes(16) + struct.pack(">Q", expires)
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return _b64(body + mac)

    def check(self, nonce: str, now: float | None = None) -> int | None:
        """The nonce's expiry if it is ours and unexpired; None otherwise (not yet 'used')."""
        if not isinstance(nonce, str) or len(nonce) > 64:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 40:
            return None
        body, mac = raw[:24], raw[24:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()[:16]):
            return None
        (expires,) = struct.unpack(">Q", body[16:])
        if expires < (now if now is not None else time.time()):
            return None
        return int(expires)
