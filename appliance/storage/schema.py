"""The database schema, declared once: these Tables are the DDL, the migrations and the queries.

The tables are exactly those the hand-written DDL of the first releases created (same names,
columns, types, keys and indexes), so a database made by any release opens unchanged. Two
SQLite details keep that so: a column the old DDL declared `PRIMARY KEY` without `NOT NULL` is
a `_shipped_key` here (SQLite's non-INTEGER primary keys admit NULL unless told otherwise, and
`PRAGMA table_info` shows the difference); and an INTEGER primary key stays a rowid alias.

A migration names the tables it introduced and is applied once, in one transaction, from their
declarations here. A later change to an existing table must therefore be a migration of its own
that checks what the database already has (the Table declares the final shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

metadata = MetaData()


def _shipped_key(name: str, type_: TypeEngine[Any] | type[TypeEngine[Any]],
                 *constraints: ForeignKey) -> Column[Any]:
    """A primary key as the first releases declared it: `PRIMARY KEY` without `NOT NULL`."""
    return Column(name, type_, *constraints, primary_key=True, nullable=True)


schema_migrations = Table(
    "schema_migrations", metadata,
    _shipped_key("version", Integer),
    Column("applied_at", Integer, nullable=False),
)

# -- certificates and one-time tokens (version 1) ---------------------------------------------
certificates = Table(
    "certificates", metadata,
    _shipped_key("serial", String(40)),  # lowercase hex, no 0 lead
    Column("subject", Text, nullable=False),
    Column("sans", Text, nullable=False),  # JSON list
    Column("not_before", Integer, nullable=False),
    Column("not_after", Integer, nullable=False),
    Column("provisioner", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # intent | issued | failed
    Column("token_id", Text),
    Column("der", LargeBinary),
    Column("created_at", Integer, nullable=False),
    Column("issued_at", Integer),
    Index("certificates_not_after", "not_after"),
)

used_tokens = Table(
    "used_tokens", metadata,
    Column("provisioner", String(128), primary_key=True),
    Column("jti", String(256), primary_key=True),
    Column("expires_at", Integer, nullable=False),
    Column("used_at", Integer, nullable=False),
    Index("used_tokens_expires", "expires_at"),
)

# -- revocations and CRLs (version 2) ----------------------------------------------------------
revocations = Table(
    "revocations", metadata,
    _shipped_key("serial", String(40), ForeignKey("certificates.serial")),
    Column("reason_code", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("revoked_at", Integer, nullable=False),
    Column("provisioner", String(128), nullable=False),
    Column("method", String(32), nullable=False),
    Column("not_after", Integer, nullable=False),
    Index("revocations_not_after", "not_after"),
)

crls = Table(
    "crls", metadata,
    _shipped_key("number", Integer),
    Column("this_update", Integer, nullable=False),
    Column("next_update", Integer, nullable=False),
    Column("der", LargeBinary),
)

# -- ACME state (version 3) --------------------------------------------------------------------
acme_accounts = Table(
    "acme_accounts", metadata,
    _shipped_key("id", String(64)),
    Column("provisioner", String(128), nullable=False),
    Column("thumbprint", String(64), nullable=False),
    Column("jwk", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("contact", Text, nullable=False),
    Column("eab_kid", String(128)),
    Column("created_at", Integer, nullable=False),
    Index("acme_accounts_key", "provisioner", "thumbprint", unique=True),
)

acme_orders = Table(
    "acme_orders", metadata,
    _shipped_key("id", String(64)),
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
    Index("acme_orders_account", "account_id"),
    Index("acme_orders_expires", "expires"),
)

acme_authzs = Table(
    "acme_authzs", metadata,
    _shipped_key("id", String(64)),
    Column("order_id", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("identifier_type", String(8), nullable=False),
    Column("identifier_value", String(255), nullable=False),
    Column("wildcard", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires", Integer, nullable=False),
    Index("acme_authzs_order", "order_id"),
)

acme_challenges = Table(
    "acme_challenges", metadata,
    _shipped_key("id", String(64)),
    Column("authz_id", String(64), nullable=False),
    Column("type", String(16), nullable=False),
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("validated", Integer),
    Column("error", Text),
    Index("acme_challenges_authz", "authz_id"),
)

acme_nonces = Table(
    "acme_nonces", metadata,
    _shipped_key("nonce", String(128)),
    Column("expires_at", Integer, nullable=False),
    Index("acme_nonces_expires", "expires_at"),
)

acme_eab_keys = Table(
    "acme_eab_keys", metadata,
    _shipped_key("kid", String(128)),
    Column("provisioner", String(128), nullable=False),
    Column("reference", String(256)),
    Column("hmac_key", LargeBinary, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("account_id", String(64)),
    Column("bound_at", Integer),
    Index("acme_eab_reference", "provisioner", "reference", unique=True),
)

acme_secrets = Table(
    "acme_secrets", metadata,
    _shipped_key("name", String(64)),
    Column("value", LargeBinary, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    """One schema version: the tables (with their indexes) it adds."""

    version: int
    tables: tuple[Table, ...]

    def apply(self, conn: Connection) -> None:
        """Create this version's tables and indexes inside the caller's transaction."""
        for table in self.tables:
            table.create(conn)


# Ordered from the first release on; never edit one that has shipped, add the next.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, (certificates, used_tokens)),
    Migration(2, (revocations, crls)),
    Migration(3, (acme_accounts, acme_orders, acme_authzs, acme_challenges, acme_nonces,
                  acme_eab_keys, acme_secrets)),
)
LATEST_VERSION = MIGRATIONS[-1].version
