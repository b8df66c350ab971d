"""Durable, atomic file writes: a reader sees the old file or the new one, never half of one.

Every layer writes files this way (ca.json, the server's TLS key, the CLI's output files, the pid
file), so this module imports nothing from the appliance.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporary(path: Path, data: bytes, mode: int = 0o600, *,
                    keep_owner: bool = False) -> Path:
    """Write `data` to a new temporary file beside `path` with `mode`, fsynced; return its path.

    The file is created with O_EXCL and mode 0600 before its final mode is set, so no other user
    can open it in between. `keep_owner`: when root replaces an existing file it keeps that
    file's owner (root editing a service's ca.json). Move it into place with `replace_durably`.
    """
    owner: tuple[int, int] | None = None
    if keep_owner and os.geteuid() == 0:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            owner = (st.st_uid, st.st_gid)
    parent = path.parent if str(path.parent) else Path(".")
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def replace_durably(temporary: Path, path: Path) -> None:
    """Rename `temporary` over `path` and fsync the directory, so the rename survives a crash."""
    os.replace(temporary, path)
    fsync_directory(path.parent if str(path.parent) else Path("."))


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *,
                 keep_owner: bool = False) -> None:
    """Replace `path` with `data` atomically and durably (temporary file, fsync, rename, fsync)."""
    temporary = write_temporary(path, data, mode, keep_owner=keep_owner)
    try:
        replace_durably(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
