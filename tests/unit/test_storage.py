"""The SQLite store against a real database file: durability rules, replays, migrations."""

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import StorageError
from appliance.storage import CertificateIntent, TokenReused, TokenUse
from appliance.storage.schema import LATEST_VERSION, MIGRATIONS, metadata
from appliance.storage.sqlite import SqliteStore

NOW = datetime.now(UTC).replace(microsecond=0)


def intent(serial: int, jti: str | None = None) -> CertificateIntent:
    return CertificateIntent(
        serial=serial, subject="CN=a.test", sans=("a.test",), not_before=NOW,
        not_after=NOW + timedelta(hours=1), provisioner="admin",
        token_use=TokenUse("admin", jti, NOW + timedelta(minutes=5)) if jti else None)


async def test_intent_then_certificate(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "db" / "a.db")
    serial = 2**127 + 5
    await store.reserve(intent(serial, "jti-aaaaaaaa"))
    rec = await store.get_certificate(serial)
    assert rec is not None and rec.status == "intent" and rec.der is None
    await store.record_certificate(serial, b"\x30\x03der")
    rec = await store.get_certificate(serial)
    assert rec is not None and (rec.status, rec.der, rec.sans) == ("issued", b"\x30\x03der",
                                                                   ("a.test",))
    with pytest.raises(StorageError, match="never reserved"):
        await store.record_certificate(12345, b"x")
    await store.close()


async def test_replayed_token_refused_even_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = SqliteStore.open(path)
    await store.reserve(intent(1, "jti-replayed"))
    with pytest.raises(TokenReused):
        await store.reserve(intent(2, "jti-replayed"))
    assert await store.get_certificate(2) is None  # the refused intent left nothing behind
    await store.close()
    store = SqliteStore.open(path)
    with pytest.raises(TokenReused):
        await store.reserve(intent(3, "jti-replayed"))
    await store.close()


async def test_concurrent_batches_are_isolated(tmp_path: Path) -> None:
    """One replay inside a group commit must not undo its neighbours."""
    store = SqliteStore.open(tmp_path / "a.db")
    await store.reserve(intent(100, "jti-used-before"))
    results = await asyncio.gather(
        *(store.reserve(intent(1000 + i, f"jti-{i:08d}")) for i in range(200)),
        store.reserve(intent(5000, "jti-used-before")),
        return_exceptions=True)
    assert sum(isinstance(r, TokenReused) for r in results) == 1
    assert sum(r is None for r in results) == 200
    assert await store.count_certificates("intent") == 201
    await store.close()


async def test_failure_and_purge(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    await store.reserve(intent(7, "jti-purgeable"))
    await store.record_failure(7)
    rec = await store.get_certificate(7)
    assert rec is not None and rec.status == "failed"
    assert await store.purge_expired_tokens(NOW) == 0  # not yet expired
    assert await store.purge_expired_tokens(NOW + timedelta(hours=1)) == 1
    await store.close()


def test_migrations_idempotent_and_durable_settings(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def open_close() -> int:
        store = SqliteStore.open(path)
        version = store.schema_version()
        await store.close()
        return version

    latest = LATEST_VERSION
    assert asyncio.run(open_close()) == latest
    assert asyncio.run(open_close()) == latest
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"certificates", "used_tokens", "schema_migrations", "revocations", "crls"} <= tables
    conn.close()


async def test_partial_write_in_a_batch_is_rolled_back_alone(tmp_path: Path) -> None:
    """A serial collision fails after the token id was written: that op alone is undone."""
    store = SqliteStore.open(tmp_path / "a.db")
    await store.reserve(intent(42, "jti-first-use"))
    results = await asyncio.gather(
        *(store.reserve(intent(2000 + i, f"jti-neighbour-{i:04d}")) for i in range(50)),
        store.reserve(intent(42, "jti-collides")),  # same serial: IntegrityError on 2nd insert
        return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], StorageError)
    assert "IntegrityError" in failures[0].message
    assert await store.count_certificates("intent") == 51
    # The colliding op's token id was rolled back with it, so the token is still usable.
    await store.reserve(intent(43, "jti-collides"))
    await store.close()


