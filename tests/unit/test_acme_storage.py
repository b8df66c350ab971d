"""ACME state in a real SQLite store: single-use nonces with the change they authorize, and the
event-loop reader that ACME lookups use (what it sees, and what it does when it cannot read)."""

import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path

from appliance.storage import acme as st
from appliance.storage.sqlite import SqliteStore

FAR = 2**40  # an expiry that never comes


def account(key: str = "thumb") -> st.AcmeAccount:
    return st.AcmeAccount(st.new_id(), "acme", key, {"kty": "EC", "crv": "P-256", "x": "x",
                                                      "y": "y"},
                          "valid", ["mailto:a@example.test"], None, 1)


def order_for(acct: st.AcmeAccount) -> tuple[st.AcmeOrder, list[st.AcmeAuthz]]:
    order_id, authz_id = st.new_id(), st.new_id()
    authz = st.AcmeAuthz(authz_id, order_id, acct.id, "dns", "a.example.test", False, "pending",
                         FAR, [st.AcmeChallenge(st.new_id(), authz_id, "http-01", "tok",
                                                "pending", None, None)])
    order = st.AcmeOrder(order_id, "acme", acct.id, "pending", FAR,
                         [{"type": "dns", "value": "a.example.test"}], None, None, [authz_id],
                         None, None, None)
    return order, [authz]


async def test_a_nonce_authorizes_one_change_and_a_replay_writes_nothing(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    try:
        acct = await store.run_op(st.op_create_account(account(), None))
        first, authzs = order_for(acct)
        assert await store.run_op(st.op_with_nonce("n1", FAR, st.op_create_order(first, authzs))
                                  ) == (True, first)
        second, more = order_for(acct)
        assert await store.run_op(st.op_with_nonce("n1", FAR, st.op_create_order(second, more))
                                  ) == (False, None)
        assert await store.run_read(st.op_list_orders(acct.id)) == [first.id]
        assert not await store.run_op(st.op_use_nonce("n1", FAR)), "the nonce was used once"
    finally:
        await store.close()


async def test_the_event_loop_reader_sees_every_commit(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    reader = st.AcmeReader(store.path, store.run_read)
    try:
        acct = await store.run_op(st.op_create_account(account(), None))
        order, authzs = order_for(acct)
        await store.run_op(st.op_create_order(order, authzs))
        chal = authzs[0].challenges[0]
        found = await reader.read(st.op_account_and_challenge("acme", acct.id, chal.id),
                                  one_statement=True)
        assert found == (acct, (chal, authzs[0]))
        await store.run_op(st.op_start_challenge(chal.id))
        done = await store.run_op(st.op_finish_challenge(chal.id, True, None))
        assert done.status == "valid"
        assert (await reader.read(st.op_get_challenge(chal.id))) == done
        refreshed = await reader.read(st.op_get_order(order.id))
        assert refreshed is not None and refreshed.status == "ready"
        assert await reader.read(st.op_get_order("no-such-order")) is None
    finally:
        reader.close()
        await store.close()


async def test_an_account_is_read_with_what_a_request_names_or_not_at_all(tmp_path: Path
                                                                          ) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    reader = st.AcmeReader(store.path, store.run_read)
    try:
        acct = await store.run_op(st.op_create_account(account(), None))
        other = await store.run_op(st.op_create_account(account("other-key"), None))
        order, authzs = order_for(acct)
        authz = authzs[0]
        # Two challenges, made in the opposite order to the one they are read back in.
        chals = [st.AcmeChallenge(st.new_id(), authz.id, kind, "tok", "pending", None, None)
                 for kind in ("tls-alpn-01", "http-01")]
        await store.run_op(st.op_create_order(order, [dataclasses.replace(authz,
                                                                           challenges=chals)]))
        authz = dataclasses.replace(authz, challenges=chals[::-1])

        async def read(op: st.AccountRead) -> object:
            return await reader.read(op, one_statement=True)

        assert await read(st.op_account_and_order("acme", acct.id, order.id)) == (acct, order)
        assert await read(st.op_account_and_order_with_certificate("acme", acct.id, order.id)
                          ) == (acct, (order, None)), "an order without a certificate has none"
        assert await read(st.op_account_and_authz("acme", acct.id, authz.id)) == (acct, authz)
        assert [c.type for c in authz.challenges] == ["http-01", "tls-alpn-01"]
        assert await read(st.op_account_and_challenge("acme", acct.id, chals[0].id)
                          ) == (acct, (chals[0], authz)), "the challenge and all its siblings"
        # Another account sees its own record and the object (ownership is the caller's check).
        assert await read(st.op_account_and_order("acme", other.id, order.id)) == (other, order)
        # A missing object: the account alone.
        assert await read(st.op_account_and_order("acme", acct.id, "nope")) == (acct, None)
        assert await read(st.op_account_and_authz("acme", acct.id, "nope")) == (acct, None)
        assert await read(st.op_account_and_challenge("acme", acct.id, "nope")
                          ) == (acct, (None, None))
        assert await read(st.op_account_and_order_with_certificate("acme", acct.id, "nope")
                          ) == (acct, (None, None))
        # No such account, or one of another provisioner: nothing, not even the object.
        assert await read(st.op_account_and_order("acme", "nope", order.id)) == (None, None)
        assert await read(st.op_account_and_order("other", acct.id, order.id)) == (None, None)
        assert await read(st.op_account_and_authz("other", acct.id, authz.id)) == (None, None)
        assert await read(st.op_account_and_challenge("other", acct.id, chals[0].id)
                          ) == (None, (None, None))
        # The store's reader thread (the fallback) reads the same through SQLAlchemy.
        assert await store.run_read(st.op_account_and_authz("acme", acct.id, authz.id)
                                    ) == (acct, authz)
    finally:
        reader.close()
        await store.close()


async def test_a_read_sqlite_refuses_on_the_event_loop_goes_to_the_store(tmp_path: Path
                                                                         ) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    handed: list[object] = []

    async def fallback(op: Callable[[st.Db], object]) -> object:
        handed.append(op)
        return await store.run_read(op)

    reader = st.AcmeReader(store.path, fallback)
    try:
        acct = await store.run_op(st.op_create_account(account(), None))
        find = st.op_find_account("acme", account_id=acct.id)
        assert await reader.read(find) == acct
        assert handed == [], "a plain read went to the reader thread"

        def busy_here(conn: st.Db) -> object:
            if isinstance(conn, sqlite3.Connection):  # the event loop's own connection
                find(conn)  # a snapshot is open when SQLite says it is busy
                raise sqlite3.OperationalError("database is locked")
            return find(conn)

        assert await reader.read(busy_here) == acct
        assert handed == [busy_here]
        assert await reader.read(find) == acct, "the loop's connection was left unusable"
        assert handed == [busy_here]
        # A one-statement read runs outside BEGIN; busy, it goes to the reader thread as well.
        assert await reader.read(busy_here, one_statement=True) == acct
        assert handed == [busy_here, busy_here]
        assert await reader.read(find, one_statement=True) == acct
        assert handed == [busy_here, busy_here]
    finally:
        reader.close()
        await store.close()


async def test_a_reader_that_cannot_open_the_database_uses_the_store(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    handed: list[object] = []

    async def fallback(op: Callable[[st.Db], object]) -> object:
        handed.append(op)
        return await store.run_read(op)

    reader = st.AcmeReader(tmp_path / "missing" / "a.db", fallback)
    try:
        acct = await store.run_op(st.op_create_account(account(), None))
        assert await reader.read(st.op_find_account("acme", account_id=acct.id)) == acct
        assert len(handed) == 1
    finally:
        reader.close()
        await store.close()
