"""Start-up refusals (secrets files others can read, a CA home others can write) and the
process hardening of every process that holds a PIN (no core dumps, not dumpable)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import stat
from pathlib import Path

from appliance.errors import ApplianceError, ConfigError

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """Keep this process's memory (PINs, shares, the TLS key) out of core files and ptrace.

    RLIMIT_CORE 0, soft and hard (no core file; it cannot be raised again), and
    PR_SET_DUMPABLE 0: no core even through a core_pattern pipe, and no ptrace attach or read
    of /proc/PID/mem or environ by other processes of the same user without CAP_SYS_PTRACE.
    The systemd unit's LimitCORE=0 covers only the service; `make run` and a bare `serve`
    inherited the shell's limit, and a supervisor's core held the issuer PIN. execve() resets
    the dumpable flag, so every process calls this itself, before any secret reaches it.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise ApplianceError(f"cannot make the process non-dumpable (prctl "
                             f"PR_SET_DUMPABLE): {os.strerror(errno)}")


def check_secret_file(path: Path, what: str) -> None:
    """A PIN or password file must belong to this user and be unreadable by anyone else."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} file {path} is not a regular file")
    # systemd's LoadCredential= copies are root's, readable by the service through the
    # credentials directory; anywhere else the file must be the service user's own.
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    in_creds = bool(creds) and path.resolve().parent == Path(str(creds)).resolve()
    if st.st_uid != os.geteuid() and not (in_creds and st.st_uid == 0):
        raise ConfigError(f"{what} file {path} belongs to uid {st.st_uid}, not to the user "
                          f"running the CA (uid {os.geteuid()}); chown it")
    if st.st_mode & (0o007 if in_creds else 0o077):
        raise ConfigError(f"{what} file {path} is readable or writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")


def check_home_not_writable_by_others(home: Path, extra: list[Path] | None = None) -> None:
    """Refuse a CA home (or its config, certs, db, hsm, audit) that group or world can write."""
    candidates = [home] + [home / d for d in ("config", "certs", "db", "hsm", "audit")]
    candidates += [p for d in ("config", "certs") if (home / d).is_dir()
                   for p in sorted((home / d).iterdir())]
    candidates += extra or []
    for path in candidates:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o022:
            raise ConfigError(f"{path} is writable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run chmod go-w {path}")
