"""Append-only, hash-chained audit log: one JSON record per line, shared by every worker process.

Each line is a record `{"seq","time","actor","event","outcome","details","prev"}` where `prev` is
the SHA-256 (hex) of the previous line's bytes, newline included, and 64 zeros for the first
record. Editing, deleting, reordering or inserting a line breaks the chain at the next record.
A `checkpoint` record carries the issuer key's signature over the chain head, so the records
before it cannot be rewritten without the key either.

Several processes append to the same file. Each batch of lines is written under an exclusive
`flock` on an O_APPEND descriptor: read the tail (only when the file size is not the one this
process last saw), number and chain the lines, one write, one fdatasync, unlock. Within a
process, one writer thread takes every record queued by `append` since its last batch, so under
load one lock and one fsync cover many records (group commit).

Fail closed: `append` returns only once its record is written (and fsynced when `fsync=True`),
and raises AuditError otherwise. A caller about to issue, revoke or change state must treat
AuditError as a refusal: nothing the audit log cannot record may happen.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import enum
import fcntl
import functools
import hashlib
import ipaddress
import json
import os
import queue
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePath
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from appliance.redaction import is_secret_name, without_secrets

Signer = Callable[[bytes], Awaitable[bytes]]
"""Signs a checkpoint message with the issuer key; see `checkpoint_algorithm` for the scheme."""

ZERO_HEAD: Final = "0" * 64
OUTCOMES: Final = frozenset({"success", "failure"})
# The events the appliance writes. Not a closed list (the event name only has to be a lowercase
# dotted word); `checkpoint` is reserved for AuditLog.checkpoint.
EVENTS: Final = frozenset({
    "ca.init", "token.login", "token.logout", "seal", "unseal", "unseal.share",
    "provisioner.change", "policy.change", "cert.issue", "cert.renew", "cert.rekey",
    "cert.revoke", "request.refused", "crl.generate", "config.reload", "server.start",
    "server.stop", "checkpoint", "kms.check",
})
CHECKPOINT_CONTEXT: Final = b"appliance-audit-checkpoint/v1"
MAX_BATCH: Final = 1024
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)*")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = ("seq", "time", "actor", "event", "outcome", "details", "prev")
_CHECKPOINT_FIELDS: Final = frozenset({"head", "seq", "alg", "signature", "certificate_sha256"})


class AuditError(Exception):
    """An audit record could not be written or read; a caller about to act must refuse."""


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened: who did what, whether it worked, and the non-secret facts."""

    event: str
    outcome: str
    actor: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _EVENT_NAME.fullmatch(self.event) or len(self.event) > 64:
            raise ValueError(f"audit event name {self.event!r} is not a lowercase dotted word")
        if self.event == "checkpoint":
            raise ValueError("checkpoint records are written by AuditLog.checkpoint only")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be 'success' or 'failure', not {self.outcome!r}")
        if not self.actor or len(self.actor) > 256 or not self.actor.isprintable():
            raise ValueError("audit actor must be 1 to 256 printable characters")
        if not isinstance(self.details, Mapping):
            raise ValueError("audit details must be a mapping")


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


# -- secrets never reach the log: the one rule of appliance.redaction ----------------------------
is_secret_key = is_secret_name  # the name callers of appliance.audit know it by


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID | PurePath | ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, x509.Name):
        return value.rfc4514_string()
    # bytes are refused on purpose: raw bytes in an audit record are too often key material.
    raise TypeError(f"an audit detail of type {type(value).__name__} is not JSON")


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise AuditError("the audit clock returned a naive datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False,
                      default=_json_default)


def _body(event: str, outcome: str, actor: str, details: Mapping[str, Any]) -> bytes:
    """The middle of a line (actor, event, outcome, details): everything but seq, time, prev."""
    try:
        details_json = _json(without_secrets(details))
    except (TypeError, ValueError) as e:
        raise AuditError(f"audit details for {event} cannot be recorded: {e}") from None
    # ensure_ascii: a name from a CSR cannot smuggle control or bidi characters into a terminal.
    # event and outcome were checked against plain-ASCII patterns, so need no escaping.
    return (f'"actor":{_json_actor(actor)},"event":"{event}","outcome":"{outcome}",'
            f'"details":{details_json}').encode("ascii")


