"""ACME state: accounts, orders, authorizations, challenges, nonces, EAB keys.

Everything lives in the database so that a restart loses nothing and every worker process sees
the same state. Status transitions that must not race (a challenge starting validation, an order
starting finalization, an EAB key being bound) are single conditional UPDATEs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

# The tables are declared once, with every other table, in appliance.storage.schema.
from appliance.storage.schema import (  # noqa: F401 - re-exported for the ACME callers
    acme_accounts,
    acme_authzs,
    acme_challenges,
    acme_eab_keys,
    acme_nonces,
    acme_orders,
    acme_secrets,
)
from appliance.storage.schema import metadata as meta  # noqa: F401

T = TypeVar("T")



def new_id() -> str:
    return secrets.token_urlsafe(16)


def _dt(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class AcmeAccount:
    id: str
    provisioner: str
    thumbprint: str
    jwk: dict[str, Any]
    status: str
    contact: list[str]
    eab_kid: str | None
    created_at: int


@dataclass(frozen=True)
class AcmeChallenge:
    id: str
    authz_id: str
    type: str
    token: str
    status: str
    validated: int | None
    error: dict[str, Any] | None


@dataclass(frozen=True)
class AcmeAuthz:
    id: str
    order_id: str
    account_id: str
    identifier_type: str
    identifier_value: str
    wildcard: bool
    status: str
    expires: int
    challenges: list[AcmeChallenge] = field(default_factory=list)


@dataclass(frozen=True)
class AcmeOrder:
    id: str
    provisioner: str
    account_id: str
    status: str
    expires: int
    identifiers: list[dict[str, str]]
    not_before: int | None
    not_after: int | None
    authz_ids: list[str]
    error: dict[str, Any] | None
    cert_serial: str | None
    replaces: str | None


@dataclass(frozen=True)
class EabKey:
    kid: str
    provisioner: str
    reference: str | None
    hmac_key: bytes
    created_at: int
    account_id: str | None
    bound_at: int | None


class AcmeConflict(Exception):
    """A uniqueness rule was hit (an account for this key exists, an EAB reference is taken)."""


# Every operation runs its SQL on the driver's connection inside the transaction (writer) or
# snapshot (reader) the store opened: fixed SQL strings cost SQLite's time only, where building
# and executing a SQLAlchemy statement cost ~20 times more per call (measured: ~300 us against
# ~12 us for a primary-key lookup), and one ACME issuance makes about 25 such calls.
_SELECT_ACCOUNT = ("SELECT id, provisioner, thumbprint, jwk, status, contact, eab_kid, "
                   "created_at FROM acme_accounts ")
_SQL_ACCOUNT_BY_ID = _SELECT_ACCOUNT + "WHERE id = ? AND provisioner = ?"
_SQL_ACCOUNT_BY_THUMBPRINT = _SELECT_ACCOUNT + "WHERE provisioner = ? AND thumbprint = ?"
_SQL_ORDER = ("SELECT id, provisioner, account_id, status, expires, identifiers, not_before, "
              "not_after, authz_ids, error, cert_serial, replaces FROM acme_orders WHERE id = ?")
_SQL_AUTHZ = ("SELECT id, order_id, account_id, identifier_type, identifier_value, wildcard, "
              "status, expires FROM acme_authzs WHERE id = ?")
_SELECT_CHALLENGE = ("SELECT id, authz_id, type, token, status, validated, error "
                     "FROM acme_challenges ")
_SQL_AUTHZ_CHALLENGES = _SELECT_CHALLENGE + "WHERE authz_id = ? ORDER BY type"
_SQL_CHALLENGE = _SELECT_CHALLENGE + "WHERE id = ?"
_SELECT_EAB = ("SELECT kid, provisioner, reference, hmac_key, created_at, account_id, bound_at "
               "FROM acme_eab_keys ")
_SQL_USE_NONCE = "INSERT INTO acme_nonces (nonce, expires_at) VALUES (?, ?)"
_SQL_INSERT_ORDER = (
    "INSERT INTO acme_orders (id, provisioner, account_id, status, expires, identifiers, "
    "not_before, not_after, authz_ids, error, cert_serial, replaces, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)")
_SQL_INSERT_AUTHZ = (
    "INSERT INTO acme_authzs (id, order_id, account_id, identifier_type, identifier_value, "
    "wildcard, status, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_INSERT_CHALLENGE = (
    "INSERT INTO acme_challenges (id, authz_id, type, token, status, validated, error) "
    "VALUES (?, ?, ?, ?, ?, NULL, NULL)")
_SQL_START_CHALLENGE = ("UPDATE acme_challenges SET status = 'processing' "
                        "WHERE id = ? AND status = 'pending'")
_SQL_FINISH_CHALLENGE = ("UPDATE acme_challenges SET status = ?, validated = ?, error = ? "
                         "WHERE id = ?")
_SQL_SETTLE_AUTHZ = "UPDATE acme_authzs SET status = ? WHERE id = ? AND status = 'pending'"
_SQL_START_FINALIZE = ("UPDATE acme_orders SET status = 'processing' "
                       "WHERE id = ? AND status = 'ready'")


# What operations get: the store's SQLAlchemy connection (writer, reader thread) or the
# sqlite3 connection of an AcmeReader; either way inside an open transaction or snapshot.
Db = Connection | sqlite3.Connection


def _driver(conn: Db) -> sqlite3.Connection:
    """The sqlite3 connection under `conn`."""
    if isinstance(conn, sqlite3.Connection):
        return conn
    driver: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    return driver


class AcmeReader:
    """ACME lookups made on the calling (event loop) thread, on a read-only connection.

    Every lookup of an ACME request is a primary-key read in a small table that SQLite answers
    from its page cache in tens of microseconds, while a trip to the store's reader thread costs
    about ten times that in CPU (a thread hop both ways, SQLAlchemy's connection wrapper, GIL
    hand-offs). Under WAL a reader never waits for the writer; should SQLite still want to wait
    (busy_timeout is 0 here, so it says so at once), or the connection not open, the lookup
    goes to the store's reader thread instead. Open and use it in one thread only.
    """

    def __init__(self, path: Path, fallback: Callable[[Callable[[Db], Any]], Awaitable[Any]]
                 ) -> None:
        self._path = path
        self._fallback = fallback
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


def _one(conn: Db, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    cursor = _driver(conn).execute(sql, params)
    try:
        row: tuple[Any, ...] | None = cursor.fetchone()
        return row
    finally:
        cursor.close()


def _all(conn: Db, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = _driver(conn).execute(sql, params).fetchall()
    return rows


def _write(conn: Db, sql: str, params: tuple[Any, ...]) -> int:
    """Run one INSERT/UPDATE/DELETE; the number of rows it changed."""
    return int(_driver(conn).execute(sql, params).rowcount)


def _account(row: tuple[Any, ...]) -> AcmeAccount:
    return AcmeAccount(row[0], row[1], row[2], json.loads(row[3]), row[4], json.loads(row[5]),
                       row[6], row[7])


def _order(row: tuple[Any, ...]) -> AcmeOrder:
    return AcmeOrder(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7],
                     json.loads(row[8]), json.loads(row[9]) if row[9] else None, row[10],
                     row[11])


def _challenge(row: tuple[Any, ...]) -> AcmeChallenge:
    return AcmeChallenge(row[0], row[1], row[2], row[3], row[4], row[5],
                         json.loads(row[6]) if row[6] else None)


def _eab(row: tuple[Any, ...]) -> EabKey:
    return EabKey(row[0], row[1], row[2], bytes(row[3]), row[4], row[5], row[6])


def _read_authz(conn: Db, authz_id: str) -> AcmeAuthz | None:
    row = _one(conn, _SQL_AUTHZ, (authz_id,))
    if row is None:
        return None
    chals = [_challenge(c) for c in _all(conn, _SQL_AUTHZ_CHALLENGES, (authz_id,))]
    return AcmeAuthz(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7], chals)


def _read_order(conn: Db, order_id: str) -> AcmeOrder | None:
    row = _one(conn, _SQL_ORDER, (order_id,))
    return None if row is None else _order(row)


def _refresh_order_status(conn: Db, order_id: str) -> None:
    """pending -> ready when every authorization is valid; -> invalid when one is invalid."""
    order = _one(conn, "SELECT status FROM acme_orders WHERE id = ?", (order_id,))
    if order is None or order[0] != "pending":
        return
    statuses = [r[0] for r in _all(conn, "SELECT status FROM acme_authzs WHERE order_id = ?",
                                   (order_id,))]
    if any(s in ("invalid", "deactivated", "revoked", "expired") for s in statuses):
        new = "invalid"
    elif statuses and all(s == "valid" for s in statuses):
        new = "ready"
    else:
        return
    _write(conn, "UPDATE acme_orders SET status = ? WHERE id = ? AND status = 'pending'",
           (new, order_id))


# -- operations (each runs inside the store's writer thread, in a transaction) ---------------
def op_get_secret(name: str, size: int = 32) -> Any:
    def op(conn: Db) -> bytes:
        row = _one(conn, "SELECT value FROM acme_secrets WHERE name = ?", (name,))
        if row is not None:
            return bytes(row[0])
        value = secrets.token_bytes(size)
        _write(conn, "INSERT INTO acme_secrets (name, value) VALUES (?, ?)", (name, value))
        return value
    return op


def _use_nonce(conn: Db, nonce: str, expires_at: int) -> bool:
    try:
        _write(conn, _SQL_USE_NONCE, (nonce, expires_at))
    except sqlite3.IntegrityError:
        return False  # used before; the failed statement wrote nothing
    return True


def op_use_nonce(nonce: str, expires_at: int) -> Any:
    def op(conn: Db) -> bool:
        return _use_nonce(conn, nonce, expires_at)
    return op


def op_with_nonce(nonce: str, expires_at: int, then: Callable[[Db], T]
                  ) -> Callable[[Db], tuple[bool, T | None]]:
    """Use the nonce and, only if it was unused, run `then` in the same transaction.

    (False, None) for a replayed nonce, with nothing written; else (True, then's result). So
    a request's nonce and the state change it authorizes are durable in one commit. `then`
    must return its refusals rather than raise them, since the nonce is written by then.
    """
    def op(conn: Db) -> tuple[bool, T | None]:
        if not _use_nonce(conn, nonce, expires_at):
            return False, None
        return True, then(conn)
    return op


def op_purge(now: int) -> Any:
    def op(conn: Db) -> int:
        n = _write(conn, "DELETE FROM acme_nonces WHERE expires_at < ?", (now,))
        expired = _write(
            conn, "UPDATE acme_orders SET status = 'invalid', error = ? "
                  "WHERE expires < ? AND status IN ('pending', 'ready')",
            (json.dumps({"type": "urn:ietf:params:acme:error:malformed",
                         "detail": "the order expired"}), now))
        return n + expired
    return op


def op_create_account(account: AcmeAccount, eab_kid: str | None) -> Any:
    def op(conn: Db) -> AcmeAccount:
        existing = _one(conn, _SQL_ACCOUNT_BY_THUMBPRINT, (account.provisioner,
                                                           account.thumbprint))
        if existing is not None:
            return _account(existing)
        if eab_kid is not None:
            bound = _write(conn, "UPDATE acme_eab_keys SET account_id = ?, bound_at = ? "
                                 "WHERE kid = ? AND provisioner = ? AND account_id IS NULL",
                           (account.id, int(time.time()), eab_kid, account.provisioner))
            if bound != 1:
                raise AcmeConflict("the external account key is unknown or already bound")
        _write(conn, "INSERT INTO acme_accounts (id, provisioner, thumbprint, jwk, status, "
                     "contact, eab_kid, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (account.id, account.provisioner, account.thumbprint, json.dumps(account.jwk),
                account.status, json.dumps(account.contact), eab_kid, account.created_at))
        return account
    return op


def op_find_account(provisioner: str, *, account_id: str | None = None,
                    thumbprint: str | None = None) -> Any:
    def op(conn: Db) -> AcmeAccount | None:
        if account_id is not None and thumbprint is not None:
            row = _one(conn, _SQL_ACCOUNT_BY_ID + " AND thumbprint = ?",
                       (account_id, provisioner, thumbprint))
        elif account_id is not None:
            row = _one(conn, _SQL_ACCOUNT_BY_ID, (account_id, provisioner))
        elif thumbprint is not None:
            row = _one(conn, _SQL_ACCOUNT_BY_THUMBPRINT, (provisioner, thumbprint))
        else:
            row = _one(conn, _SELECT_ACCOUNT + "WHERE provisioner = ? LIMIT 1", (provisioner,))
        return None if row is None else _account(row)
    return op


def op_update_account(account_id: str, *, contact: list[str] | None = None,
                      status: str | None = None, jwk: dict[str, Any] | None = None,
                      thumbprint: str | None = None) -> Any:
    new_key = jwk is not None and thumbprint is not None
    # NULL keeps a column as it is.
    values = (None if contact is None else json.dumps(contact), status,
              json.dumps(jwk) if new_key else None, thumbprint if new_key else None)

    def op(conn: Db) -> AcmeAccount:
        if any(v is not None for v in values):
            try:
                _write(conn, "UPDATE acme_accounts SET contact = COALESCE(?, contact), "
                             "status = COALESCE(?, status), jwk = COALESCE(?, jwk), "
                             "thumbprint = COALESCE(?, thumbprint) WHERE id = ?",
                       (*values, account_id))
            except sqlite3.IntegrityError:
                raise AcmeConflict("another account already uses that key") from None
            if status == "deactivated":
                # RFC 8555 §7.3.6: pending authorizations of a deactivated account go too.
                _write(conn, "UPDATE acme_authzs SET status = 'deactivated' "
                             "WHERE account_id = ? AND status = 'pending'", (account_id,))
        row = _one(conn, _SELECT_ACCOUNT + "WHERE id = ?", (account_id,))
        if row is None:
            raise LookupError(f"no ACME account {account_id}")
        return _account(row)
    return op


def op_create_order(order: AcmeOrder, authzs: list[AcmeAuthz]) -> Any:
    order_row = (order.id, order.provisioner, order.account_id, order.status, order.expires,
                 json.dumps(order.identifiers), order.not_before, order.not_after,
                 json.dumps(order.authz_ids), order.replaces, int(time.time()))
    authz_rows = [(a.id, a.order_id, a.account_id, a.identifier_type, a.identifier_value,
                   int(a.wildcard), a.status, a.expires) for a in authzs]
    challenge_rows = [(c.id, c.authz_id, c.type, c.token, c.status)
                      for a in authzs for c in a.challenges]

    def op(conn: Db) -> AcmeOrder:
        db = _driver(conn)
        db.execute(_SQL_INSERT_ORDER, order_row).close()
        db.executemany(_SQL_INSERT_AUTHZ, authz_rows).close()
        db.executemany(_SQL_INSERT_CHALLENGE, challenge_rows).close()
        return order
    return op


def op_get_order(order_id: str) -> Any:
    def op(conn: Db) -> AcmeOrder | None:
        return _read_order(conn, order_id)
    return op


def op_list_orders(account_id: str) -> Any:
    def op(conn: Db) -> list[str]:
        rows = _all(conn, "SELECT id FROM acme_orders WHERE account_id = ? ORDER BY created_at",
                    (account_id,))
        return [r[0] for r in rows]
    return op


def op_get_authz(authz_id: str) -> Any:
    def op(conn: Db) -> AcmeAuthz | None:
        return _read_authz(conn, authz_id)
    return op


def op_get_challenge(challenge_id: str) -> Any:
    def op(conn: Db) -> AcmeChallenge | None:
        row = _one(conn, _SQL_CHALLENGE, (challenge_id,))
        return None if row is None else _challenge(row)
    return op


# -- an account with what a request names, in one statement ------------------------------------
# Each authenticated ACME request reads its account and the object its URL names. As one SELECT
# (the account LEFT JOINed with the object) it is one consistent snapshot by itself: no
# BEGIN/ROLLBACK around it, and one trip into SQLite instead of four or five, each of which lets
# go of the GIL and may have to wait to get it back from the writer or the PKCS#11 thread.
# The _NA columns of an account, then those of the object a request names.
_SELECT_JOINED_ACCOUNT = ("SELECT a.id, a.provisioner, a.thumbprint, a.jwk, a.status, "
                          "a.contact, a.eab_kid, a.created_at, ")
_JOINED_ORDER_COLUMNS = ("o.id, o.provisioner, o.account_id, o.status, o.expires, "
                         "o.identifiers, o.not_before, o.not_after, o.authz_ids, o.error, "
                         "o.cert_serial, o.replaces")
_SQL_ACCOUNT_ORDER = (
    _SELECT_JOINED_ACCOUNT + _JOINED_ORDER_COLUMNS + " "
    "FROM acme_accounts a LEFT JOIN acme_orders o ON o.id = ? "
    "WHERE a.id = ? AND a.provisioner = ?")
# The certificates table is the store's; cert_serial is its key (lowercase hex).
_SQL_ACCOUNT_ORDER_DER = (
    _SELECT_JOINED_ACCOUNT + _JOINED_ORDER_COLUMNS + ", k.der "
    "FROM acme_accounts a LEFT JOIN acme_orders o ON o.id = ? "
    "LEFT JOIN certificates k ON k.serial = o.cert_serial "
    "WHERE a.id = ? AND a.provisioner = ?")
_SQL_ACCOUNT_AUTHZ = (
    _SELECT_JOINED_ACCOUNT + "z.id, z.order_id, z.account_id, z.identifier_type, "
    "z.identifier_value, z.wildcard, z.status, z.expires, c.id, c.authz_id, c.type, c.token, "
    "c.status, c.validated, c.error "
    "FROM acme_accounts a LEFT JOIN acme_authzs z ON z.id = ? "
    "LEFT JOIN acme_challenges c ON c.authz_id = z.id "
    "WHERE a.id = ? AND a.provisioner = ? ORDER BY c.type")
_SQL_ACCOUNT_CHALLENGE = (
    _SELECT_JOINED_ACCOUNT + "t.id, t.authz_id, t.type, t.token, t.status, t.validated, "
    "t.error, "
    "z.id, z.order_id, z.account_id, z.identifier_type, z.identifier_value, z.wildcard, "
    "z.status, z.expires, c.id, c.authz_id, c.type, c.token, c.status, c.validated, c.error "
    "FROM acme_accounts a LEFT JOIN acme_challenges t ON t.id = ? "
    "LEFT JOIN acme_authzs z ON z.id = t.authz_id "
    "LEFT JOIN acme_challenges c ON c.authz_id = z.id "
    "WHERE a.id = ? AND a.provisioner = ? ORDER BY c.type")
_NA, _NO, _NZ, _NC = 8, 12, 8, 7  # columns of an account, order, authorization, challenge

AccountRead = Callable[[Db], tuple[AcmeAccount | None, Any]]


def _authz_from(rows: list[tuple[Any, ...]], at: int) -> AcmeAuthz | None:
    """The authorization at column `at` of joined rows, with the challenges that follow it."""
    first = rows[0]
    if first[at] is None:
        return None
    chals = [_challenge(r[at + _NZ:at + _NZ + _NC]) for r in rows if r[at + _NZ] is not None]
    return AcmeAuthz(first[at], first[at + 1], first[at + 2], first[at + 3], first[at + 4],
                     bool(first[at + 5]), first[at + 6], first[at + 7], chals)


def op_account_and_order(provisioner: str, account_id: str, order_id: str) -> AccountRead:
    """(the account, the order), read as one; (None, None) without such an account."""
    def op(conn: Db) -> tuple[AcmeAccount | None, AcmeOrder | None]:
        row = _one(conn, _SQL_ACCOUNT_ORDER, (order_id, account_id, provisioner))
        if row is None:
            return None, None
        return _account(row), None if row[_NA] is None else _order(row[_NA:])
    return op


def op_account_and_order_with_certificate(provisioner: str, account_id: str, order_id: str
                                          ) -> AccountRead:
    """(the account, (the order, its certificate's DER or None)), read as one."""
    def op(conn: Db) -> tuple[AcmeAccount | None, tuple[AcmeOrder | None, bytes | None]]:
        row = _one(conn, _SQL_ACCOUNT_ORDER_DER, (order_id, account_id, provisioner))
        if row is None:
            return None, (None, None)
        order = None if row[_NA] is None else _order(row[_NA:_NA + _NO])
        der = row[_NA + _NO]
        return _account(row), (order, None if order is None or der is None else bytes(der))
    return op


def op_account_and_authz(provisioner: str, account_id: str, authz_id: str) -> AccountRead:
    """(the account, the authorization with its challenges), read as one."""
    def op(conn: Db) -> tuple[AcmeAccount | None, AcmeAuthz | None]:
        rows = _all(conn, _SQL_ACCOUNT_AUTHZ, (authz_id, account_id, provisioner))
        if not rows:
            return None, None
        return _account(rows[0]), _authz_from(rows, _NA)
    return op


def op_account_and_challenge(provisioner: str, account_id: str, challenge_id: str
                             ) -> AccountRead:
    """(the account, (the challenge, its authorization with all its challenges)), read as one."""
    def op(conn: Db) -> tuple[AcmeAccount | None,
                              tuple[AcmeChallenge | None, AcmeAuthz | None]]:
        rows = _all(conn, _SQL_ACCOUNT_CHALLENGE, (challenge_id, account_id, provisioner))
        if not rows:
            return None, (None, None)
        first = rows[0]
        if first[_NA] is None:
            return _account(first), (None, None)
        return _account(first), (_challenge(first[_NA:_NA + _NC]), _authz_from(rows, _NA + _NC))
    return op


def op_start_challenge(challenge_id: str) -> Any:
    """pending -> processing; True only for the caller that made the transition."""
    def op(conn: Db) -> bool:
        return _write(conn, _SQL_START_CHALLENGE, (challenge_id,)) == 1
    return op


def op_finish_challenge(challenge_id: str, valid: bool, error: dict[str, Any] | None) -> Any:
    """Record the validation's outcome, settle the authorization and the order; the challenge
    as it now is."""
    def op(conn: Db) -> AcmeChallenge:
        row = _one(conn, _SQL_CHALLENGE, (challenge_id,))
        if row is None:
            raise LookupError(f"no ACME challenge {challenge_id}")
        validated = int(time.time()) if valid else None
        error_text = None if valid else json.dumps(error)
        status = "valid" if valid else "invalid"
        _write(conn, _SQL_FINISH_CHALLENGE, (status, validated, error_text, challenge_id))
        authz_id = row[1]
        _write(conn, _SQL_SETTLE_AUTHZ, (status, authz_id))
        authz = _one(conn, "SELECT order_id FROM acme_authzs WHERE id = ?", (authz_id,))
        if authz is None:
            raise LookupError(f"no ACME authorization {authz_id}")
        _refresh_order_status(conn, authz[0])
        return AcmeChallenge(row[0], authz_id, row[2], row[3], status, validated,
                             None if valid else error)
    return op


def op_deactivate_authz(authz_id: str) -> Any:
    def op(conn: Db) -> None:
        _write(conn, "UPDATE acme_authzs SET status = 'deactivated' "
                     "WHERE id = ? AND status IN ('pending', 'valid')", (authz_id,))
        authz = _one(conn, "SELECT order_id FROM acme_authzs WHERE id = ?", (authz_id,))
        if authz is None:
            raise LookupError(f"no ACME authorization {authz_id}")
        _refresh_order_status(conn, authz[0])
    return op


def op_start_finalize(order_id: str) -> Any:
    """ready -> processing; True only for the caller that made the transition."""
    def op(conn: Db) -> bool:
        return _write(conn, _SQL_START_FINALIZE, (order_id,)) == 1
    return op


def op_finish_finalize(order_id: str, serial_hex: str | None, error: dict[str, Any] | None
                       ) -> Any:
    """Record finalization's outcome; the order as it now is."""
    def op(conn: Db) -> AcmeOrder | None:
        if serial_hex is not None:
            _write(conn, "UPDATE acme_orders SET status = 'valid', cert_serial = ? WHERE id = ?",
                   (serial_hex, order_id))
        else:
            # A refused CSR leaves the order ready, so the client may send a corrected one.
            _write(conn, "UPDATE acme_orders SET status = ?, error = ? WHERE id = ?",
                   ("ready" if error and error.get("retry") else "invalid",
                    json.dumps({k: v for k, v in (error or {}).items() if k != "retry"}),
                    order_id))
        return _read_order(conn, order_id)
    return op


def op_add_eab(provisioner: str, reference: str | None) -> Any:
    def op(conn: Db) -> EabKey:
        key = EabKey(secrets.token_urlsafe(16), provisioner, reference, secrets.token_bytes(32),
                     int(time.time()), None, None)
        try:
            _write(conn, "INSERT INTO acme_eab_keys (kid, provisioner, reference, hmac_key, "
                         "created_at) VALUES (?, ?, ?, ?, ?)",
                   (key.kid, key.provisioner, key.reference, key.hmac_key, key.created_at))
        except sqlite3.IntegrityError:
            raise AcmeConflict(f"an EAB key with reference {reference!r} exists already"
                               ) from None
        return key
    return op


def op_list_eab(provisioner: str) -> Any:
    def op(conn: Db) -> list[EabKey]:
        rows = _all(conn, _SELECT_EAB + "WHERE provisioner = ? ORDER BY created_at",
                    (provisioner,))
        return [_eab(r) for r in rows]
    return op


def op_get_eab(provisioner: str, kid: str) -> Any:
    def op(conn: Db) -> EabKey | None:
        row = _one(conn, _SELECT_EAB + "WHERE provisioner = ? AND kid = ?", (provisioner, kid))
        return None if row is None else _eab(row)
    return op


def op_remove_eab(provisioner: str, kid: str) -> Any:
    def op(conn: Db) -> bool:
        return _write(conn, "DELETE FROM acme_eab_keys WHERE provisioner = ? AND kid = ?",
                      (provisioner, kid)) == 1
    return op


__all__ = [
    "AcmeAccount", "AcmeAuthz", "AcmeChallenge", "AcmeConflict", "AcmeOrder", "EabKey",
    "MIGRATION", "new_id",
]
