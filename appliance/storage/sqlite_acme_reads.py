"""The fast read path of the SQLite ACME store: lookups on the event loop's own connection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

T = TypeVar("T")

# What operations get: the store's SQLAlchemy connection (writer, reader thread) or the
# sqlite3 connection of an AcmeReader; either way inside an open transaction or snapshot.
Db = Connection | sqlite3.Connection
# A row as the driver returns it (its columns are typed by the SELECT that made it).
Row = tuple[Any, ...]
NA, NO, NC = 8, 12, 7  # columns of an account, an order, a challenge


def driver(conn: Db) -> sqlite3.Connection:
    """The sqlite3 connection under `conn`."""
    if isinstance(conn, sqlite3.Connection):
        return conn
    db: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    return db


def fetch_one(conn: Db, sql: str, params: tuple[object, ...]) -> Row | None:
    cursor = driver(conn).execute(sql, params)
    try:
        row: Row | None = cursor.fetchone()
        return row
    finally:
        cursor.close()


def fetch_all(conn: Db, sql: str, params: tuple[object, ...]) -> list[Row]:
    rows: list[Row] = driver(conn).execute(sql, params).fetchall()
    return rows


class AcmeReader:
    """ACME lookups made on the calling (event loop) thread, on a read-only connection.

    Every lookup of an ACME request is a primary-key read in a small table that SQLite answers
    from its page cache in tens of microseconds, while a trip to the store's reader thread costs
    about ten times that in CPU (a thread hop both ways, SQLAlchemy's connection wrapper, GIL
    hand-offs). Under WAL a reader never waits for the writer; should SQLite still want to wait
    (busy_timeout is 0 here, so it says so at once), or the connection not open, the lookup
    goes to the store's reader thread instead. Open and use it in one thread only.
    """

    def __init__(self, path: Path, fallback: Callable[[Callable[[Connection], T]], Awaitable[T]]
                 ) -> None:
        self._path = path
        self._fallback: Callable[[Callable[[Connection], Any]], Awaitable[Any]] = fallback
        self._db: sqlite3.Connection | None = None
        self._unavailable = False

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is None and not self._unavailable:
            try:
                self._db = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=ro", uri=True,
                                           timeout=0, isolation_level=None)
            except sqlite3.Error:
                self._unavailable = True
        return self._db

    async def read(self, op: Callable[[Db], T], *, one_statement: bool = False) -> T:
        """Run a read operation in one snapshot.

        An operation that runs a single SELECT (`one_statement`) is a snapshot by itself, so it
        runs without BEGIN and ROLLBACK around it.
        """
        db = self._connection()
        if db is not None:
            try:
                if one_statement:
                    return op(db)
                db.execute("BEGIN")
                try:
                    return op(db)
                finally:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                # Busy (never waited for here) or failing: the reader thread may wait, and
                # reports a failure as the store does.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
        result: T = await self._fallback(op)
        return result

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