@pytest.mark.parametrize("path", ["driver", "sqlalchemy"])
async def test_a_failing_op_is_undone_alone_whichever_way_its_batch_wrote(
        tmp_path: Path, path: str) -> None:
    """The writer begins and commits on the sqlite3 driver; ops may also write through
    SQLAlchemy inside that transaction. An op that fails after writing is rolled back with its
    batch, and its neighbours are replayed and committed."""
    from sqlalchemy import text
    from sqlalchemy.engine import Connection

    store = SqliteStore.open(tmp_path / "a.db")
    await store.run_op(lambda conn: conn.exec_driver_sql("CREATE TABLE t (v TEXT)"))

    def insert(conn: Connection, value: str) -> None:
        if path == "driver":
            conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                "INSERT INTO t VALUES (?)", (value,))
        else:
            conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})

    def writes_then_fails(conn: Connection) -> None:
        insert(conn, "from the failing op")
        raise RuntimeError("a fault after a write")

    values = [f"neighbour {i}" for i in range(40)]
    results = await asyncio.gather(
        *(store.run_op(lambda conn, v=v: insert(conn, v)) for v in values),
        store.run_op(writes_then_fails), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], StorageError), failures
    rows = await store.run_read(
        lambda conn: sorted(v for (v,) in conn.exec_driver_sql("SELECT v FROM t")))
    assert rows == sorted(values)
    # The writer's connection is left with no transaction open: the next batch commits.
    await store.run_op(lambda conn: insert(conn, "after"))
    await store.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        assert db.execute("SELECT count(*) FROM t").fetchone() == (41,)


# The DDL the releases before appliance/storage/schema.py shipped, verbatim (whitespace folded):
# the record of what existing databases hold. The Tables must create exactly these tables.
SHIPPED_DDL: dict[int, list[str]] = {
    1: [
        ("CREATE TABLE certificates ( serial VARCHAR(40) PRIMARY KEY, subject TEXT NOT "
         "NULL, sans TEXT NOT NULL, not_before INTEGER NOT NULL, not_after INTEGER NOT "
         "NULL, provisioner VARCHAR(128) NOT NULL, status VARCHAR(16) NOT NULL, token_id "
         "TEXT, der BLOB, created_at INTEGER NOT NULL, issued_at INTEGER)"),
        "CREATE INDEX certificates_not_after ON certificates (not_after)",
        ("CREATE TABLE used_tokens ( provisioner VARCHAR(128) NOT NULL, jti VARCHAR(256) "
         "NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER NOT NULL, PRIMARY KEY "
         "(provisioner, jti))"),
        "CREATE INDEX used_tokens_expires ON used_tokens (expires_at)",
    ],
    2: [
        ("CREATE TABLE revocations ( serial VARCHAR(40) PRIMARY KEY REFERENCES "
         "certificates (serial), reason_code INTEGER NOT NULL, reason TEXT NOT NULL, "
         "revoked_at INTEGER NOT NULL, provisioner VARCHAR(128) NOT NULL, method "
         "VARCHAR(32) NOT NULL, not_after INTEGER NOT NULL)"),
        "CREATE INDEX revocations_not_after ON revocations (not_after)",
        ("CREATE TABLE crls ( number INTEGER PRIMARY KEY, this_update INTEGER NOT NULL, "
         "next_update INTEGER NOT NULL, der BLOB)"),
    ],
    3: [
        ("CREATE TABLE acme_accounts (id VARCHAR(64) PRIMARY KEY, provisioner VARCHAR(128) "
         "NOT NULL, thumbprint VARCHAR(64) NOT NULL, jwk TEXT NOT NULL, status VARCHAR(16) "
         "NOT NULL, contact TEXT NOT NULL, eab_kid VARCHAR(128), created_at INTEGER NOT "
         "NULL)"),
        "CREATE UNIQUE INDEX acme_accounts_key ON acme_accounts (provisioner, thumbprint)",
        ("CREATE TABLE acme_orders (id VARCHAR(64) PRIMARY KEY, provisioner VARCHAR(128) "
         "NOT NULL, account_id VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, expires "
         "INTEGER NOT NULL, identifiers TEXT NOT NULL, not_before INTEGER, not_after "
         "INTEGER, authz_ids TEXT NOT NULL, error TEXT, cert_serial VARCHAR(40), replaces "
         "VARCHAR(256), created_at INTEGER NOT NULL)"),
        "CREATE INDEX acme_orders_account ON acme_orders (account_id)",
        "CREATE INDEX acme_orders_expires ON acme_orders (expires)",
        ("CREATE TABLE acme_authzs (id VARCHAR(64) PRIMARY KEY, order_id VARCHAR(64) NOT "
         "NULL, account_id VARCHAR(64) NOT NULL, identifier_type VARCHAR(8) NOT NULL, "
         "identifier_value VARCHAR(255) NOT NULL, wildcard INTEGER NOT NULL, status "
         "VARCHAR(16) NOT NULL, expires INTEGER NOT NULL)"),
        "CREATE INDEX acme_authzs_order ON acme_authzs (order_id)",
        ("CREATE TABLE acme_challenges (id VARCHAR(64) PRIMARY KEY, authz_id VARCHAR(64) "
         "NOT NULL, type VARCHAR(16) NOT NULL, token VARCHAR(64) NOT NULL, status "
         "VARCHAR(16) NOT NULL, validated INTEGER, error TEXT)"),
        "CREATE INDEX acme_challenges_authz ON acme_challenges (authz_id)",
        ("CREATE TABLE acme_nonces (nonce VARCHAR(128) PRIMARY KEY, expires_at INTEGER NOT "
         "NULL)"),
        "CREATE INDEX acme_nonces_expires ON acme_nonces (expires_at)",
        ("CREATE TABLE acme_eab_keys (kid VARCHAR(128) PRIMARY KEY, provisioner "
         "VARCHAR(128) NOT NULL, reference VARCHAR(256), hmac_key BLOB NOT NULL, "
         "created_at INTEGER NOT NULL, account_id VARCHAR(64), bound_at INTEGER)"),
        "CREATE UNIQUE INDEX acme_eab_reference ON acme_eab_keys (provisioner, reference)",
        "CREATE TABLE acme_secrets (name VARCHAR(64) PRIMARY KEY, value BLOB NOT NULL)",
    ],
}



