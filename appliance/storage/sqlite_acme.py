"""`AcmeStore` on the SQLite store: fixed SQL on the driver, writes in the store's writer.

Everything lives in the database so that a restart loses nothing and every worker process sees
the same state. Transitions that must not race (a challenge starting validation, an order
starting finalization, an EAB key being bound) are single conditional UPDATEs.

Fixed SQL strings cost SQLite's time only, where building and executing a SQLAlchemy statement
cost ~20 times more per call (measured: ~300 us against ~12 us for a primary-key lookup), and
one ACME issuance makes about 25 such calls. Reads go through `AcmeReader` on the calling
thread (see there); the reads of an account with what a request names are one statement.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

from appliance.errors import RecordConflict, RecordNotFound, TokenReused
from appliance.storage.acme_protocol import (
    AccountChange,
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    ChallengeType,
    EabKey,
    JsonObject,
    NonceUse,
    OrderRule,
    OrderStatus,
)
from appliance.storage.sqlite import SqliteStore
from appliance.storage.sqlite_acme_reads import (
    NA,
    NC,
    NO,
    AcmeReader,
    Db,
    driver,
    fetch_all,
    fetch_one,
)
from appliance.storage.sqlite_acme_rows import (
    SELECT_ACCOUNT,
    SELECT_EAB,
    SQL_ACCOUNT_AUTHZ,
    SQL_ACCOUNT_BY_ID,
    SQL_ACCOUNT_BY_THUMBPRINT,
    SQL_ACCOUNT_CHALLENGE,
    SQL_ACCOUNT_ORDER,
    SQL_ACCOUNT_ORDER_DER,
    SQL_AUTHZ,
    SQL_AUTHZ_CHALLENGES,
    SQL_CHALLENGE,
    SQL_ORDER,
    account_of,
    authz_from,
    authz_of,
    challenge_of,
    eab_of,
    order_of,
)

T = TypeVar("T")

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
_SQL_TRANSITION_CHALLENGE = "UPDATE acme_challenges SET status = ? WHERE id = ? AND status = ?"
_SQL_FINISH_CHALLENGE = ("UPDATE acme_challenges SET status = ?, validated = ?, error = ? "
                         "WHERE id = ?")
_SQL_TRANSITION_ORDER = "UPDATE acme_orders SET status = ? WHERE id = ? AND status = ?"
_SQL_INSERT_ACCOUNT = (
    "INSERT INTO acme_accounts (id, provisioner, thumbprint, jwk, status, contact, eab_kid, "
    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_UPDATE_ACCOUNT = (  # NULL keeps a column as it is
    "UPDATE acme_accounts SET contact = COALESCE(?, contact), status = COALESCE(?, status), "
    "jwk = COALESCE(?, jwk), thumbprint = COALESCE(?, thumbprint) WHERE id = ?")

def _write(conn: Db, sql: str, params: tuple[object, ...]) -> int:
    """Run one INSERT/UPDATE/DELETE; the number of rows it changed."""
    return int(driver(conn).execute(sql, params).rowcount)


def _status_in(sql: str, values: Sequence[object]) -> str:
    """`sql` with its "IN (...)" holding one placeholder per value."""
    return sql.replace("IN (...)", "IN (" + ", ".join("?" * len(values)) + ")")


def _read_authz(conn: Db, authz_id: str) -> AcmeAuthz | None:
    row = fetch_one(conn, SQL_AUTHZ, (authz_id,))
    if row is None:
        return None
    return authz_of(row, tuple(challenge_of(c) for c in fetch_all(conn, SQL_AUTHZ_CHALLENGES,
                                                                (authz_id,))))


def _read_order(conn: Db, order_id: str) -> AcmeOrder | None:
    row = fetch_one(conn, SQL_ORDER, (order_id,))
    return None if row is None else order_of(row)


def _use_nonce(conn: Db, nonce: NonceUse | None) -> None:
    """Use the nonce first: a replay raises before anything of the write is written."""
    if nonce is None:
        return
    try:
        _write(conn, _SQL_USE_NONCE, (nonce.nonce, nonce.expires_at))
    except sqlite3.IntegrityError:
        raise TokenReused("the nonce is unknown, expired or already used") from None


def _settle_order(conn: Db, order_id: str, settle: OrderRule) -> None:
    """Give the order the status `settle` derives from its authorizations, if any."""
    order = fetch_one(conn, "SELECT status FROM acme_orders WHERE id = ?", (order_id,))
    if order is None:
        return
    current = OrderStatus(order[0])
    statuses = [AuthorizationStatus(r[0]) for r in fetch_all(
        conn, "SELECT status FROM acme_authzs WHERE order_id = ?", (order_id,))]
    new = settle(current, statuses)
    if new is not None and new != current:
        _write(conn, _SQL_TRANSITION_ORDER, (str(new), order_id, str(current)))


def _order_of_authz(conn: Db, authz_id: str) -> str:
    row = fetch_one(conn, "SELECT order_id FROM acme_authzs WHERE id = ?", (authz_id,))
    if row is None:
        raise RecordNotFound(f"no ACME authorization {authz_id}")
    order_id: str = row[0]
    return order_id


class SqliteAcmeStore:
    """The `AcmeStore` of an open `SqliteStore` (whose database holds the ACME tables)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._reader: AcmeReader | None = None  # made on first use, on the event loop's thread

    def _reads(self) -> AcmeReader:
        if self._reader is None:
            self._reader = AcmeReader(self._store.path, self._store.run_read)
        return self._reader

    async def _read(self, op: Callable[[Db], T], *, one_statement: bool = False) -> T:
        return await self._reads().read(op, one_statement=one_statement)

    async def _run(self, op: Callable[[Db], T]) -> T:
        return await self._store.run_op(op)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- secrets and nonces ------------------------------------------------------------------
    async def secret(self, name: str, size: int = 32) -> bytes:
        def op(conn: Db) -> bytes:
            row = fetch_one(conn, "SELECT value FROM acme_secrets WHERE name = ?", (name,))
            if row is not None:
                return bytes(row[0])
            value = secrets.token_bytes(size)
            _write(conn, "INSERT INTO acme_secrets (name, value) VALUES (?, ?)", (name, value))
            return value
        return await self._run(op)

    async def use_nonce(self, nonce: NonceUse) -> None:
        await self._run(lambda conn: _use_nonce(conn, nonce))

    async def purge(self, now: int, *, expire: Sequence[OrderStatus], expired_error: JsonObject
                    ) -> int:
        statuses = tuple(str(s) for s in expire)

        def op(conn: Db) -> int:
            n = _write(conn, "DELETE FROM acme_nonces WHERE expires_at < ?", (now,))
            if statuses:
                n += _write(conn, _status_in("UPDATE acme_orders SET status = ?, error = ? "
                                             "WHERE expires < ? AND status IN (...)", statuses),
                            (str(OrderStatus.INVALID), json.dumps(expired_error), now,
                             *statuses))
            return n
        return await self._run(op)

    # -- accounts ----------------------------------------------------------------------------
    async def create_account(self, account: AcmeAccount, *, eab_bound_at: int | None = None
                             ) -> AcmeAccount:
        row = (account.id, account.provisioner, account.thumbprint, json.dumps(account.jwk),
               str(account.status), json.dumps(list(account.contact)), account.eab_kid,
               account.created_at)

        def op(conn: Db) -> AcmeAccount:
            existing = fetch_one(conn, SQL_ACCOUNT_BY_THUMBPRINT, (account.provisioner,
                                                                    account.thumbprint))
            if existing is not None:
                return account_of(existing)
            if account.eab_kid is not None:
                bound = _write(conn, "UPDATE acme_eab_keys SET account_id = ?, bound_at = ? "
                                     "WHERE kid = ? AND provisioner = ? AND account_id IS NULL",
                               (account.id, eab_bound_at if eab_bound_at is not None
                                else account.created_at, account.eab_kid, account.provisioner))
                if bound != 1:
                    raise RecordConflict("the external account key is unknown or already bound")
            _write(conn, _SQL_INSERT_ACCOUNT, row)
            return account
        return await self._run(op)

    async def find_account(self, provisioner: str, account_id: str) -> AcmeAccount | None:
        def op(conn: Db) -> AcmeAccount | None:
            row = fetch_one(conn, SQL_ACCOUNT_BY_ID, (account_id, provisioner))
            return None if row is None else account_of(row)
        return await self._read(op, one_statement=True)

    async def find_account_by_key(self, provisioner: str, thumbprint: str
                                  ) -> AcmeAccount | None:
        def op(conn: Db) -> AcmeAccount | None:
            row = fetch_one(conn, SQL_ACCOUNT_BY_THUMBPRINT, (provisioner, thumbprint))
            return None if row is None else account_of(row)
        return await self._read(op, one_statement=True)

    async def update_account(self, account_id: str, change: AccountChange, *,
                             deactivate_authzs_from: Sequence[AuthorizationStatus] = ()
                             ) -> AcmeAccount:
        new_key = change.jwk is not None and change.thumbprint is not None
        values = (None if change.contact is None else json.dumps(list(change.contact)),
                  None if change.status is None else str(change.status),
                  json.dumps(change.jwk) if new_key else None,
                  change.thumbprint if new_key else None)
        cascade = tuple(str(s) for s in deactivate_authzs_from)

        def op(conn: Db) -> AcmeAccount:
            if any(v is not None for v in values):
                try:
                    _write(conn, _SQL_UPDATE_ACCOUNT, (*values, account_id))
                except sqlite3.IntegrityError:
                    raise RecordConflict("another account already uses that key") from None
            if cascade:
                _write(conn, _status_in("UPDATE acme_authzs SET status = ? "
                                        "WHERE account_id = ? AND status IN (...)", cascade),
                       (str(AuthorizationStatus.DEACTIVATED), account_id, *cascade))
            row = fetch_one(conn, SELECT_ACCOUNT + "WHERE id = ?", (account_id,))
            if row is None:
                raise RecordNotFound(f"no ACME account {account_id}")
            return account_of(row)
        return await self._run(op)

    # -- an account with what a request names, in one statement ------------------------------
    async def account_and_order(self, provisioner: str, account_id: str, order_id: str
                                ) -> tuple[AcmeAccount | None, AcmeOrder | None]:
        def op(conn: Db) -> tuple[AcmeAccount | None, AcmeOrder | None]:
            row = fetch_one(conn, SQL_ACCOUNT_ORDER, (order_id, account_id, provisioner))
            if row is None:
                return None, None
            return account_of(row), None if row[NA] is None else order_of(row[NA:])
        return await self._read(op, one_statement=True)

    async def account_and_order_certificate(
        self, provisioner: str, account_id: str, order_id: str,
    ) -> tuple[AcmeAccount | None, tuple[AcmeOrder | None, bytes | None]]:
        def op(conn: Db) -> tuple[AcmeAccount | None, tuple[AcmeOrder | None, bytes | None]]:
            row = fetch_one(conn, SQL_ACCOUNT_ORDER_DER, (order_id, account_id, provisioner))
            if row is None:
                return None, (None, None)
            order = None if row[NA] is None else order_of(row[NA:NA + NO])
            der = row[NA + NO]
            return account_of(row), (order, None if order is None or der is None else bytes(der))
        return await self._read(op, one_statement=True)

    async def account_and_authz(self, provisioner: str, account_id: str, authz_id: str
                                ) -> tuple[AcmeAccount | None, AcmeAuthz | None]:
        def op(conn: Db) -> tuple[AcmeAccount | None, AcmeAuthz | None]:
            rows = fetch_all(conn, SQL_ACCOUNT_AUTHZ, (authz_id, account_id, provisioner))
            if not rows:
                return None, None
            return account_of(rows[0]), authz_from(rows, NA)
        return await self._read(op, one_statement=True)

    async def account_and_challenge(
        self, provisioner: str, account_id: str, challenge_id: str,
    ) -> tuple[AcmeAccount | None, tuple[AcmeChallenge | None, AcmeAuthz | None]]:
        def op(conn: Db) -> tuple[AcmeAccount | None,
                                  tuple[AcmeChallenge | None, AcmeAuthz | None]]:
            rows = fetch_all(conn, SQL_ACCOUNT_CHALLENGE, (challenge_id, account_id,
                                                             provisioner))
            if not rows:
                return None, (None, None)
            first = rows[0]
            if first[NA] is None:
                return account_of(first), (None, None)
            return account_of(first), (challenge_of(first[NA:NA + NC]), authz_from(rows, NA + NC))
        return await self._read(op, one_statement=True)

    # -- orders, authorizations, challenges --------------------------------------------------
    async def create_order(self, order: AcmeOrder, authzs: Sequence[AcmeAuthz], *,
                           created_at: int, nonce: NonceUse | None = None) -> None:
        order_row = (order.id, order.provisioner, order.account_id, str(order.status),
                     order.expires, json.dumps([i.to_json() for i in order.identifiers]),
                     order.not_before, order.not_after, json.dumps(list(order.authz_ids)),
                     order.replaces, created_at)
        authz_rows = [(a.id, a.order_id, a.account_id, str(a.identifier.type),
                       a.identifier.value, int(a.wildcard), str(a.status), a.expires)
                      for a in authzs]
        challenge_rows = [(c.id, c.authz_id, str(c.type), c.token, str(c.status))
                          for a in authzs for c in a.challenges]

        def op(conn: Db) -> None:
            _use_nonce(conn, nonce)
            db = driver(conn)
            db.execute(_SQL_INSERT_ORDER, order_row).close()
            db.executemany(_SQL_INSERT_AUTHZ, authz_rows).close()
            db.executemany(_SQL_INSERT_CHALLENGE, challenge_rows).close()
        await self._run(op)

    async def get_order(self, order_id: str) -> AcmeOrder | None:
        return await self._read(lambda conn: _read_order(conn, order_id), one_statement=True)

    async def list_orders(self, account_id: str) -> list[str]:
        def op(conn: Db) -> list[str]:
            rows = fetch_all(conn, "SELECT id FROM acme_orders WHERE account_id = ? "
                                   "ORDER BY created_at", (account_id,))
            return [r[0] for r in rows]
        return await self._read(op, one_statement=True)

    async def order_with_certificate(self, account_id: str, cert_serial: str) -> bool:
        def op(conn: Db) -> bool:
            return fetch_one(conn, "SELECT 1 FROM acme_orders WHERE account_id = ? AND "
                                   "cert_serial = ? LIMIT 1", (account_id, cert_serial)
                             ) is not None
        return await self._read(op, one_statement=True)

    async def get_authz(self, authz_id: str) -> AcmeAuthz | None:
        return await self._read(lambda conn: _read_authz(conn, authz_id))

    async def get_challenge(self, challenge_id: str) -> AcmeChallenge | None:
        def op(conn: Db) -> AcmeChallenge | None:
            row = fetch_one(conn, SQL_CHALLENGE, (challenge_id,))
            return None if row is None else challenge_of(row)
        return await self._read(op, one_statement=True)

    async def deactivate_authz(self, authz_id: str, *, from_: Sequence[AuthorizationStatus],
                               settle: OrderRule, nonce: NonceUse | None = None) -> None:
        statuses = tuple(str(s) for s in from_)

        def op(conn: Db) -> None:
            _use_nonce(conn, nonce)
            order_id = _order_of_authz(conn, authz_id)
            _write(conn, _status_in("UPDATE acme_authzs SET status = ? WHERE id = ? AND "
                                    "status IN (...)", statuses),
                   (str(AuthorizationStatus.DEACTIVATED), authz_id, *statuses))
            _settle_order(conn, order_id, settle)
        await self._run(op)

    async def transition_challenge(self, challenge_id: str, *, from_: ChallengeStatus,
                                   to: ChallengeStatus, nonce: NonceUse | None = None) -> bool:
        def op(conn: Db) -> bool:
            _use_nonce(conn, nonce)
            return _write(conn, _SQL_TRANSITION_CHALLENGE,
                          (str(to), challenge_id, str(from_))) == 1
        return await self._run(op)

    async def finish_challenge(self, challenge_id: str, *, status: ChallengeStatus,
                               validated: int | None, error: JsonObject | None,
                               authz_status: AuthorizationStatus,
                               authz_from: Sequence[AuthorizationStatus],
                               settle: OrderRule) -> AcmeChallenge:
        error_text = None if error is None else json.dumps(error)
        settle_from = tuple(str(s) for s in authz_from)

        def op(conn: Db) -> AcmeChallenge:
            row = fetch_one(conn, SQL_CHALLENGE, (challenge_id,))
            if row is None:
                raise RecordNotFound(f"no ACME challenge {challenge_id}")
            authz_id: str = row[1]
            order_id = _order_of_authz(conn, authz_id)
            _write(conn, _SQL_FINISH_CHALLENGE, (str(status), validated, error_text,
                                                 challenge_id))
            _write(conn, _status_in("UPDATE acme_authzs SET status = ? WHERE id = ? AND "
                                    "status IN (...)", settle_from),
                   (str(authz_status), authz_id, *settle_from))
            _settle_order(conn, order_id, settle)
            return AcmeChallenge(row[0], authz_id, ChallengeType(row[2]), row[3], status,
                                 validated, error)
        return await self._run(op)

    async def transition_order(self, order_id: str, *, from_: OrderStatus, to: OrderStatus,
                               nonce: NonceUse | None = None) -> bool:
        def op(conn: Db) -> bool:
            _use_nonce(conn, nonce)
            return _write(conn, _SQL_TRANSITION_ORDER, (str(to), order_id, str(from_))) == 1
        return await self._run(op)

    async def finish_finalize(self, order_id: str, *, status: OrderStatus,
                              cert_serial: str | None, error: JsonObject | None) -> AcmeOrder:
        error_text = None if error is None else json.dumps(error)

        def op(conn: Db) -> AcmeOrder:
            _write(conn, "UPDATE acme_orders SET status = ?, cert_serial = COALESCE(?, "
                         "cert_serial), error = ? WHERE id = ?",
                   (str(status), cert_serial, error_text, order_id))
            order = _read_order(conn, order_id)
            if order is None:
                raise RecordNotFound(f"no ACME order {order_id}")
            return order
        return await self._run(op)

    # -- external account binding keys -------------------------------------------------------
    async def add_eab_key(self, provisioner: str, reference: str | None, *, created_at: int
                          ) -> EabKey:
        key = EabKey(secrets.token_urlsafe(16), provisioner, reference, secrets.token_bytes(32),
                     created_at, None, None)

        def op(conn: Db) -> EabKey:
            try:
                _write(conn, "INSERT INTO acme_eab_keys (kid, provisioner, reference, hmac_key, "
                             "created_at) VALUES (?, ?, ?, ?, ?)",
                       (key.kid, key.provisioner, key.reference, key.hmac_key, key.created_at))
            except sqlite3.IntegrityError:
                raise RecordConflict(f"an EAB key with reference {reference!r} exists already"
                                     ) from None
            return key
        return await self._run(op)

    async def list_eab_keys(self, provisioner: str) -> list[EabKey]:
        def op(conn: Db) -> list[EabKey]:
            return [eab_of(r) for r in fetch_all(
                conn, SELECT_EAB + "WHERE provisioner = ? ORDER BY created_at", (provisioner,))]
        return await self._read(op, one_statement=True)

    async def get_eab_key(self, provisioner: str, kid: str) -> EabKey | None:
        def op(conn: Db) -> EabKey | None:
            row = fetch_one(conn, SELECT_EAB + "WHERE provisioner = ? AND kid = ?",
                            (provisioner, kid))
            return None if row is None else eab_of(row)
        return await self._read(op, one_statement=True)

    async def remove_eab_key(self, provisioner: str, kid: str) -> bool:
        def op(conn: Db) -> bool:
            return _write(conn, "DELETE FROM acme_eab_keys WHERE provisioner = ? AND kid = ?",
                          (provisioner, kid)) == 1
        return await self._run(op)
