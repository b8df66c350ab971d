"""Start-up refusals: secrets files others can read, a CA home others can write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.errors import ConfigError


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
