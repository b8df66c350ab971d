"""Loading the module, logging in once, and python-pkcs11's exceptions as hsm.errors.

Login belongs to the whole process (a second login raises UserAlreadyLoggedIn and closing the
logged-in session logs every session out), so a key store logs in once when it opens and keeps
that session until it closes. Everything here runs on the PKCS#11 thread (hsm.pkcs11_thread).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Final

import pkcs11
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import Mechanism
from pkcs11.types import Session

from hsm import errors

__all__ = ["login", "relogin", "translated"]

# python-pkcs11's exceptions -> (our error, its message), first match wins. {token} is the
# token's label, {name} the python-pkcs11 class (never a PIN: no exception carries one).
_TRANSLATIONS: Final[tuple[tuple[tuple[type[Exception], ...], type[errors.HsmError], str], ...]] = (
    ((p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid), errors.PinIncorrect,
     "the token {token} refused the PIN"),
    ((p11.PinExpired,), errors.PinIncorrect,
     "the PIN of token {token} has expired; set a new one"),
    ((p11.PinLocked,), errors.PinLocked,
     "the PIN of token {token} is locked after too many failed logins; "
     "the security officer must unlock it"),
    ((p11.UserPinNotInitialized,), errors.PinIncorrect, "token {token} has no user PIN set yet"),
    ((p11.NoSuchToken, p11.TokenNotPresent, p11.TokenNotRecognised), errors.TokenNotFound,
     "token {token} is not present"),
    ((p11.UserAlreadyLoggedIn, p11.AnotherUserAlreadyLoggedIn), errors.TokenAlreadyOpen,
     "token {token} is already logged in from this process"),
    ((p11.NoSuchKey, p11.ObjectHandleInvalid, p11.KeyHandleInvalid), errors.KeyNotFound,
     "the key is no longer on token {token}"),
    ((p11.MultipleObjectsReturned,), errors.KeyAmbiguous,
     "more than one key matches on token {token}"),
    ((p11.AttributeSensitive,), errors.KeyNotExportable,
     "the token {token} refused to reveal a sensitive key attribute"),
    ((p11.MechanismInvalid, p11.MechanismParamInvalid, p11.KeySizeRange, p11.DomainParamsInvalid,
      p11.KeyTypeInconsistent, p11.FunctionNotSupported, p11.TemplateInconsistent,
      p11.AttributeValueInvalid), errors.UnsupportedKey,
     "token {token} does not support this key or mechanism ({name})"),
    ((p11.UserNotLoggedIn,), errors.DeviceError,
     "the session with token {token} is no longer logged in"),
    ((p11.PKCS11Error,), errors.DeviceError, "the token {token} reported a device error ({name})"),
)


@contextlib.contextmanager
def translated(token_label: str) -> Iterator[None]:
    """Turn python-pkcs11 exceptions into the typed, PIN-free errors of hsm.errors."""
    try:
        yield
    except errors.HsmError:
        raise
    except p11.PKCS11Error as exc:
        for raised, error, message in _TRANSLATIONS:
            if isinstance(exc, raised):
                text = message.format(token=repr(token_label), name=type(exc).__name__)
                raise error(text) from exc
        raise  # unreachable: the last entry catches every PKCS11Error


def login(module_path: str, token_label: str, pin: str) -> tuple[Session, frozenset[Mechanism]]:
    """On the PKCS#11 thread: load the module, find the token, open the session and log in."""
    if not os.path.isfile(module_path):
        raise errors.ModuleLoadError(f"the PKCS#11 module {module_path} does not exist")
    try:
        lib = pkcs11.lib(module_path)
    except p11.PKCS11Error as exc:
        reason = str(exc) if "exception while loading" in str(exc) else type(exc).__name__
        raise errors.ModuleLoadError(
            f"could not load or initialise the PKCS#11 module {module_path} ({reason}); "
            "for SoftHSM2, check that SOFTHSM2_CONF names a readable configuration"
        ) from exc
    with translated(token_label):
        try:
            token = lib.get_token(token_label=token_label)
        except p11.MultipleTokensReturned as exc:
            raise errors.TokenNotFound(
                f"more than one token is labelled {token_label!r}; labels must be unique"
            ) from exc
        mechanisms = frozenset(token.slot.get_mechanisms())
        session = token.open(rw=True, user_pin=pin)
    return session, mechanisms


def relogin(module_path: str, token_label: str, pin: str) -> tuple[Session, frozenset[Mechanism]]:
    """On the PKCS#11 thread: finalize the module, initialise it again and log in anew.

    After a device was removed (or its token directory went away), the module's sessions and
    object handles are dead and it does not notice the token coming back until it is
    initialised again (measured with SoftHSM2 2.6.1: the old session never finds the key again;
    C_Finalize + C_Initialize in the same process finds it and signs). C_Finalize closes every
    session of the process, which is only ours: login belongs to the process.
    """
    with contextlib.suppress(p11.PKCS11Error):
        pkcs11.lib(module_path).finalize()  # a failing C_Initialize leaves it finalized
    return login(module_path, token_label, pin)
