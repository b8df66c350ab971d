"""The embedded default token: SoftHSM2 configuration and token initialisation.

SoftHSM2 reads the environment variable ``SOFTHSM2_CONF`` once, when the module is loaded and
initialised in a process. Set it (to a file written by :func:`write_softhsm_conf`) before anything
in the process loads the module; ``Pkcs11KeyStore.open`` deliberately does not set it, because by
the time it runs another part of the process may already have loaded the module.

Initialising a token needs C_InitToken, C_Login as security officer and C_InitPIN. softhsm2-util
reads PINs only from a terminal or from its arguments, and PINs never go into process arguments, so
this module does it itself: :func:`init_token` starts ``python -m hsm.softhsm init-token`` and
writes the SO PIN and the user PIN as two lines on its standard input; the child calls the
module's exported C_* functions through ctypes. It is a child process because a process that has
already initialised the module (python-pkcs11 does so on load) must not C_Initialize it again, and
because python-pkcs11 cannot initialise a token.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Final

from hsm.errors import DeviceError, HsmError, ModuleLoadError, PinInvalid, TokenExists

__all__ = [
    "SOFTHSM_MODULE",
    "find_softhsm_module",
    "init_token",
    "token_exists",
    "write_softhsm_conf",
]

SOFTHSM_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
_MODULE_CANDIDATES: Final = (
    SOFTHSM_MODULE,
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
)

# Kept in step with softhsm-config/softhsm2.conf.in (a unit test checks); used when the package
# runs without the source tree around it.
_DEFAULT_CONF_TEMPLATE: Final = """\
# SoftHSM v2 configuration for the appliance's embedded default token.
# Rendered by hsm.softhsm.write_softhsm_conf, filling in the token directory.
# Point SOFTHSM2_CONF at the rendered file before the module is loaded in a process.
directories.tokendir = ${tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""

CONF_TEMPLATE_PATH: Final = (
    Path(__file__).resolve().parent.parent / "softhsm-config" / "softhsm2.conf.in"
)

# SoftHSM2's limits for PINs (MIN_PIN_LEN / MAX_PIN_LEN) and PKCS#11's for token labels.
MIN_PIN_LENGTH: Final = 4
MAX_PIN_LENGTH: Final = 255
MAX_LABEL_BYTES: Final = 32

_CHILD_TIMEOUT_SECONDS: Final = 120

# Exit statuses of the child; anything else is an unexpected failure.
_EXIT_OK: Final = 0
_EXIT_TOKEN_EXISTS: Final = 10
_EXIT_MODULE_LOAD: Final = 11
_EXIT_PIN_INVALID: Final = 12
_EXIT_DEVICE: Final = 13
_EXIT_OTHER: Final = 14


def find_softhsm_module() -> str | None:
    """Path of the installed SoftHSM2 module, or None when it is not installed."""
    for candidate in _MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    return None


def conf_template() -> str:
    """The softhsm2.conf template text (from softhsm-config/ when present)."""
    try:
        return CONF_TEMPLATE_PATH.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _DEFAULT_CONF_TEMPLATE


def write_softhsm_conf(directory: Path) -> Path:
    """Create directory/tokens (0700) and directory/softhsm2.conf pointing at it; return the conf.

    Existing tokens in directory/tokens are left alone, so calling this again is harmless.
    """
    directory = Path(directory).resolve()
    tokens = directory / "tokens"
    if "\n" in str(tokens) or "\r" in str(tokens):
        raise HsmError("the SoftHSM2 token directory path must not contain a line break")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens.mkdir(mode=0o700, exist_ok=True)
    os.chmod(tokens, 0o700)
    text = Template(conf_template()).substitute(tokendir=str(tokens))
    conf = directory / "softhsm2.conf"
    fd, tmp_name = tempfile.mkstemp(prefix=".softhsm2.conf.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, conf)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return conf


def init_token(
    module_path: str, label: str, so_pin: str, user_pin: str, *, conf: Path | None
) -> None:
    """Initialise a free SoftHSM2 slot as token `label` with the given SO and user PINs.

    Runs in a child process (see the module docstring); `conf` becomes its SOFTHSM2_CONF (None:
    inherit this process's). Raises TokenExists, PinInvalid, ModuleLoadError, DeviceError.
    """
    _check_label(label)
    _check_pin(so_pin, "security officer PIN")
    _check_pin(user_pin, "user PIN")
    _run_child(
        ["init-token", "--module", module_path, "--label", label],
        stdin=f"{so_pin}\n{user_pin}\n",
        conf=conf,
    )


def token_exists(module_path: str, label: str, conf: Path | None) -> bool:
    """True when an initialised token labelled `label` is present (checked in a child process)."""
    _check_label(label)
    out = _run_child(
        ["token-exists", "--module", module_path, "--label", label], stdin="", conf=conf
    )
    return out.strip() == "present"


def _check_label(label: str) -> None:
    if not label or label != label.strip():
        raise HsmError("a token label must be non-empty and must not start or end with a space")
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        raise HsmError(f"a token label is at most {MAX_LABEL_BYTES} bytes of UTF-8")


def _check_pin(pin: str, what: str) -> None:
    if "\n" in pin or "\r" in pin or "\0" in pin:
        raise PinInvalid(f"the {what} must not contain line breaks or NUL characters")
    length = len(pin.encode("utf-8"))
    if not MIN_PIN_LENGTH <= length <= MAX_PIN_LENGTH:
        raise PinInvalid(f"the {what} must be {MIN_PIN_LENGTH} to {MAX_PIN_LENGTH} bytes long")


def _run_child(args: Sequence[str], *, stdin: str, conf: Path | None) -> str:
    env = dict(os.environ)
    if conf is not None:
        env["SOFTHSM2_CONF"] = str(conf)
    # The child imports hsm from wherever this process did, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hsm.softhsm", *args],
            input=stdin.encode("utf-8"),
            capture_output=True,
            env=env,
            timeout=_CHILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeviceError("the SoftHSM2 helper did not finish in time") from None
    message = done.stderr.decode("utf-8", "replace").strip().splitlines()
    line = message[-1] if message else "the SoftHSM2 helper failed without a message"
    if done.returncode == _EXIT_OK:
        return done.stdout.decode("utf-8", "replace")
    error: type[HsmError] = {
        _EXIT_TOKEN_EXISTS: TokenExists,
        _EXIT_MODULE_LOAD: ModuleLoadError,
        _EXIT_PIN_INVALID: PinInvalid,
        _EXIT_DEVICE: DeviceError,
    }.get(done.returncode, HsmError)
    raise error(line)


# ---------------------------------------------------------------------------------------------
# The child: plain ctypes on the module's exported C_* functions. Nothing below runs in the parent.

CK_RV = ctypes.c_ulong
CK_ULONG = ctypes.c_ulong
CK_SLOT_ID = ctypes.c_ulong
CK_SESSION_HANDLE = ctypes.c_ulong

CKR_OK: Final = 0x0
CKR_PIN_INVALID: Final = 0xA1
CKR_PIN_LEN_RANGE: Final = 0xA2
CKF_RW_SESSION: Final = 0x2
CKF_SERIAL_SESSION: Final = 0x4
CKF_USER_PIN_INITIALIZED: Final = 0x8
CKF_TOKEN_INITIALIZED: Final = 0x400
CKU_SO: Final = 0


class _CkVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _CkTokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_ubyte * 32),
        ("manufacturerID", ctypes.c_ubyte * 32),
        ("model", ctypes.c_ubyte * 16),
        ("serialNumber", ctypes.c_ubyte * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", _CkVersion),
        ("firmwareVersion", _CkVersion),
        ("utcTime", ctypes.c_ubyte * 16),
    ]


class _ChildFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Module:
    """Just enough of a PKCS#11 module, called through its exported symbols."""

    def __init__(self, path: str) -> None:
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise _ChildFailure(
                _EXIT_MODULE_LOAD, f"could not load the PKCS#11 module {path}: {exc}"
            ) from None
        self.path = path

    def call(self, name: str, *args: object) -> int:
        try:
            fn = getattr(self._lib, name)
        except AttributeError:
            raise _ChildFailure(
                _EXIT_MODULE_LOAD, f"the PKCS#11 module {self.path} does not export {name}"
            ) from None
        fn.restype = CK_RV
        return int(fn(*args))

    def check(self, name: str, *args: object) -> None:
        rv = self.call(name, *args)
        if rv in (CKR_PIN_INVALID, CKR_PIN_LEN_RANGE):
            raise _ChildFailure(
                _EXIT_PIN_INVALID, "the token refused the new PIN (length or characters)"
            )
        if rv != CKR_OK:
            raise _ChildFailure(
                _EXIT_DEVICE, f"the token reported an error in {name} (CKR 0x{rv:08X})"
            )

    def slots(self) -> list[tuple[int, _CkTokenInfo]]:
        count = CK_ULONG(0)
        self.check("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
        ids = (CK_SLOT_ID * max(count.value, 1))()
        self.check("C_GetSlotList", ctypes.c_ubyte(1), ids, ctypes.byref(count))
        found = []
        for slot in list(ids)[: count.value]:
            info = _CkTokenInfo()
            self.check("C_GetTokenInfo", CK_SLOT_ID(slot), ctypes.byref(info))
            found.append((int(slot), info))
        return found

    def initialised_slot(self, label: str) -> int | None:
        for slot, info in self.slots():
            if info.flags & CKF_TOKEN_INITIALIZED and _label_of(info) == label:
                return slot
        return None


def _label_of(info: _CkTokenInfo) -> str:
    return bytes(info.label).decode("utf-8", "replace").rstrip(" \0")


def _padded_label(label: str) -> ctypes.Array[ctypes.c_char]:
    raw = label.encode("utf-8")
    return ctypes.create_string_buffer(raw + b" " * (MAX_LABEL_BYTES - len(raw)), MAX_LABEL_BYTES)


def _child_init_token(module: _Module, label: str, so_pin: bytes, user_pin: bytes) -> None:
    if module.initialised_slot(label) is not None:
        raise _ChildFailure(_EXIT_TOKEN_EXISTS, f"a token labelled {label} already exists")
    free = [slot for slot, info in module.slots() if not info.flags & CKF_TOKEN_INITIALIZED]
    if not free:
        raise _ChildFailure(_EXIT_OTHER, "the PKCS#11 module has no free slot for a new token")
    so_buf = ctypes.create_string_buffer(so_pin, len(so_pin))
    user_buf = ctypes.create_string_buffer(user_pin, len(user_pin))
    try:
        module.check(
            "C_InitToken", CK_SLOT_ID(free[0]), so_buf, CK_ULONG(len(so_pin)), _padded_label(label)
        )
        # SoftHSM2 gives an initialised token a new slot id: look it up again by label.
        slot = module.initialised_slot(label)
        if slot is None:
            raise _ChildFailure(_EXIT_DEVICE, f"token {label} vanished after initialisation")
        session = CK_SESSION_HANDLE(0)
        module.check(
            "C_OpenSession",
            CK_SLOT_ID(slot),
            CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
            None,
            None,
            ctypes.byref(session),
        )
        try:
            module.check("C_Login", session, CK_ULONG(CKU_SO), so_buf, CK_ULONG(len(so_pin)))
            try:
                module.check("C_InitPIN", session, user_buf, CK_ULONG(len(user_pin)))
            finally:
                module.call("C_Logout", session)
        finally:
            module.call("C_CloseSession", session)
    finally:
        ctypes.memset(so_buf, 0, len(so_pin))
        ctypes.memset(user_buf, 0, len(user_pin))


def _read_pin_line(stream: object) -> bytes:
    readline = getattr(stream, "readline")  # noqa: B009 - stdin.buffer has no static type here
    line = readline()
    if not isinstance(line, bytes) or not line.endswith(b"\n"):
        raise _ChildFailure(
            _EXIT_OTHER, "expected the SO PIN and the user PIN as two lines on stdin"
        )
    return line[:-1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child process (``python -m hsm.softhsm``)."""
    parser = argparse.ArgumentParser(
        prog="python -m hsm.softhsm",
        description="Initialise or look for a SoftHSM2 token. PINs are read from stdin, "
        "never from arguments.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser(
        "init-token", help="initialise a token; stdin: SO PIN line, then user PIN line"
    )
    exists = commands.add_parser("token-exists", help="print 'present' or 'absent'")
    for command in (init, exists):
        command.add_argument("--module", required=True)
        command.add_argument("--label", required=True)
    options = parser.parse_args(argv)

    try:
        if options.command == "init-token":
            so_pin = _read_pin_line(sys.stdin.buffer)
            user_pin = _read_pin_line(sys.stdin.buffer)
        module = _Module(options.module)
        rv = module.call("C_Initialize", None)
        if rv != CKR_OK:
            raise _ChildFailure(
                _EXIT_DEVICE, f"the PKCS#11 module failed to initialise (CKR 0x{rv:08X})"
            )
        try:
            if options.command == "init-token":
                _child_init_token(module, options.label, so_pin, user_pin)
            else:
                present = module.initialised_slot(options.label) is not None
                print("present" if present else "absent")
        finally:
            module.call("C_Finalize", None)
    except _ChildFailure as failure:
        print(str(failure), file=sys.stderr)
        return failure.status
    return _EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
