"""Embedded SQLite store: WAL, fsync on every commit, and group commit per process.

Every issuance writes twice (intent before the signature, certificate after), and each write
must be durable before the client hears of it. One writer thread per process (a BatchWriter,
appliance/batching.py) takes whatever operations are queued, runs them in a single IMMEDIATE
transaction and commits once: concurrent requests share one fsync, and the database write lock
is held only for the length of that batch. An operation that is refused (a replayed token) has
written nothing and its neighbours commit; one that fails otherwise rolls the batch back, and
each operation is replayed alone, so no fault mixes one operation's half-write into another's.
The tables are declared in schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from appliance.batching import BatchWriter, Outcome
from appliance.errors import StorageError, StoreRefusal
from appliance.storage import (
    AlreadyRevoked,
    CertificateIntent,
    CertificateRecord,
    CertificateUnknown,
    CrlRecord,
    Revocation,
    RevocationRecord,
    TokenReused,
)
from appliance.storage.schema import (
    MIGRATIONS,
    certificates,
    crls,
    revocations,
    schema_migrations,
    used_tokens,
)

T = TypeVar("T")

MAX_BATCH = 256
# A refusal is raised before its op writes anything (TokenReused, AlreadyRevoked ... are all
# StoreRefusals), so the batch can go on; any other exception rolls the batch back.
EXPECTED_REFUSALS = (StoreRefusal, StorageError)

# The issuance path's statements go to the driver directly, inside the writer's transaction:
# SQLAlchemy's statement execution costs several times what SQLite spends on them.
_INSERT_TOKEN = insert(used_tokens)
_SQL_INSERT_JTI = ("INSERT INTO used_tokens (provisioner, jti, expires_at, used_at) "
                     "VALUES (?, ?, ?, ?)")
_SQL_DELETE_JTI = "DELETE FROM used_tokens WHERE provisioner = ? AND jti = ?"
_SQL_INSERT_INTENT = (
    "INSERT INTO certificates (serial, subject, sans, not_before, not_after, provisioner, "
    "status, token_id, der, created_at, issued_at) "
    "VALUES (?, ?, ?, ?, ?, ?, 'intent', ?, NULL, ?, NULL)")
_SQL_MARK_ISSUED = ("UPDATE certificates SET status = 'issued', der = ?, issued_at = ? "
                    "WHERE serial = ?")
_SQL_MARK_FAILED = ("UPDATE certificates SET status = 'failed' "
                    "WHERE serial = ? AND status = 'intent'")


def _driver(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under `conn`, in the writer's open transaction."""
    driver: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    return driver


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _ts(dt: datetime) -> int:
    return int(dt.timestamp())


def _dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class _UnexpectedOpFailure(Exception):
    """An op failed in a way that may have left a partial write: roll the batch back."""


def _commit_failed(e: BaseException) -> StorageError:
    return StorageError(f"the database could not commit: {type(e).__name__}")


def _revocation(row: Any) -> RevocationRecord:
    return RevocationRecord(
        serial=int(row.serial, 16), reason_code=row.reason_code, reason=row.reason,
        revoked_at=_dt(row.revoked_at), provisioner=row.provisioner, method=row.method,
        not_after=_dt(row.not_after))