@functools.lru_cache(maxsize=1024)
def _json_actor(actor: str) -> str:
    return _json(actor)


def _line(seq: int, time: str, body: bytes, prev: str) -> bytes:
    # Byte-identical to json.dumps of the record with separators (",", ":"), keys in this order.
    return b'{"seq":%d,"time":"%s",%s,"prev":"%s"}\n' % (seq, time.encode(), body, prev.encode())


# -- checkpoint signatures -----------------------------------------------------------------------
def checkpoint_message(seq: int, head: str) -> bytes:
    """The bytes a checkpoint signs: records 1..seq, whose last line hashes to `head`."""
    return b"%s seq=%d head=%s" % (CHECKPOINT_CONTEXT, seq, head.encode())


def checkpoint_algorithm(public_key: CertificatePublicKeyTypes) -> str:
    """The signature scheme a checkpoint uses for this key.

    EC: "ecdsa-with-SHA256" (DER signature). RSA: "rsa-pss-sha256" (MGF1-SHA256, salt length 32).
    Ed25519: "ed25519". The message always starts with CHECKPOINT_CONTEXT, which no DER
    certificate, CRL or OCSP response does, so the signature cannot stand for one of those.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ecdsa-with-SHA256"
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa-pss-sha256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise AuditError(f"cannot sign checkpoints with a {type(public_key).__name__}")


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign_message(key: PrivateKeyTypes, message: bytes) -> bytes:
    """Sign a checkpoint message with `key` (a token key from hsm.keys, or a software key).

    The server's Signer runs this on the PKCS#11 thread; tests run it on software keys.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _pss(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise AuditError(f"cannot sign checkpoints with a {type(key).__name__}")


def _verify_signature(public_key: CertificatePublicKeyTypes, alg: str, signature: bytes,
                      message: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `alg` over `message` by `public_key`."""
    if alg != checkpoint_algorithm(public_key):
        raise InvalidSignature(f"alg {alg} does not fit the certificate's key")
    verify_message(public_key, signature, message)


def verify_message(public_key: CertificatePublicKeyTypes, signature: bytes,
                   message: bytes) -> None:
    """Raise InvalidSignature unless `sign_message` with the matching key made `signature`."""
    checkpoint_algorithm(public_key)  # AuditError for a key type it cannot sign with
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, message, _pss(), hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, message)


def certificate_sha256(certificate: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER, as in checkpoint details."""
    return certificate.fingerprint(hashes.SHA256()).hex()


# -- the writer ----------------------------------------------------------------------------------
@dataclass
class _Tail:
    """Where the chain ends: the file's identity and size, the last seq and its line's hash."""

    fd: int
    ident: tuple[int, int]  # (st_dev, st_ino)
    size: int
    seq: int
    head: str


@dataclass
class _Pending:
    bodies: list[bytes]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[int]]


@dataclass
class _CheckpointJob:
    sign: Signer
    certificate: x509.Certificate
    actor: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]


def _settle_all(settled: list[tuple[asyncio.Future[list[int]], list[int]]]) -> None:
    for future, seqs in settled:
        if not future.done():
            future.set_result(seqs)


