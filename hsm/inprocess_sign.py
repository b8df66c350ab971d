"""C_SignInit + C_Sign without releasing the GIL, for tokens that compute in this process.

python-pkcs11 releases the GIL around every PKCS#11 call, which is right for a device that makes
the caller wait. SoftHSM2 computes in the calling thread: an ECDSA P-256 signature takes about
0.1 ms. Releasing the GIL for that long buys nothing and costs a great deal when another thread
of the process runs Python (the server's event loop): the signing thread must then wait for that
thread to give the GIL back, which CPython asks for only every switch interval (5 ms). Measured
here: a signing loop does ~10,000 signatures/s alone and ~150/s beside a busy Python thread;
with the GIL held through the call it keeps ~10,000/s and the other thread just waits 0.1 ms.

So, for an in-process software token, the key store signs through this: the module's own
C_SignInit/C_Sign entry points, called with ctypes' PyDLL convention (the GIL stays held), on the
session and key handles python-pkcs11 opened. It is used on the PKCS#11 thread only, like every
other call into the module. A mechanism with parameters, or any error return, falls back to
python-pkcs11, which repeats the operation and raises its typed error (a signature larger than
the buffer is finished here with a bigger one, as the operation is still active then).
"""

from __future__ import annotations

import ctypes
import os

CKR_OK = 0
CKR_BUFFER_TOO_SMALL = 0x150
_MAX_SIGNATURE = 1024  # RSA 8192 bits; ECDSA P-521 needs 132


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("parameter", ctypes.c_void_p),
                ("parameter_len", ctypes.c_ulong)]


# Module basenames of tokens that compute in the calling process (no device to wait for).
IN_PROCESS_MODULES = frozenset({"libsofthsm2.so"})


def is_in_process(module_path: str) -> bool:
    return os.path.basename(os.path.realpath(module_path)) in IN_PROCESS_MODULES


class GilHoldingSigner:
    """Signs through the module's C_SignInit/C_Sign while holding the GIL (see the module doc)."""

    def __init__(self, module_path: str) -> None:
        # The same file python-pkcs11 loaded: dlopen hands back the already initialised module.
        dll = ctypes.PyDLL(os.path.realpath(module_path))
        self._sign_init = dll.C_SignInit
        self._sign_init.argtypes = [ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong]
        self._sign_init.restype = ctypes.c_ulong
        self._sign = dll.C_Sign
        self._sign.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                               ctypes.c_char_p, ctypes.POINTER(ctypes.c_ulong)]
        self._sign.restype = ctypes.c_ulong
        self._out = ctypes.create_string_buffer(_MAX_SIGNATURE)

    @classmethod
    def for_module(cls, module_path: str) -> GilHoldingSigner | None:
        """A signer for an in-process module that exports its C_ functions; else None."""
        if not is_in_process(module_path):
            return None
        try:
            return cls(module_path)
        except (OSError, AttributeError):
            return None

    def sign(self, session: int, key: int, mechanism: int, data: bytes) -> bytes | None:
        """The signature, or None when the caller must take python-pkcs11's path instead."""
        mech = _Mechanism(mechanism, None, 0)
        if self._sign_init(session, ctypes.byref(mech), key) != CKR_OK:
            return None  # no operation was started
        out = self._out
        length = ctypes.c_ulong(len(out))
        rv = self._sign(session, data, len(data), out, ctypes.byref(length))
        if rv == CKR_BUFFER_TOO_SMALL:  # the operation is still active: finish it
            out = ctypes.create_string_buffer(length.value)
            rv = self._sign(session, data, len(data), out, ctypes.byref(length))
        if rv != CKR_OK:
            return None  # C_Sign ends the operation on any other error
        return out.raw[:length.value]