class SqliteStore:
    """The embedded store. Open with `SqliteStore.open(path)`; close with `await close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine = create_engine(
            f"sqlite:///{path}",
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool,
        )
        event.listen(self._engine, "connect", self._on_connect)
        event.listen(self._engine, "begin", self._on_begin)
        self._writer: BatchWriter[Callable[[Connection], Any], Any] = BatchWriter(
            "db-writer", self._run_batch, max_batch=MAX_BATCH,
            closed_error=lambda: StorageError("the database is closed"),
            thread_context=self._writer_connection)
        self._writer_conn: Connection | None = None
        self._closed = False
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Reads need neither the write lock nor an fsync: under WAL they see the last commit.
        self._read_engine = create_engine(
            f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool)
        event.listen(self._read_engine, "connect", self._on_connect)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-reader")

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        """Open (creating and migrating if needed) the database at `path`."""
        store = cls._migrated(path)
        store._writer.start()
        return store

    @classmethod
    def create(cls, path: Path) -> None:
        """Create and migrate the database without starting a writer (used by init)."""
        store = cls._migrated(path)
        store._release()

    @classmethod
    def _migrated(cls, path: Path) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = cls(path)
        try:
            store._migrate()
        except OperationalError as e:
            store._release()
            raise StorageError(f"cannot open the database {path}: {e.orig}") from None
        return store

    def _release(self) -> None:
        self._reader.shutdown(wait=True)
        self._read_engine.dispose()
        self._engine.dispose()
        os.close(self._lock_fd)

    @staticmethod
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN IMMEDIATE instead of pysqlite's implicit BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @staticmethod
    def _on_begin(conn: Connection) -> None:
        # The writer opens its batch transactions on the driver (_run_in_one_transaction); an op
        # that goes through SQLAlchemy inside one joins it instead of beginning another.
        if not _driver(conn).in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _migrate(self) -> None:
        with self._engine.begin() as conn:
            schema_migrations.create(conn, checkfirst=True)
            done = {r[0] for r in conn.execute(select(schema_migrations.c.version))}
            for migration in MIGRATIONS:
                if migration.version in done:
                    continue
                migration.apply(conn)
                conn.execute(insert(schema_migrations).values(version=migration.version,
                                                               applied_at=int(time.time())))

    def schema_version(self) -> int:
        with self._engine.connect() as conn:
            v = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
            conn.rollback()
        return int(v or 0)

    # -- the writer thread -------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_connection(self) -> Iterator[None]:
        # One SQLAlchemy connection for the writer's whole life: checking one out, beginning and
        # committing through SQLAlchemy cost ~170 us of CPU per transaction, more than the
        # statements of a typical batch (measured: 264 us vs 94 us for a one-row insert).
        with self._engine.connect() as conn:
            self._writer_conn = conn
            try:
                yield
            finally:
                self._writer_conn = None

    def _run_batch(self, batch: list[Callable[[Connection], Any]]) -> list[Outcome]:
        """One transaction for the whole batch, falling back to one per op on a fault.

        Ops are written so that an expected refusal (TokenReused, an unknown serial) is raised
        before they write anything; SQLite statements are atomic, so the batch can go on and
        commit. Any other exception may have left a partial write, so the batch is rolled back
        and each op is replayed alone: a fault never mixes one op's half-write into another's.
        """
        results: list[Outcome]
        try:
            results = self._run_in_one_transaction(batch)
        except _UnexpectedOpFailure:
            results = []
            for op in batch:
                try:
                    results.extend(self._run_in_one_transaction([op]))
                except _UnexpectedOpFailure as e:
                    cause = type(e.__cause__).__name__ if e.__cause__ else "unknown fault"
                    results.append((None, StorageError(f"the database refused the write: {cause}")))
                except Exception as e:  # noqa: BLE001 - the commit failed
                    results.append((None, _commit_failed(e)))
        except Exception as e:  # noqa: BLE001 - the commit itself failed: nothing is durable
            results = [(None, _commit_failed(e))] * len(batch)
        return results

    def _run_in_one_transaction(self, batch: list[Callable[[Connection], Any]]
                                ) -> list[Outcome]:
        results: list[Outcome] = []
        # Writers of several worker processes queue on a flock, which wakes the next one the
        # moment it is released; SQLite's own busy handler would sleep 1..100 ms instead.
        conn = self._writer_conn
        assert conn is not None
        db = _driver(conn)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    try:
                        results.append((op(conn), None))
                    except EXPECTED_REFUSALS as e:
                        results.append((None, e))
                    except Exception as e:
                        raise _UnexpectedOpFailure() from e
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            finally:
                if conn.in_transaction():  # an op went through SQLAlchemy: close its view
                    conn.rollback()  # the driver has no transaction left: nothing is undone
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return results

    async def run_op(self, fn: Callable[[Connection], T]) -> T:
        """Run one storage operation (e.g. from appliance.storage.acme) in the writer."""
        return await self._submit(fn)

    async def run_read(self, fn: Callable[[Connection], T]) -> T:
        """Run a read-only operation on the reader connection (one consistent snapshot)."""
        if self._closed:
            raise StorageError("the database is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._read, fn)

    def _read(self, fn: Callable[[Connection], T]) -> T:
        try:
            with self._read_engine.connect() as conn:
                conn.exec_driver_sql("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.exec_driver_sql("ROLLBACK")
        except OperationalError as e:
            raise StorageError(f"the database could not be read: {type(e.orig).__name__}"
                               ) from None

    async def _submit(self, fn: Callable[[Connection], T]) -> T:
        # A dropped client must not cancel a write halfway: the op runs regardless (shielded).
        return cast(T, await self._writer.submit(fn))

    # -- operations --------------------------------------------------------------------------
    async def reserve(self, intent: CertificateIntent) -> None:
        (error,) = await self.reserve_many([intent])
        if error is not None:
            raise error

    async def reserve_many(self, intents: list[CertificateIntent]
                           ) -> list[TokenReused | StorageError | None]:
        return (await self.record_and_reserve([], intents))[1]

    async def record_certificate(self, serial: int, der: bytes) -> None:
        (error,) = await self.record_certificates([(serial, der)])
        if error is not None:
            raise error

    async def record_certificates(self, signed: list[tuple[int, bytes]]
                                  ) -> list[StorageError | None]:
        return (await self.record_and_reserve(signed, []))[0]

    async def record_and_reserve(
        self, signed: list[tuple[int, bytes]], intents: list[CertificateIntent],
    ) -> tuple[list[StorageError | None], list[TokenReused | StorageError | None]]:
        """In one commit: record signed certificates (serial, DER) of reserved serials, and
        record new intents with their token ids; one outcome per certificate and per intent.

        A replayed token (TokenReused) or a colliding serial (StorageError) refuses that intent
        alone and leaves nothing of it behind; its neighbours are recorded.
        """
        now = int(time.time())
        issued_rows = [(der, now, serial_hex(serial)) for serial, der in signed]
        intent_rows = [(intent, (serial_hex(intent.serial), intent.subject,
                                 json.dumps(list(intent.sans)), _ts(intent.not_before),
                                 _ts(intent.not_after), intent.provisioner))
                       for intent in intents]

        def op(conn: Connection) -> tuple[list[StorageError | None],
                                          list[TokenReused | StorageError | None]]:
            db = _driver(conn)
            recorded: list[StorageError | None] = []
            for row in issued_rows:
                if db.execute(_SQL_MARK_ISSUED, row).rowcount != 1:
                    recorded.append(StorageError(f"serial {row[2]} was never reserved"))
                else:
                    recorded.append(None)
            reserved: list[TokenReused | StorageError | None] = []
            for intent, intent_row in intent_rows:
                tu = intent.token_use
                token_id = None
                if tu is not None:
                    try:
                        db.execute(_SQL_INSERT_JTI,
                                   (tu.provisioner, tu.jti, _ts(tu.expires_at), now))
                    except sqlite3.IntegrityError:
                        reserved.append(TokenReused())  # the statement wrote nothing
                        continue
                    token_id = f"{tu.provisioner}/{tu.jti}"
                try:
                    db.execute(_SQL_INSERT_INTENT, (*intent_row, token_id, now))
                except sqlite3.IntegrityError:
                    # A serial collision after the token id was written: take the id back, so
                    # the token stays usable and nothing of this intent remains.
                    if tu is not None:
                        db.execute(_SQL_DELETE_JTI, (tu.provisioner, tu.jti))
                    reserved.append(StorageError("the database refused the write: "
                                                 "IntegrityError"))
                    continue
                reserved.append(None)
            return recorded, reserved

        return await self._submit(op)

    async def record_failure(self, serial: int) -> None:
        await self.record_failures([serial])

    async def record_failures(self, serials: list[int]) -> None:
        """Mark reserved serials as never signed."""
        rows = [(serial_hex(serial),) for serial in serials]

        def op(conn: Connection) -> None:
            _driver(conn).executemany(_SQL_MARK_FAILED, rows)

        await self._submit(op)

    async def get_certificate(self, serial: int) -> CertificateRecord | None:
        def op(conn: Connection) -> CertificateRecord | None:
            row = conn.execute(select(certificates)
                               .where(certificates.c.serial == serial_hex(serial))).first()
            if row is None:
                return None
            return CertificateRecord(
                serial=int(row.serial, 16), subject=row.subject, sans=tuple(json.loads(row.sans)),
                not_before=_dt(row.not_before), not_after=_dt(row.not_after),
                provisioner=row.provisioner, status=row.status, der=row.der)

        return await self.run_read(op)

    async def count_certificates(self, status: str = "issued") -> int:
        def op(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(certificates)
                                    .where(certificates.c.status == status)).scalar() or 0)

        return await self.run_read(op)

    async def purge_expired_tokens(self, now: datetime) -> int:
        def op(conn: Connection) -> int:
            # A token past exp + leeway can no longer be accepted, so its id need not be kept.
            cutoff = _ts(now) - 120
            return int(conn.execute(delete(used_tokens)
                                    .where(used_tokens.c.expires_at < cutoff)).rowcount)

        return await self._submit(op)

    async def revoke(self, revocation: Revocation) -> None:
        """Record a revocation (and its token id); AlreadyRevoked / NotFound otherwise."""
        now = int(time.time())

        def op(conn: Connection) -> None:
            serial = serial_hex(revocation.serial)
            row = conn.execute(select(certificates.c.status, certificates.c.not_after)
                               .where(certificates.c.serial == serial)).first()
            if row is None or row.status != "issued":
                raise CertificateUnknown(
                    f"no certificate with serial {revocation.serial} was issued by this CA")
            if conn.execute(select(revocations.c.serial)
                            .where(revocations.c.serial == serial)).first() is not None:
                raise AlreadyRevoked(
                    f"certificate with serial {revocation.serial} is already revoked")
            if revocation.token_use is not None:
                tu = revocation.token_use
                try:
                    conn.execute(_INSERT_TOKEN, {
                        "provisioner": tu.provisioner, "jti": tu.jti,
                        "expires_at": _ts(tu.expires_at), "used_at": now})
                except IntegrityError:
                    raise TokenReused() from None
            conn.execute(insert(revocations).values(
                serial=serial, reason_code=revocation.reason_code, reason=revocation.reason,
                revoked_at=_ts(revocation.revoked_at), provisioner=revocation.provisioner,
                method=revocation.method, not_after=row.not_after))

        await self._submit(op)

    async def get_revocation(self, serial: int) -> RevocationRecord | None:
        def op(conn: Connection) -> RevocationRecord | None:
            row = conn.execute(select(revocations)
                               .where(revocations.c.serial == serial_hex(serial))).first()
            return None if row is None else _revocation(row)

        return await self.run_read(op)

    async def unexpired_revocations(self, now: datetime) -> list[RevocationRecord]:
        """Revocations whose certificate has not expired: the entries of the next CRL."""
        def op(conn: Connection) -> list[RevocationRecord]:
            rows = conn.execute(select(revocations).where(revocations.c.not_after >= _ts(now))
                                .order_by(revocations.c.revoked_at))
            return [_revocation(r) for r in rows]

        return await self.run_read(op)

    async def reserve_crl_number(self, this_update: datetime, next_update: datetime) -> int:
        """The next CRL number, reserved durably before the CRL is signed (monotonic)."""
        def op(conn: Connection) -> int:
            current = conn.execute(select(func.max(crls.c.number))).scalar()
            number = int(current or 0) + 1
            conn.execute(insert(crls).values(number=number, this_update=_ts(this_update),
                                             next_update=_ts(next_update), der=None))
            return number

        return await self._submit(op)

    async def record_crl(self, number: int, der: bytes) -> None:
        def op(conn: Connection) -> None:
            conn.execute(update(crls).where(crls.c.number == number).values(der=der))
            # Older signed CRLs are superseded; keep the last few for forensics only.
            conn.execute(delete(crls).where(crls.c.number < number - 10))

        await self._submit(op)

    async def latest_crl(self) -> CrlRecord | None:
        def op(conn: Connection) -> CrlRecord | None:
            row = conn.execute(select(crls).where(crls.c.der.is_not(None))
                               .order_by(crls.c.number.desc()).limit(1)).first()
            if row is None:
                return None
            return CrlRecord(row.number, _dt(row.this_update), _dt(row.next_update), row.der)

        return await self.run_read(op)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        self._release()
