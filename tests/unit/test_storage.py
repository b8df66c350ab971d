"""The SQLite store against a real database file: durability rules, replays, migrations."""

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import StorageError
from appliance.storage import CertificateIntent, TokenReused, TokenUse
from appliance.storage.sqlite import MIGRATIONS, SqliteStore

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

    latest = MIGRATIONS[-1][0]
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
