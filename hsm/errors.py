"""Typed errors of the hsm package, rooted at HsmError.

Every message is one line meant for an operator. None carries a PIN; only DeviceError may name
the PKCS#11 return code, because that is what a support engineer asks for first.
"""

from __future__ import annotations


class HsmError(Exception):
    """Something about the token, its keys or its module went wrong."""


class ModuleLoadError(HsmError):
    """The PKCS#11 module could not be loaded."""


class TokenNotFound(HsmError):
    """No token with the requested label is present."""


class TokenExists(HsmError):
    """A token with the requested label already exists (token initialisation)."""


class TokenAlreadyOpen(HsmError):
    """The token is already logged in from this process; share the open key store instead."""


class PinIncorrect(HsmError):
    """The token refused the PIN."""


class PinLocked(HsmError):
    """The token locked the PIN after too many failed logins."""


class PinInvalid(HsmError):
    """A new PIN does not meet the token's rules (length, characters)."""


class KeyNotFound(HsmError):
    """No key with the requested label or id is on the token."""


class KeyExists(HsmError):
    """A key with the requested label or id is already on the token."""


class KeyAmbiguous(HsmError):
    """More than one key matches the requested label or id."""


class KeyNotProtected(HsmError):
    """A private key is extractable or not sensitive, so it could leave the token."""


class KeyNotExportable(HsmError, TypeError):
    """Raised when asked for private key material: the key never leaves the token."""


class UnsupportedOperation(HsmError, TypeError):
    """The token key does not do this (token keys sign; they do not decrypt or exchange)."""


class UnsupportedKey(HsmError):
    """The key type, curve or size is not supported (by us or by the token)."""


class DeviceError(HsmError):
    """The token or its module failed (device error, removed device, broken session...)."""


class TokenUnavailable(HsmError):
    """The token was lost (removed, failed, key gone); signing waits until it is re-established."""


# What an operator is told when a token-class error takes the token away: fixed phrases, so that
# /health and audit records never carry a PKCS#11 return code (the log line has the detail).
_LOSS_REASONS: tuple[tuple[type[HsmError], str], ...] = (
    (TokenUnavailable, "the token is unavailable"),
    (TokenNotFound, "the token is not present"),
    (ModuleLoadError, "the PKCS#11 module cannot reach the token"),
    (KeyNotFound, "the CA key cannot be found on the token"),
    (PinIncorrect, "the token refused the PIN"),
    (PinLocked, "the token's PIN is locked"),
    (DeviceError, "the token reported a device error"),
)


def token_loss_reason(error: BaseException) -> str | None:
    """The operator's phrase when ERROR means the token (or its session) is gone, else None.

    These are the errors a removed device, a closed or invalid session, a vanished key or a
    failing module produce; retrying the same session cannot cure them, a new login can.
    """
    for kind, reason in _LOSS_REASONS:
        if isinstance(error, kind):
            return reason
    return None
