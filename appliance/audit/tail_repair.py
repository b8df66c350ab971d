"""Cutting a torn last record off the log: find it, keep its bytes aside, describe the repair.

A line without its newline at the end of the file can only be left by a writer that died (or
whose write failed) while it held the file's flock: every writer writes a whole batch under the
lock and fsyncs before it confirms anything, and an issuance's record precedes its signature. So
no caller was ever told that the fragment's record exists. The writer that next holds the lock
(log.py, AuditLog._tail) moves the fragment to `<log>.torn-<UTC time>` (0600), truncates the log
to its last newline, fsyncs, and appends an `audit.repair` record whose details are built here;
verify.py reads them back with `repair_problem`.

Only a writer holding the lock may decide that a fragment is torn: a fragment seen without it
may be a write still in progress.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from appliance.audit.record import AuditError
from appliance.fileio import fsync_directory

REPAIR_EVENT: Final = "audit.repair"
REPAIR_FIELDS: Final = ("torn_bytes", "torn_sha256", "kept_in", "offset")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_KEPT_NAME: Final = re.compile(r"[^/\x00]+\.torn-\d{8}T\d{6}\.\d{6}Z(-\d+)?")


@dataclass(frozen=True)
class TornTail:
    """The fragment after the last newline: where it starts, its bytes."""

    offset: int
    fragment: bytes


@dataclass(frozen=True)
class TailRepair:
    """An `audit.repair` record as verify reports it."""

    seq: int
    line: int
    torn_bytes: int
    torn_sha256: str
    kept_in: str
    offset: int


def scan_tail(fd: int, size: int, path: Path) -> tuple[int, bytes]:
    """(end, line): the offset just after the last newline, and the complete line ending there.

    `end` is `size` when the file ends with a newline; `line` is b"" when no line is complete.
    Reads backwards from the end, more each time, until both are found.
    """
    chunk = 4096
    try:
        while True:
            start = max(0, size - chunk)
            data = os.pread(fd, size - start, start)
            if len(data) != size - start:
                raise AuditError(f"the audit log {path} changed while being read")
            end = data.rfind(b"\n") + 1  # 0: no newline in what was read
            if end or start == 0:
                begin = data.rfind(b"\n", 0, max(0, end - 1)) + 1
                if begin or start == 0:
                    return start + end, data[begin:end]
            chunk *= 4
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None


def read_torn_tail(fd: int, offset: int, size: int, path: Path) -> TornTail:
    try:
        fragment = os.pread(fd, size - offset, offset)
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None
    if len(fragment) != size - offset:
        raise AuditError(f"the audit log {path} changed while being read")
    return TornTail(offset, fragment)


def keep_aside(path: Path, torn: TornTail, moment: datetime, *, fsync: bool) -> Path:
    """Write the fragment to a new `<log>.torn-<UTC time>` file (0600) next to the log."""
    stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    base = path.with_name(f"{path.name}.torn-{stamp}")
    for n in range(1, 100):
        kept = base if n == 1 else base.with_name(f"{base.name}-{n}")
        fd = None
        try:
            fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            view = memoryview(torn.fragment)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        except FileExistsError:
            continue
        except OSError as e:
            if fd is not None:
                kept.unlink(missing_ok=True)
            raise AuditError(f"cannot keep the torn record of the audit log {path} aside in "
                             f"{kept}: {e.strerror}; refusing to cut it off") from None
        finally:
            if fd is not None:
                os.close(fd)
        if fsync:
            fsync_directory(path.parent)
        return kept
    raise AuditError(f"cannot keep the torn record of the audit log {path} aside: too many "
                     f"files named {base.name}-N")


def repair_details(torn: TornTail, kept: Path) -> dict[str, Any]:
    return {"torn_bytes": len(torn.fragment),
            "torn_sha256": hashlib.sha256(torn.fragment).hexdigest(),
            "kept_in": kept.name, "offset": torn.offset}


def repair_problem(details: dict[str, Any]) -> str | None:
    """What is wrong with an `audit.repair` record's details, if anything."""
    if tuple(details) != REPAIR_FIELDS:
        return f"audit.repair details are not {', '.join(REPAIR_FIELDS)}"
    for name in ("torn_bytes", "offset"):
        value = details[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"audit.repair {name} is not a non-negative integer"
    if details["torn_bytes"] == 0:
        return "audit.repair torn_bytes is 0"
    if not isinstance(details["torn_sha256"], str) or not _HEX64.fullmatch(details["torn_sha256"]):
        return "audit.repair torn_sha256 is not 64 lowercase hex digits"
    if not isinstance(details["kept_in"], str) or not _KEPT_NAME.fullmatch(details["kept_in"]):
        return "audit.repair kept_in is not a <log>.torn-<time> file name"
    return None