def _settle(future: asyncio.Future[Any], result: Any, error: AuditError | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


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
        self._queue: queue.SimpleQueue[_Pending | _CheckpointJob | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- public API -------------------------------------------------------------------------------
    async def append(self, event: AuditEvent) -> int:
        """Record `event`; return its seq once it is on disk. Raises AuditError (fail closed)."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Record `events` in one write; return their seqs once on disk. Raises AuditError."""
        bodies = [_body(e.event, e.outcome, e.actor, e.details) for e in events]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._submit(_Pending(bodies, loop, future))
        # A dropped client must not cancel the record: it is written regardless.
        return await asyncio.shield(future)

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
        if self._closed:
            raise AuditError(f"the audit log {self.path} is closed")
        body = _body(event.event, event.outcome, event.actor, event.details)
        with self._exclusive() as tail:
            return self._write(tail, [body])[0]

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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._submit(_CheckpointJob(sign, certificate, actor, loop, future))
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Write what is queued, stop the writer thread and close the file."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        with self._mutex:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            self._cache = None

    # -- the writer thread ------------------------------------------------------------------------
    def _submit(self, item: _Pending | _CheckpointJob) -> None:
        with self._submit_lock:
            if self._closed:
                raise AuditError(f"the audit log {self.path} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer",
                                                daemon=True)
                self._thread.start()
            self._queue.put(item)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _CheckpointJob):
                self._run_checkpoint(item)
                continue
            batch = [item]
            checkpoint: _CheckpointJob | None = None
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if isinstance(nxt, _CheckpointJob):
                    checkpoint = nxt  # after this batch, to keep the queue's order
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if checkpoint is not None:
                self._run_checkpoint(checkpoint)

    def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            with self._exclusive() as tail:
                seqs = self._write(tail, [body for p in batch for body in p.bodies])
        except Exception as e:  # noqa: BLE001 - every waiter must hear of it, or it hangs
            message = str(e) if isinstance(e, AuditError) else f"audit write failed: {e!r}"
            for p in batch:
                _call_soon(p.loop, _settle, p.future, None, AuditError(message))
            return
        # One wake-up per event loop, not per record.
        by_loop: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[list[int]], list[int]]]] = {}
        start = 0
        for p in batch:
            end = start + len(p.bodies)
            by_loop.setdefault(p.loop, []).append((p.future, seqs[start:end]))
            start = end
        for loop, settled in by_loop.items():
            _call_soon(loop, _settle_all, settled)

    def _run_checkpoint(self, job: _CheckpointJob) -> None:
        try:
            with self._exclusive() as tail:
                body = self._checkpoint_body(job, tail)
                seq = self._write(tail, [body])[0]
        except Exception as e:  # noqa: BLE001 - the caller must hear of it
            message = str(e) if isinstance(e, AuditError) else f"checkpoint failed: {e!r}"
            _call_soon(job.loop, _settle, job.future, None, AuditError(message))
            return
        _call_soon(job.loop, _settle, job.future, seq, None)

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
            _verify_signature(public_key, alg, signature, message)
        except InvalidSignature:
            raise AuditError("checkpoint: the signature does not verify with the given "
                             "certificate (wrong key, or the signer uses another scheme "
                             f"than {alg})") from None
        details = {"head": tail.head, "seq": tail.seq, "alg": alg,
                   "signature": base64.b64encode(signature).decode("ascii"),
                   "certificate_sha256": certificate_sha256(job.certificate)}
        return (f'"actor":{_json(job.actor)},"event":"checkpoint","outcome":"success",'
                f'"details":{_json(details)}').encode("ascii")

    # -- the critical section ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Tail]:
        """Hold this process's mutex and the file's flock; yield where the chain ends."""
        with self._mutex:
            if self._broken is not None:
                raise AuditError(self._broken)
            fd, ident, size = self._lock_current_file()
            try:
                yield self._tail(fd, ident, size)
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
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
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
        seq, head = _read_last_record(fd, size, self.path)
        return _Tail(fd, ident, size, seq, head)

    def _write(self, tail: _Tail, bodies: list[bytes]) -> list[int]:
        """Number, chain, write and fsync `bodies` at the end of the locked file."""
        time = _rfc3339(self._clock())
        seq, head = tail.seq, tail.head
        lines: list[bytes] = []
        seqs: list[int] = []
        for body in bodies:
            seq += 1
            line = _line(seq, time, body, head)
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
                self._cache = None  # the next writer reads the tail and refuses a torn one
            raise AuditError(f"cannot write the audit log {self.path}: {e.strerror}") from None
        self._cache = _Tail(tail.fd, tail.ident, tail.size + len(data), seq, head)
        return seqs


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody is waiting
        loop.call_soon_threadsafe(fn, *args)


