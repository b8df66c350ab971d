"""Reading the log back: verify the chain and every checkpoint, or show the last records."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from appliance.audit.checkpoint import (
    CHECKPOINT_FIELDS,
    certificate_sha256,
    checkpoint_message,
    verify_signature,
)
from appliance.audit.record import EVENT_NAME, FIELDS, OUTCOMES, ZERO_HEAD, AuditError
from appliance.audit.tail_repair import REPAIR_EVENT, TailRepair, repair_problem

_TIME: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found. `reason` names the first bad record, or says what is not yet signed."""

    ok: bool
    records: int  # records checked and found good (all of them when ok)
    checkpoints: int
    first_bad_seq: int | None
    first_bad_line: int | None
    reason: str | None
    last_checkpoint_seq: int | None
    repairs: tuple[TailRepair, ...] = ()  # torn tails the writers cut off, oldest first


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _format_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a parsed record, if anything."""
    if tuple(record) != FIELDS:
        return f"the fields are not {', '.join(FIELDS)} in that order"
    if not _is_int(record["seq"]) or record["seq"] < 1:
        return "seq is not a positive integer"
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        return "time is not UTC RFC 3339 with microseconds"
    if not isinstance(record["actor"], str) or not record["actor"]:
        return "actor is not a string"
    if not isinstance(record["event"], str) or not EVENT_NAME.fullmatch(record["event"]):
        return "event is not a lowercase dotted word"
    if record["outcome"] not in OUTCOMES:
        return "outcome is not success or failure"
    if not isinstance(record["details"], dict):
        return "details is not an object"
    if not isinstance(record["prev"], str) or not _HEX64.fullmatch(record["prev"]):
        return "prev is not 64 lowercase hex digits"
    return None


class _ChainCheck:
    """Walks the file line by line; `check` returns the reason a line is bad, or None."""

    def __init__(self, certificates: Sequence[x509.Certificate],
                 previous_head: str | None, checkpoint_signatures: bool = True) -> None:
        self.by_fingerprint = {certificate_sha256(c): c for c in certificates}
        self.checkpoint_signatures = checkpoint_signatures
        self.repairs: list[TailRepair] = []
        self.previous_head = previous_head
        self.head = previous_head or ZERO_HEAD
        self.expected_seq: int | None = None if previous_head else 1
        self.records = 0
        self.checkpoints = 0
        self.last_checkpoint_seq: int | None = None
        self.last_checkpoint_line = 0
        self.first_seq: int | None = None
        self.last_seq = 0

    def check(self, line: bytes, lineno: int, record: dict[str, Any] | None) -> str | None:
        if not line.endswith(b"\n"):
            return ("the last line is incomplete (no newline): the file was truncated or a "
                    "write was cut short")
        if record is None:
            return "not a JSON object (the line was edited, or is not an audit record)"
        problem = _format_problem(record)
        if problem is not None:
            return f"{problem} (the line was edited, or is not an audit record)"
        seq: int = record["seq"]
        expected = self.expected_seq if self.expected_seq is not None else seq
        if record["prev"] != self.head:
            if lineno > 1:
                reason = (f"prev does not match the SHA-256 of line {lineno - 1} — a record "
                          "was edited, deleted or reordered")
            elif self.previous_head is not None:
                reason = "prev does not match the head of the previous file"
            else:
                reason = (f"the first record's prev is not {ZERO_HEAD[:8]}…: the log does not "
                          "start here — records before it were deleted, or it continues an "
                          "earlier file")
            if seq != expected:
                reason += f" (seq {seq} where {expected} was expected)"
            return reason
        if seq != expected:
            return (f"seq {seq} where {expected} was expected, although prev matches — the line "
                    "was forged or renumbered")
        if record["event"] == "checkpoint":
            problem = self._checkpoint_problem(record)
            if problem is not None:
                return problem
            self.checkpoints += 1
            self.last_checkpoint_seq = seq
            self.last_checkpoint_line = lineno
        elif record["event"] == REPAIR_EVENT:
            problem = repair_problem(record["details"])
            if problem is not None:
                return problem
            d = record["details"]
            self.repairs.append(TailRepair(seq, lineno, d["torn_bytes"], d["torn_sha256"],
                                           d["kept_in"], d["offset"]))
        self.head = hashlib.sha256(line).hexdigest()
        self.expected_seq = seq + 1
        self.records += 1
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        return None

    def _checkpoint_problem(self, record: dict[str, Any]) -> str | None:
        details: dict[str, Any] = record["details"]
        if set(details) != CHECKPOINT_FIELDS or not all(
                isinstance(details[k], str) for k in CHECKPOINT_FIELDS - {"seq"}):
            return "checkpoint details are not head, seq, alg, signature, certificate_sha256"
        if details["head"] != record["prev"]:
            return "checkpoint head is not the SHA-256 of the line before it"
        if not _is_int(details["seq"]) or details["seq"] != record["seq"] - 1:
            return "checkpoint seq is not the seq of the record before it"
        if not self.checkpoint_signatures:
            return None
        certificate = self.by_fingerprint.get(details["certificate_sha256"])
        if certificate is None:
            return (f"checkpoint signed by certificate {details['certificate_sha256'][:16]}…, "
                    "which is not among the certificates given to verify")
        try:
            signature = base64.b64decode(details["signature"], validate=True)
            verify_signature(certificate.public_key(), details["alg"], signature,
                              checkpoint_message(details["seq"], details["head"]))
        except (InvalidSignature, binascii.Error, AuditError):
            return (f"checkpoint signature does not verify with certificate "
                    f"{details['certificate_sha256'][:16]}… — the checkpoint was altered")
        return None

    def coverage_note(self, lines: int) -> str | None:
        if self.records == 0:
            return None
        first_line = self.last_checkpoint_line + 1
        if first_line > lines:
            return None
        first_seq = self.last_seq - (lines - first_line)
        what = (f"record {first_seq} (line {first_line}) is" if first_line == lines else
                f"records {first_seq}..{self.last_seq} (lines {first_line}..{lines}) are")
        if self.last_checkpoint_seq is None:
            return f"{what} not yet covered by a checkpoint (there is no checkpoint yet)"
        return (f"{what} not yet covered by a checkpoint (the last is record "
                f"{self.last_checkpoint_seq})")


def verify(path: Path, certificates: Sequence[x509.Certificate], *,
           previous_head: str | None = None, checkpoint_signatures: bool = True,
           end: int | None = None) -> VerifyResult:
    """Check the whole chain and every checkpoint signature; report the first bad record.

    A checkpoint's certificate is chosen among `certificates` by its SHA-256. `previous_head`
    is for a file that continues an earlier one: the SHA-256 of that file's last line.
    `ok` stays True when the chain is intact but its last records are not yet covered by a
    checkpoint; `reason` then says which. `checkpoint_signatures=False` checks where each
    checkpoint sits but not its signature; `end` checks only the file's first `end` bytes (a
    line boundary). Repairs of a torn tail are in `repairs`. Raises AuditError when the file
    cannot be read.
    """
    check = _ChainCheck(certificates, previous_head, checkpoint_signatures)
    lineno = 0
    left = end
    try:
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if left is not None:
                    if left <= 0:
                        lineno -= 1
                        break
                    left -= len(line)
                record = _parse_record(line)
                reason = check.check(line, lineno, record)
                if reason is not None:
                    seq = record.get("seq") if record is not None else None
                    bad_seq = seq if _is_int(seq) else check.expected_seq
                    where = (f"record {bad_seq} (line {lineno})" if bad_seq is not None
                             else f"line {lineno}")
                    return VerifyResult(False, check.records, check.checkpoints, bad_seq, lineno,
                                        f"{where}: {reason}", check.last_checkpoint_seq,
                                        tuple(check.repairs))
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None
    return VerifyResult(True, check.records, check.checkpoints, None, None,
                        check.coverage_note(lineno), check.last_checkpoint_seq,
                        tuple(check.repairs))


def tail(path: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` complete records, oldest first. Raises AuditError if one is not JSON."""
    if n <= 0:
        return []
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            chunk = 65536
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                data = f.read(size - start)
                # An incomplete last line is not a record (verify reports it).
                lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
                if start > 0:
                    lines = lines[1:]  # may start mid-line
                if len(lines) >= n or start == 0:
                    break
                chunk *= 4
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None
    records: list[dict[str, Any]] = []
    for line in lines[-n:]:
        record = _parse_record(line)
        if record is None:
            raise AuditError(f"a line near the end of {path} is not an audit record: "
                             "run 'applianctl audit verify'")
        records.append(record)
    return records