def schema_of(path: Path) -> dict[str, object]:
    """What a database's tables are, as SQLite reports them (not the text of their DDL)."""
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        schema: dict[str, object] = {}
        for table in tables:
            indexes = {}
            for _, name, unique, origin, partial in db.execute(f"PRAGMA index_list({table})"):
                columns = [r[2] for r in db.execute(f"PRAGMA index_info({name})")]
                indexes[name if origin == "c" else origin] = (unique, partial, columns)
            columns = db.execute(f"PRAGMA table_info({table})").fetchall()
            key = [c for c in columns if c[5]]
            schema[table] = {
                "columns": columns, "indexes": indexes,
                "foreign_keys": db.execute(f"PRAGMA foreign_key_list({table})").fetchall(),
                # An INTEGER primary key of its own is the rowid: NULL there means "the next".
                "rowid_alias": len(key) == 1 and key[0][2] == "INTEGER",
            }
    return schema


def shipped_database(path: Path, up_to: int) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                   "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        for version in range(1, up_to + 1):
            for sql in SHIPPED_DDL[version]:
                db.execute(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))


def test_the_tables_create_exactly_the_schema_earlier_releases_shipped(tmp_path: Path) -> None:
    assert max(SHIPPED_DDL) == LATEST_VERSION, "a new migration needs its shipped DDL recorded"
    shipped_database(tmp_path / "shipped.db", LATEST_VERSION)
    SqliteStore.create(tmp_path / "new.db")
    assert schema_of(tmp_path / "new.db") == schema_of(tmp_path / "shipped.db")
    declared = {t.name for m in MIGRATIONS for t in m.tables} | {"schema_migrations"}
    assert declared == set(metadata.tables), "every Table belongs to exactly one migration"


async def test_a_database_of_an_earlier_version_is_migrated_and_keeps_its_rows(
        tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    shipped_database(path, 2)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO certificates VALUES ('2a', 'CN=old', '[]', 0, 1, 'admin', "
                   "'issued', NULL, x'3003', 0, 0)")
    store = SqliteStore.open(path)
    assert store.schema_version() == LATEST_VERSION
    record = await store.get_certificate(0x2A)
    assert record is not None and (record.subject, record.der) == ("CN=old", b"\x30\x03")
    await store.close()
    shipped_database(tmp_path / "shipped.db", LATEST_VERSION)
    assert schema_of(path) == schema_of(tmp_path / "shipped.db")
