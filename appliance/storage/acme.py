"""ACME state: accounts, orders, authorizations, challenges, nonces, EAB keys.

Everything lives in the database so that a restart loses nothing and every worker process sees
the same state. Status transitions that must not race (a challenge starting validation, an order
starting finalization, an EAB key being bound) are single conditional UPDATEs.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

meta = MetaData()

acme_accounts = Table(
    "acme_accounts", meta,
    Column("id", String(64), primary_key=True),
    Column("provisioner", String(128), nullable=False),
    Column("thumbprint", String(64), nullable=False),
    Column("jwk", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("contact", Text, nullable=False),
    Column("eab_kid", String(128)),
    Column("created_at", Integer, nullable=False),
)
acme_orders = Table(
    "acme_orders", meta,
    Column("id", String(64), primary_key=True),
    Column("provisioner", String(128), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires", Integer, nullable=False),
    Column("identifiers", Text, nullable=False),
    Column("not_before", Integer),
    Column("not_after", Integer),
    Column("authz_ids", Text, nullable=False),
    Column("error", Text),
    Column("cert_serial", String(40)),
    Column("replaces", String(256)),
    Column("created_at", Integer, nullable=False),
)
acme_authzs = Table(
    "acme_authzs", meta,
    Column("id", String(64), primary_key=True),
    Column("order_id", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("identifier_type", String(8), nullable=False),
    Column("identifier_value", String(255), nullable=False),
    Column("wildcard", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires", Integer, nullable=False),
)
acme_challenges = Table(
    "acme_challenges", meta,
    Column("id", String(64), primary_key=True),
    Column("authz_id", String(64), nullable=False),
    Column("type", String(16), nullable=False),
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("validated", Integer),
    Column("error", Text),
)
acme_nonces = Table(
    "acme_nonces", meta,
    Column("nonce", String(128), primary_key=True),
    Column("expires_at", Integer, nullable=False),
)
acme_eab_keys = Table(
    "acme_eab_keys", meta,
    Column("kid", String(128), primary_key=True),
    Column("provisioner", String(128), nullable=False),
    Column("reference", String(256)),
    Column("hmac_key", LargeBinary, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("account_id", String(64)),
    Column("bound_at", Integer),
)
acme_secrets = Table(
    "acme_secrets", meta,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

MIGRATION = [
    """CREATE TABLE acme_accounts (id VARCHAR(64) PRIMARY KEY, provisioner VARCHAR(128) NOT NULL,
        thumbprint VARCHAR(64) NOT NULL, jwk TEXT NOT NULL, status VARCHAR(16) NOT NULL,
        contact TEXT NOT NULL, eab_kid VARCHAR(128), created_at INTEGER NOT NULL)""",
    "CREATE UNIQUE INDEX acme_accounts_key ON acme_accounts (provisioner, thumbprint)",
    """CREATE TABLE acme_orders (id VARCHAR(64) PRIMARY KEY, provisioner VARCHAR(128) NOT NULL,
        account_id VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, expires INTEGER NOT NULL,
        identifiers TEXT NOT NULL, not_before INTEGER, not_after INTEGER,
        authz_ids TEXT NOT NULL, error TEXT, cert_serial VARCHAR(40), replaces VARCHAR(256),
        created_at INTEGER NOT NULL)""",
    "CREATE INDEX acme_orders_account ON acme_orders (account_id)",
    "CREATE INDEX acme_orders_expires ON acme_orders (expires)",
    """CREATE TABLE acme_authzs (id VARCHAR(64) PRIMARY KEY, order_id VARCHAR(64) NOT NULL,
        account_id VARCHAR(64) NOT NULL, identifier_type VARCHAR(8) NOT NULL,
        identifier_value VARCHAR(255) NOT NULL, wildcard INTEGER NOT NULL,
        status VARCHAR(16) NOT NULL, expires INTEGER NOT NULL)""",
    "CREATE INDEX acme_authzs_order ON acme_authzs (order_id)",
    """CREATE TABLE acme_challenges (id VARCHAR(64) PRIMARY KEY, authz_id VARCHAR(64) NOT NULL,
        type VARCHAR(16) NOT NULL, token VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL,
        validated INTEGER, error TEXT)""",
    "CREATE INDEX acme_challenges_authz ON acme_challenges (authz_id)",
    """CREATE TABLE acme_nonces (nonce VARCHAR(128) PRIMARY KEY, expires_at INTEGER NOT NULL)""",
    "CREATE INDEX acme_nonces_expires ON acme_nonces (expires_at)",
    """CREATE TABLE acme_eab_keys (kid VARCHAR(128) PRIMARY KEY, provisioner VARCHAR(128) NOT NULL,
        reference VARCHAR(256), hmac_key BLOB NOT NULL, created_at INTEGER NOT NULL,
        account_id VARCHAR(64), bound_at INTEGER)""",
    "CREATE UNIQUE INDEX acme_eab_reference ON acme_eab_keys (provisioner, reference)",
    """CREATE TABLE acme_secrets (name VARCHAR(64) PRIMARY KEY, value BLOB NOT NULL)""",
]


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


def _account(row: Any) -> AcmeAccount:
    return AcmeAccount(row.id, row.provisioner, row.thumbprint, json.loads(row.jwk), row.status,
                       json.loads(row.contact), row.eab_kid, row.created_at)


def _order(row: Any) -> AcmeOrder:
    return AcmeOrder(row.id, row.provisioner, row.account_id, row.status, row.expires,
                     json.loads(row.identifiers), row.not_before, row.not_after,
                     json.loads(row.authz_ids), json.loads(row.error) if row.error else None,
                     row.cert_serial, row.replaces)


def _challenge(row: Any) -> AcmeChallenge:
    return AcmeChallenge(row.id, row.authz_id, row.type, row.token, row.status, row.validated,
                         json.loads(row.error) if row.error else None)


def _eab(row: Any) -> EabKey:
    return EabKey(row.kid, row.provisioner, row.reference, row.hmac_key, row.created_at,
                  row.account_id, row.bound_at)


def _refresh_order_status(conn: Connection, order_id: str) -> None:
    """pending -> ready when every authorization is valid; -> invalid when one is invalid."""
    order = conn.execute(select(acme_orders.c.status).where(acme_orders.c.id == order_id)).first()
    if order is None or order.status != "pending":
        return
    statuses = [r.status for r in conn.execute(
        select(acme_authzs.c.status).where(acme_authzs.c.order_id == order_id))]
    if any(s in ("invalid", "deactivated", "revoked", "expired") for s in statuses):
        new = "invalid"
    elif statuses and all(s == "valid" for s in statuses):
        new = "ready"
    else:
        return
    conn.execute(update(acme_orders).where(acme_orders.c.id == order_id)
                 .where(acme_orders.c.status == "pending").values(status=new))


# -- operations (each runs inside the store's writer thread, in a transaction) ---------------
def op_get_secret(name: str, size: int = 32) -> Any:
    def op(conn: Connection) -> bytes:
        row = conn.execute(select(acme_secrets.c.value).where(acme_secrets.c.name == name)).first()
        if row is not None:
            return bytes(row.value)
        value = secrets.token_bytes(size)
        conn.execute(acme_secrets.insert().values(name=name, value=value))
        return value
    return op


def op_use_nonce(nonce: str, expires_at: int) -> Any:
    def op(conn: Connection) -> bool:
        try:
            conn.execute(acme_nonces.insert().values(nonce=nonce, expires_at=expires_at))
        except IntegrityError:
            return False
        return True
    return op


def op_purge(now: int) -> Any:
    def op(conn: Connection) -> int:
        n = conn.execute(acme_nonces.delete().where(acme_nonces.c.expires_at < now)).rowcount
        expired = conn.execute(update(acme_orders).where(acme_orders.c.expires < now)
                               .where(acme_orders.c.status.in_(("pending", "ready")))
                               .values(status="invalid",
                                       error=json.dumps({"type": "urn:ietf:params:acme:error:"
                                                         "malformed",
                                                         "detail": "the order expired"})))
        return int(n) + int(expired.rowcount)
    return op


def op_create_account(account: AcmeAccount, eab_kid: str | None) -> Any:
    def op(conn: Connection) -> AcmeAccount:
        existing = conn.execute(select(acme_accounts)
                                .where(acme_accounts.c.provisioner == account.provisioner)
                                .where(acme_accounts.c.thumbprint == account.thumbprint)).first()
        if existing is not None:
            return _account(existing)
        if eab_kid is not None:
            bound = conn.execute(update(acme_eab_keys).where(acme_eab_keys.c.kid == eab_kid)
                                 .where(acme_eab_keys.c.provisioner == account.provisioner)
                                 .where(acme_eab_keys.c.account_id.is_(None))
                                 .values(account_id=account.id, bound_at=int(time.time())))
            if bound.rowcount != 1:
                raise AcmeConflict("the external account key is unknown or already bound")
        conn.execute(acme_accounts.insert().values(
            id=account.id, provisioner=account.provisioner, thumbprint=account.thumbprint,
            jwk=json.dumps(account.jwk), status=account.status,
            contact=json.dumps(account.contact), eab_kid=eab_kid,
            created_at=account.created_at))
        return account
    return op


def op_find_account(provisioner: str, *, account_id: str | None = None,
                    thumbprint: str | None = None) -> Any:
    def op(conn: Connection) -> AcmeAccount | None:
        q = select(acme_accounts).where(acme_accounts.c.provisioner == provisioner)
        if account_id is not None:
            q = q.where(acme_accounts.c.id == account_id)
        if thumbprint is not None:
            q = q.where(acme_accounts.c.thumbprint == thumbprint)
        row = conn.execute(q).first()
        return None if row is None else _account(row)
    return op


def op_update_account(account_id: str, *, contact: list[str] | None = None,
                      status: str | None = None, jwk: dict[str, Any] | None = None,
                      thumbprint: str | None = None) -> Any:
    def op(conn: Connection) -> AcmeAccount:
        values: dict[str, Any] = {}
        if contact is not None:
            values["contact"] = json.dumps(contact)
        if status is not None:
            values["status"] = status
        if jwk is not None and thumbprint is not None:
            values["jwk"] = json.dumps(jwk)
            values["thumbprint"] = thumbprint
        if values:
            try:
                conn.execute(update(acme_accounts).where(acme_accounts.c.id == account_id)
                             .values(**values))
            except IntegrityError:
                raise AcmeConflict("another account already uses that key") from None
            if status == "deactivated":
                # RFC 8555 §7.3.6: pending authorizations of a deactivated account go too.
                conn.execute(update(acme_authzs).where(acme_authzs.c.account_id == account_id)
                             .where(acme_authzs.c.status == "pending")
                             .values(status="deactivated"))
        row = conn.execute(select(acme_accounts).where(acme_accounts.c.id == account_id)).one()
        return _account(row)
    return op


def op_create_order(order: AcmeOrder, authzs: list[AcmeAuthz]) -> Any:
    def op(conn: Connection) -> AcmeOrder:
        conn.execute(acme_orders.insert().values(
            id=order.id, provisioner=order.provisioner, account_id=order.account_id,
            status=order.status, expires=order.expires, identifiers=json.dumps(order.identifiers),
            not_before=order.not_before, not_after=order.not_after,
            authz_ids=json.dumps(order.authz_ids), error=None, cert_serial=None,
            replaces=order.replaces, created_at=int(time.time())))
        for a in authzs:
            conn.execute(acme_authzs.insert().values(
                id=a.id, order_id=a.order_id, account_id=a.account_id,
                identifier_type=a.identifier_type, identifier_value=a.identifier_value,
                wildcard=int(a.wildcard), status=a.status, expires=a.expires))
            for c in a.challenges:
                conn.execute(acme_challenges.insert().values(
                    id=c.id, authz_id=c.authz_id, type=c.type, token=c.token, status=c.status,
                    validated=None, error=None))
        return order
    return op


def op_get_order(order_id: str) -> Any:
    def op(conn: Connection) -> AcmeOrder | None:
        row = conn.execute(select(acme_orders).where(acme_orders.c.id == order_id)).first()
        return None if row is None else _order(row)
    return op


def op_list_orders(account_id: str) -> Any:
    def op(conn: Connection) -> list[str]:
        rows = conn.execute(select(acme_orders.c.id).where(acme_orders.c.account_id == account_id)
                            .order_by(acme_orders.c.created_at))
        return [r.id for r in rows]
    return op


def op_get_authz(authz_id: str) -> Any:
    def op(conn: Connection) -> AcmeAuthz | None:
        row = conn.execute(select(acme_authzs).where(acme_authzs.c.id == authz_id)).first()
        if row is None:
            return None
        chals = [_challenge(c) for c in conn.execute(
            select(acme_challenges).where(acme_challenges.c.authz_id == authz_id)
            .order_by(acme_challenges.c.type))]
        return AcmeAuthz(row.id, row.order_id, row.account_id, row.identifier_type,
                         row.identifier_value, bool(row.wildcard), row.status, row.expires, chals)
    return op


def op_get_challenge(challenge_id: str) -> Any:
    def op(conn: Connection) -> AcmeChallenge | None:
        row = conn.execute(select(acme_challenges)
                           .where(acme_challenges.c.id == challenge_id)).first()
        return None if row is None else _challenge(row)
    return op


def op_start_challenge(challenge_id: str) -> Any:
    """pending -> processing; True only for the caller that made the transition."""
    def op(conn: Connection) -> bool:
        res = conn.execute(update(acme_challenges).where(acme_challenges.c.id == challenge_id)
                           .where(acme_challenges.c.status == "pending")
                           .values(status="processing"))
        return bool(res.rowcount == 1)
    return op


def op_finish_challenge(challenge_id: str, valid: bool, error: dict[str, Any] | None) -> Any:
    def op(conn: Connection) -> None:
        chal = conn.execute(select(acme_challenges)
                            .where(acme_challenges.c.id == challenge_id)).one()
        conn.execute(update(acme_challenges).where(acme_challenges.c.id == challenge_id)
                     .values(status="valid" if valid else "invalid",
                             validated=int(time.time()) if valid else None,
                             error=None if valid else json.dumps(error)))
        conn.execute(update(acme_authzs).where(acme_authzs.c.id == chal.authz_id)
                     .where(acme_authzs.c.status == "pending")
                     .values(status="valid" if valid else "invalid"))
        authz = conn.execute(select(acme_authzs.c.order_id)
                             .where(acme_authzs.c.id == chal.authz_id)).one()
        _refresh_order_status(conn, authz.order_id)
    return op


def op_deactivate_authz(authz_id: str) -> Any:
    def op(conn: Connection) -> None:
        conn.execute(update(acme_authzs).where(acme_authzs.c.id == authz_id)
                     .where(acme_authzs.c.status.in_(("pending", "valid")))
                     .values(status="deactivated"))
        authz = conn.execute(select(acme_authzs.c.order_id)
                             .where(acme_authzs.c.id == authz_id)).one()
        _refresh_order_status(conn, authz.order_id)
    return op


def op_start_finalize(order_id: str) -> Any:
    """ready -> processing; True only for the caller that made the transition."""
    def op(conn: Connection) -> bool:
        res = conn.execute(update(acme_orders).where(acme_orders.c.id == order_id)
                           .where(acme_orders.c.status == "ready").values(status="processing"))
        return bool(res.rowcount == 1)
    return op


def op_finish_finalize(order_id: str, serial_hex: str | None, error: dict[str, Any] | None
                       ) -> Any:
    def op(conn: Connection) -> None:
        if serial_hex is not None:
            conn.execute(update(acme_orders).where(acme_orders.c.id == order_id)
                         .values(status="valid", cert_serial=serial_hex))
        else:
            # A refused CSR leaves the order ready, so the client may send a corrected one.
            conn.execute(update(acme_orders).where(acme_orders.c.id == order_id)
                         .values(status="ready" if error and error.get("retry") else "invalid",
                                 error=json.dumps({k: v for k, v in (error or {}).items()
                                                   if k != "retry"})))
    return op


def op_add_eab(provisioner: str, reference: str | None) -> Any:
    def op(conn: Connection) -> EabKey:
        key = EabKey(secrets.token_urlsafe(16), provisioner, reference, secrets.token_bytes(32),
                     int(time.time()), None, None)
        try:
            conn.execute(acme_eab_keys.insert().values(
                kid=key.kid, provisioner=key.provisioner, reference=key.reference,
                hmac_key=key.hmac_key, created_at=key.created_at))
        except IntegrityError:
            raise AcmeConflict(f"an EAB key with reference {reference!r} exists already"
                               ) from None
        return key
    return op


def op_list_eab(provisioner: str) -> Any:
    def op(conn: Connection) -> list[EabKey]:
        rows = conn.execute(select(acme_eab_keys).where(acme_eab_keys.c.provisioner == provisioner)
                            .order_by(acme_eab_keys.c.created_at))
        return [_eab(r) for r in rows]
    return op


def op_get_eab(provisioner: str, kid: str) -> Any:
    def op(conn: Connection) -> EabKey | None:
        row = conn.execute(select(acme_eab_keys).where(acme_eab_keys.c.provisioner == provisioner)
                           .where(acme_eab_keys.c.kid == kid)).first()
        return None if row is None else _eab(row)
    return op


def op_remove_eab(provisioner: str, kid: str) -> Any:
    def op(conn: Connection) -> bool:
        res = conn.execute(acme_eab_keys.delete().where(acme_eab_keys.c.provisioner == provisioner)
                           .where(acme_eab_keys.c.kid == kid))
        return bool(res.rowcount == 1)
    return op


__all__ = [
    "AcmeAccount", "AcmeAuthz", "AcmeChallenge", "AcmeConflict", "AcmeOrder", "EabKey",
    "MIGRATION", "new_id",
]