def _read_last_record(fd: int, size: int, path: Path) -> tuple[int, str]:
    """The seq of the last line and the SHA-256 of its bytes; (0, zeros) for an empty file."""
    if size == 0:
        return 0, ZERO_HEAD
    chunk = 4096
    try:
        while True:
            start = max(0, size - chunk)
            data = os.pread(fd, size - start, start)
            if len(data) != size - start:
                raise AuditError(f"the audit log {path} changed while being read")
            if not data.endswith(b"\n"):
                raise AuditError(
                    f"the audit log {path} ends with an incomplete record (a write was cut "
                    "short); refusing to write after it: see docs/audit.md, 'Repair'")
            newline = data.rfind(b"\n", 0, len(data) - 1)
            if newline >= 0 or start == 0:
                line = data[newline + 1:]
                break
            chunk *= 4
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, TypeError, KeyError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise AuditError(f"the last line of the audit log {path} is not an audit record; "
                         "refusing to write after it: run 'applianctl audit verify'")
    return seq, hashlib.sha256(line).hexdigest()


# -- reading ------------------------------------------------------------------------------------
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
    if tuple(record) != _FIELDS:
        return f"the fields are not {', '.join(_FIELDS)} in that order"
    if not _is_int(record["seq"]) or record["seq"] < 1:
        return "seq is not a positive integer"
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        return "time is not UTC RFC 3339 with microseconds"
    if not isinstance(record["actor"], str) or not record["actor"]:
        return "actor is not a string"
    if not isinstance(record["event"], str) or not _EVENT_NAME.fullmatch(record["event"]):
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
                 previous_head: str | None) -> None:
        self.by_fingerprint = {certificate_sha256(c): c for c in certificates}
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
        self.head = hashlib.sha256(line).hexdigest()
        self.expected_seq = seq + 1
        self.records += 1
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        return None

    def _checkpoint_problem(self, record: dict[str, Any]) -> str | None:
        details: dict[str, Any] = record["details"]
        if set(details) != _CHECKPOINT_FIELDS or not all(
                isinstance(details[k], str) for k in _CHECKPOINT_FIELDS - {"seq"}):
            return "checkpoint details are not head, seq, alg, signature, certificate_sha256"
        if details["head"] != record["prev"]:
            return "checkpoint head is not the SHA-256 of the line before it"
        if not _is_int(details["seq"]) or details["seq"] != record["seq"] - 1:
            return "checkpoint seq is not the seq of the record before it"
        certificate = self.by_fingerprint.get(details["certificate_sha256"])
        if certificate is None:
            return (f"checkpoint signed by certificate {details['certificate_sha256'][:16]}…, "
                    "which is not among the certificates given to verify")
        try:
            signature = base64.b64decode(details["signature"], validate=True)
            _verify_signature(certificate.public_key(), details["alg"], signature,
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
           previous_head: str | None = None) -> VerifyResult:
    """Check the whole chain and every checkpoint signature; report the first bad record.

    A checkpoint's certificate is chosen among `certificates` by its SHA-256. `previous_head`
    is for a file that continues an earlier one: the SHA-256 of that file's last line.
    `ok` stays True when the chain is intact but its last records are not yet covered by a
    checkpoint; `reason` then says which. Raises AuditError when the file cannot be read.
    """
    check = _ChainCheck(certificates, previous_head)
    lineno = 0
    try:
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                record = _parse_record(line)
                reason = check.check(line, lineno, record)
                if reason is not None:
                    seq = record.get("seq") if record is not None else None
                    bad_seq = seq if _is_int(seq) else check.expected_seq
                    where = (f"record {bad_seq} (line {lineno})" if bad_seq is not None
                             else f"line {lineno}")
                    return VerifyResult(False, check.records, check.checkpoints, bad_seq, lineno,
                                        f"{where}: {reason}", check.last_checkpoint_seq)
    except OSError as e:
        raise AuditError(f"cannot read the audit log {path}: {e.strerror}") from None
    return VerifyResult(True, check.records, check.checkpoints, None, None,
                        check.coverage_note(lineno), check.last_checkpoint_seq)


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
