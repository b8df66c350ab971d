"""The one rule for which names and values are secret, used by the logs and the audit log alike.

A name is split into words (snake_case, camelCase, kebab-case); it names a secret when one of the
words is a secret word (pin, password, token, ott, share, mnemonic, private ...), or when it is
"key" alone or key with a key-material word (key_pem, keyBytes). So `issuerPin`, `pin_file`,
`private_key` and `client_secret` are secret; `key_id`, `public_key_sha256`, `serial` are not.
A value is secret when it holds a private-key PEM, and a JWT inside any string is cut out.

The logs keep a secret's key with the value "[redacted]" (a line still says a PIN was given);
the audit log leaves the key out (a record holds only facts). Both ask `is_secret_name`.
This module imports nothing from the appliance: every layer may use it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "[redacted]"
REDACTED_JWT: Final = "[redacted-jwt]"

_SECRET_WORDS: Final = frozenset({
    "pin", "pins", "puk", "password", "passwords", "passwd", "passphrase", "secret", "secrets",
    "token", "tokens", "ott", "jwt", "share", "shares", "mnemonic", "seed", "credential",
    "credentials", "authorization", "cookie", "private", "privkey", "hmac", "keys",
})
# "key" alone, or with one of these, names key material; key_id, key_type, public_key do not.
_KEY_MATERIAL_WORDS: Final = frozenset({
    "pem", "der", "material", "bytes", "data", "pkcs8", "encrypted", "raw",
})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
_PRIVATE_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


@functools.lru_cache(maxsize=4096)  # the same few names come with every log line and record
def is_secret_name(name: str) -> bool:
    """True when a key names a secret (PIN, password, token, share, key material ...)."""
    words = {w.lower() for w in _WORD.findall(name)}
    if words & _SECRET_WORDS:
        return True
    return "key" in words and (len(words) == 1 or bool(words & _KEY_MATERIAL_WORDS))


def redact_text(value: str) -> str:
    """`value` without secrets: REDACTED if it holds a private key, JWTs cut out otherwise."""
    if "-----BEGIN" in value and _PRIVATE_PEM.search(value):  # substring first: most logs
        return REDACTED
    if "eyJ" in value:
        return _JWT.sub(REDACTED_JWT, value)
    return value


def without_secrets(value: Any) -> Any:
    """A copy of `value` with secret-named keys left out and secret strings redacted (audit)."""
    if isinstance(value, Mapping):
        return {str(k): without_secrets(v) for k, v in value.items()
                if not is_secret_name(str(k))}
    if isinstance(value, list | tuple):
        return [without_secrets(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((without_secrets(v) for v in value), key=str)
    if isinstance(value, str):
        return redact_text(value)
    return value


def masked(value: Any) -> Any:
    """A copy of `value` with the values of secret-named keys replaced by REDACTED (logs)."""
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_name(str(k)) else masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
