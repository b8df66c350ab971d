"""The audit log's writer: append-only, hash-chained, shared by every worker process.

The record format is in record.py, checkpoint signatures in checkpoint.py, reading back in
verify.py, the interface callers use (AuditSink) in sink.py; see also docs/audit.md.

Several processes append to the same file. Each batch of lines is written under an exclusive
`flock` on an O_APPEND descriptor: read the tail (only when the file size is not the one this
process last saw), number and chain the lines, one write, one fdatasync, unlock. Within a
process, one writer thread (appliance.batching) takes every record queued by `append` since its
last batch, so under load one lock and one fsync cover many records (group commit).

Fail closed: `append` returns only once its record is written (and fsynced when `fsync=True`),
and raises AuditError otherwise. A caller about to issue, revoke or change state must treat
AuditError as a refusal: nothing the audit log cannot record may happen.

A torn last record (a writer died mid-write) is cut off and recorded by the next writer, under
the lock (tail_repair.py); `check_chain_sync` is what `serve` runs once at start.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from appliance.audit.checkpoint import (
    Signer,
    certificate_sha256,
    checkpoint_algorithm,
    checkpoint_message,
    verify_signature,
)
from appliance.audit.record import (
    ZERO_HEAD,
    AuditError,
    AuditEvent,
    record_body,
    record_line,
    rfc3339,
    to_json,
)
from appliance.audit.tail_repair import (
    REPAIR_EVENT,
    keep_aside,
    read_torn_tail,
    repair_details,
    scan_tail,
)
from appliance.audit.verify import verify
from appliance.batching import BatchWriter, Outcome
from appliance.fileio import fsync_directory

log = structlog.get_logger("appliance.audit")

MAX_BATCH: Final = 1024


@dataclass
class _Tail:
    """Where the chain ends: the file's identity and size, the last seq and its line's hash."""

    fd: int
    ident: tuple[int, int]  # (st_dev, st_ino)
    size: int
    seq: int
    head: str


@dataclass(frozen=True)
class _Records:
    """Records to append in one write; their caller gets their seqs."""

    bodies: list[bytes]


@dataclass(frozen=True)
class _CheckpointJob:
    """A checkpoint to sign and append; written in a batch of its own, its caller gets its seq."""

    sign: Signer
    certificate: x509.Certificate
    actor: str
    loop: asyncio.AbstractEventLoop  # where `sign` runs


def _is_checkpoint(request: _Records | _CheckpointJob) -> bool:
    return isinstance(request, _CheckpointJob)


class AuditLog:
    """The audit log of one process; any number of processes may append to the same file.

    `await append(event)` queues the record for the writer thread and returns its seq once it is
    written (and fsynced); `append_sync` writes at once, for CLI commands that have no event loop.
    Both raise AuditError when the record cannot be written: the caller must then refuse the
    action it was about to take.
    """

    def __init__(self, path: Path, *, fsync: bool = True,
                 clock: Callable[[], datetime] | None = None,
                 sign_timeout: float = 30.0) -> None:
        self.path = path
        self._fsync = fsync
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sign_timeout = sign_timeout
        self._mutex = threading.Lock()  # the descriptor and the cache, within this process
        self._fd: int | None = None
        self._fd_pid = 0
        self._cache: _Tail | None = None  # the tail as this process last wrote or read it
        self._broken: str | None = None
        self._writer: BatchWriter[_Records | _CheckpointJob, list[int] | int] = BatchWriter(
            "audit-writer", self._run_batch, max_batch=MAX_BATCH, is_barrier=_is_checkpoint,
            closed_error=lambda: AuditError(f"the audit log {self.path} is closed"))

    # -- public API -------------------------------------------------------------------------------
    async def append(self, event: AuditEvent) -> int:
        """Record `event`; return its seq once it is on disk. Raises AuditError (fail closed)."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Record `events` in one write; return their seqs once on disk. Raises AuditError."""
        bodies = [record_body(e.event, e.outcome, e.actor, e.details) for e in events]
        # A dropped client must not cancel the record: it is written regardless.
        seqs = await self._writer.submit(_Records(bodies))
        assert isinstance(seqs, list)
        return seqs

    def append_sync(self, event: AuditEvent) -> int:
        """Record `event` from synchronous code (CLI commands); return its seq. Raises AuditError.

        Not for use inside a running event loop, which it would block: use `await append()`.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("append_sync called inside an event loop; use await append()")
        if self._writer.closed:
            raise AuditError(f"the audit log {self.path} is closed")
        body = record_body(event.event, event.outcome, event.actor, event.details)
        with self._exclusive() as tail:
            return self._write(tail, [body])[0]

    def check_chain_sync(self) -> None:
        """Check the whole chain under the lock, then repair a torn tail; raise AuditError if bad.

        For `serve` at start, once, before any worker writes: it reads the whole file, and other
        writers wait meanwhile. Checkpoint signatures are not checked here (`audit verify` does).
        """
        with self._locked() as (fd, ident, size):
            end, _ = scan_tail(fd, size, self.path)
            result = verify(self.path, (), checkpoint_signatures=False, end=end)
            if not result.ok:
                raise AuditError(f"the audit log {self.path} is broken at {result.reason}; "
                                 "run 'applianctl audit verify'")
            self._tail(fd, ident, size)  # cuts off and records a torn tail

    async def checkpoint(self, sign: Signer, certificate: x509.Certificate, actor: str) -> int:
        """Append a checkpoint signing the chain head with `sign`; return its seq.

        The file stays locked from reading the head until the checkpoint is written, so the
        checkpoint directly follows the head it signs, whatever other processes do; `sign` must
        therefore not append to this log itself. The signature is verified with `certificate`
        before it is written. Raises AuditError.
        """
        checkpoint_algorithm(certificate.public_key())
        if not actor or len(actor) > 256 or not actor.isprintable():
            raise ValueError("audit actor must be 1 to 256 printable characters")
        job = _CheckpointJob(sign, certificate, actor, asyncio.get_running_loop())
        seq = await self._writer.submit(job)
        assert isinstance(seq, int)
        return seq

    async def close(self) -> None:
        """Write what is queued, stop the writer thread and close the file."""
        await self._writer.close()
        with self._mutex:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            self._cache = None

    # -- on the writer thread ---------------------------------------------------------------------
    def _run_batch(self, batch: list[_Records | _CheckpointJob]) -> list[Outcome]:
        first = batch[0]
        if isinstance(first, _CheckpointJob):  # a barrier: always alone in its batch
            return [self._run_checkpoint(first)]
        records = [r for r in batch if isinstance(r, _Records)]
        try:
            with self._exclusive() as tail:
                seqs = self._write(tail, [body for r in records for body in r.bodies])
        except Exception as e:  # noqa: BLE001 - every waiter must hear of it
            message = str(e) if isinstance(e, AuditError) else f"audit write failed: {e!r}"
            return [(None, AuditError(message)) for _ in batch]
        outcomes: list[Outcome] = []
        start = 0
        for r in records:
            end = start + len(r.bodies)
            outcomes.append((seqs[start:end], None))
            start = end
        return outcomes

    def _run_checkpoint(self, job: _CheckpointJob) -> Outcome:
        try:
            with self._exclusive() as tail:
                body = self._checkpoint_body(job, tail)
                return self._write(tail, [body])[0], None
        except Exception as e:  # noqa: BLE001 - the caller must hear of it
            message = str(e) if isinstance(e, AuditError) else f"checkpoint failed: {e!r}"
            return None, AuditError(message)

    def _checkpoint_body(self, job: _CheckpointJob, tail: _Tail) -> bytes:
        """Sign the head (on the caller's event loop) while the file stays locked."""
        message = checkpoint_message(tail.seq, tail.head)
        public_key = job.certificate.public_key()
        alg = checkpoint_algorithm(public_key)

        async def sign() -> bytes:
            return await job.sign(message)

        coroutine = sign()
        try:
            running = asyncio.run_coroutine_threadsafe(coroutine, job.loop)
        except RuntimeError:
            coroutine.close()
            raise AuditError("checkpoint: the caller's event loop is closed") from None
        try:
            signature = running.result(timeout=self._sign_timeout)
        except concurrent.futures.TimeoutError:
            running.cancel()
            raise AuditError(
                f"checkpoint: the signer did not answer within {self._sign_timeout:g} s") from None
        except Exception as e:  # noqa: BLE001 - the signer's failure, reported without internals
            raise AuditError(f"checkpoint: signing failed ({type(e).__name__})") from None
        try:
            verify_signature(public_key, alg, signature, message)
        except InvalidSignature:
            raise AuditError("checkpoint: the signature does not verify with the given "
                             "certificate (wrong key, or the signer uses another scheme "
                             f"than {alg})") from None
        details = {"head": tail.head, "seq": tail.seq, "alg": alg,
                   "signature": base64.b64encode(signature).decode("ascii"),
                   "certificate_sha256": certificate_sha256(job.certificate)}
        return (f'"actor":{to_json(job.actor)},"event":"checkpoint","outcome":"success",'
                f'"details":{to_json(details)}').encode("ascii")

    # -- the critical section ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Tail]:
        """Hold this process's mutex and the file's flock; yield where the chain ends."""
        with self._locked() as (fd, ident, size):
            yield self._tail(fd, ident, size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[int, tuple[int, int], int]]:
        """Hold this process's mutex and the file's flock; yield (fd, identity, size)."""
        with self._mutex:
            if self._broken is not None:
                raise AuditError(self._broken)
            fd, ident, size = self._lock_current_file()
            try:
                yield fd, ident, size
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_current_file(self) -> tuple[int, tuple[int, int], int]:
        """Open (or reopen, after the file was replaced) and flock the file at self.path."""
        stale: int | None = None
        try:
            for _ in range(5):
                fd = self._open()
                if stale is not None:
                    # Closed only now, so the new file cannot get the old inode number (which
                    # would make a deleted-and-recreated log look like one that shrank).
                    os.close(stale)
                    stale = None
                locked = self._lock(fd)
                if locked is not None:
                    return locked
                stale, self._fd = fd, None
        finally:
            if stale is not None:
                os.close(stale)
        raise AuditError(f"the audit log {self.path} keeps being replaced")

    def _lock(self, fd: int) -> tuple[int, tuple[int, int], int] | None:
        """Flock `fd`; None (unlocked) when it is no longer the file at self.path."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise AuditError(f"cannot lock the audit log {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            try:
                on_path = os.stat(self.path)
            except FileNotFoundError:
                on_path = None
        except OSError as e:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise AuditError(f"cannot read the audit log {self.path}: {e.strerror}") from None
        ident = (st.st_dev, st.st_ino)
        if on_path is not None and (on_path.st_dev, on_path.st_ino) == ident:
            return fd, ident, st.st_size
        # Renamed or deleted since we opened it: the log is the file now at self.path.
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None

    def _open(self) -> int:
        if self._fd is not None and self._fd_pid == os.getpid():
            return self._fd
        self._fd = None  # a descriptor inherited over fork shares its flock with the parent
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags | os.O_CREAT, 0o600)
                created = False
            if created and self._fsync:  # make the new directory entry durable too
                fsync_directory(self.path.parent)
        except OSError as e:
            raise AuditError(f"cannot open the audit log {self.path}: {e.strerror}") from None
        self._fd, self._fd_pid = fd, os.getpid()
        return fd

    def _tail(self, fd: int, ident: tuple[int, int], size: int) -> _Tail:
        cached = self._cache
        if cached is not None and cached.ident == ident:
            if cached.size == size:  # nobody else wrote since: no read needed
                return _Tail(fd, ident, size, cached.seq, cached.head)
            if size < cached.size:
                self._broken = (
                    f"the audit log {self.path} shrank from {cached.size} to {size} bytes while "
                    "this process was using it: records were removed. Refusing to write until "
                    "restarted; run 'applianctl audit verify'")
                raise AuditError(self._broken)
        if size == 0 and cached is not None:
            # The file was replaced by an empty one: continue the chain rather than restart it,
            # so that a deleted log shows as a gap instead of a fresh, valid-looking chain.
            return _Tail(fd, ident, 0, cached.seq, cached.head)
        end, line = scan_tail(fd, size, self.path)
        if end < size:
            return self._repair(fd, ident, size, end)
        seq, head = _parse_last_record(line, self.path)
        return _Tail(fd, ident, size, seq, head)

    def _repair(self, fd: int, ident: tuple[int, int], size: int, end: int) -> _Tail:
        """Keep the torn fragment aside, cut it off, fsync, and record that (lock held)."""
        torn = read_torn_tail(fd, end, size, self.path)
        kept = keep_aside(self.path, torn, self._clock(), fsync=self._fsync)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        except OSError as e:
            raise AuditError(f"cannot cut the torn record off the audit log {self.path}: "
                             f"{e.strerror}") from None
        tail = self._tail(fd, ident, end)
        details = repair_details(torn, kept)
        self._write(tail, [record_body(REPAIR_EVENT, "success", f"process:{os.getpid()}",
                                       details)])
        log.warning("audit_tail_repaired", path=str(self.path), **details)
        assert self._cache is not None
        return _Tail(fd, ident, self._cache.size, self._cache.seq, self._cache.head)

    def _write(self, tail: _Tail, bodies: list[bytes]) -> list[int]:
        """Number, chain, write and fsync `bodies` at the end of the locked file."""
        time = rfc3339(self._clock())
        seq, head = tail.seq, tail.head
        lines: list[bytes] = []
        seqs: list[int] = []
        for body in bodies:
            seq += 1
            line = record_line(seq, time, body, head)
            head = hashlib.sha256(line).hexdigest()
            lines.append(line)
            seqs.append(seq)
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                written = os.write(tail.fd, view)
                view = view[written:]
            if self._fsync:
                os.fdatasync(tail.fd)
        except OSError as e:
            # Nothing we could not make durable may stay: callers were told it failed.
            try:
                os.ftruncate(tail.fd, tail.size)
            except OSError:
                self._cache = None  # the next writer reads the tail and cuts a torn one off
            raise AuditError(f"cannot write the audit log {self.path}: {e.strerror}") from None
        self._cache = _Tail(tail.fd, tail.ident, tail.size + len(data), seq, head)
        return seqs


def _parse_last_record(line: bytes, path: Path) -> tuple[int, str]:
    """The seq of the last complete line and the SHA-256 of its bytes; (0, zeros) for none."""
    if not line:
        return 0, ZERO_HEAD
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, TypeError, KeyError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise AuditError(f"the last line of the audit log {path} is not an audit record; "
                         "refusing to write after it: run 'applianctl audit verify'")
    return seq, hashlib.sha256(line).hexdigest()
