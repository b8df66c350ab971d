"""ACME state in a real SQLite store: single-use nonces with the change they authorize, typed
refusals, and the event-loop reader that ACME lookups use (what it sees, and what it does when
it cannot read)."""

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from appliance.acme import messages
from appliance.errors import RecordConflict, RecordNotFound, TokenReused
from appliance.storage.acme_protocol import (
    AccountChange,
    AccountStatus,
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    ChallengeType,
    Identifier,
    IdentifierType,
    NonceUse,
    OrderStatus,
    new_id,
)
from appliance.storage.sqlite import SqliteStore
from appliance.storage.sqlite_acme import SqliteAcmeStore
from appliance.storage.sqlite_acme_reads import AcmeReader, Db

FAR = 2**40  # an expiry that never comes
NAME = Identifier(IdentifierType.DNS, "a.example.test")


def account(key: str = "thumb") -> AcmeAccount:
    return AcmeAccount(new_id(), "acme", key, {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"},
                       AccountStatus.VALID, ("mailto:a@example.test",), None, 1)


def challenge(authz_id: str, kind: ChallengeType = ChallengeType.HTTP_01) -> AcmeChallenge:
    return AcmeChallenge(new_id(), authz_id, kind, "tok", ChallengeStatus.PENDING, None, None)


def order_for(acct: AcmeAccount) -> tuple[AcmeOrder, list[AcmeAuthz]]:
    order_id, authz_id = new_id(), new_id()
    authz = AcmeAuthz(authz_id, order_id, acct.id, NAME, False, AuthorizationStatus.PENDING,
                      FAR, (challenge(authz_id),))
    order = AcmeOrder(order_id, "acme", acct.id, OrderStatus.PENDING, FAR, (NAME,), None, None,
                      (authz_id,), None, None, None)
    return order, [authz]


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteAcmeStore]]:
    store = SqliteStore.open(tmp_path / "a.db")
    acme = SqliteAcmeStore(store)
    try:
        yield store, acme
    finally:
        await acme.close()
        await store.close()


async def test_a_nonce_authorizes_one_change_and_a_replay_writes_nothing(
        stores: tuple[SqliteStore, SqliteAcmeStore]) -> None:
    _, acme = stores
    acct = await acme.create_account(account())
    first, authzs = order_for(acct)
    await acme.create_order(first, authzs, created_at=1, nonce=NonceUse("n1", FAR))
    second, more = order_for(acct)
    with pytest.raises(TokenReused):
        await acme.create_order(second, more, created_at=2, nonce=NonceUse("n1", FAR))
    assert await acme.list_orders(acct.id) == [first.id]
    assert await acme.get_order(second.id) is None, "a replayed nonce wrote its order"
    with pytest.raises(TokenReused):
        await acme.use_nonce(NonceUse("n1", FAR))


async def test_a_validation_settles_the_authorization_and_the_order_by_the_callers_rule(
        stores: tuple[SqliteStore, SqliteAcmeStore]) -> None:
    _, acme = stores
    acct = await acme.create_account(account())
    order, authzs = order_for(acct)
    await acme.create_order(order, authzs, created_at=1)
    chal = authzs[0].challenges[0]
    assert await acme.transition_challenge(chal.id, from_=ChallengeStatus.PENDING,
                                           to=ChallengeStatus.PROCESSING)
    assert not await acme.transition_challenge(chal.id, from_=ChallengeStatus.PENDING,
                                               to=ChallengeStatus.PROCESSING), \
        "two callers both started one validation"
    done = await acme.finish_challenge(
        chal.id, status=ChallengeStatus.VALID, validated=5, error=None,
        authz_status=AuthorizationStatus.VALID, authz_from=messages.AUTHZ_SETTLED_FROM,
        settle=messages.settle_order)
    assert (done.status, done.validated) == (ChallengeStatus.VALID, 5)
    assert await acme.get_challenge(chal.id) == done
    refreshed = await acme.get_order(order.id)
    assert refreshed is not None and refreshed.status is OrderStatus.READY
    assert await acme.get_order("no-such-order") is None
    with pytest.raises(RecordNotFound):
        await acme.finish_challenge(
            "nope", status=ChallengeStatus.VALID, validated=5, error=None,
            authz_status=AuthorizationStatus.VALID, authz_from=messages.AUTHZ_SETTLED_FROM,
            settle=messages.settle_order)


async def test_conflicts_are_typed_refusals(stores: tuple[SqliteStore, SqliteAcmeStore]
                                            ) -> None:
    _, acme = stores
    acct = await acme.create_account(account())
    assert await acme.create_account(account()) == acct, "a second account for one key"
    other = await acme.create_account(account("other-key"))
    with pytest.raises(RecordConflict):
        await acme.update_account(other.id, AccountChange(jwk={"k": "v"}, thumbprint="thumb"))
    key = await acme.add_eab_key("acme", "ref", created_at=1)
    with pytest.raises(RecordConflict):
        await acme.add_eab_key("acme", "ref", created_at=2)
    bound = dataclasses.replace(account("third"), eab_kid=key.kid)
    await acme.create_account(bound)
    with pytest.raises(RecordConflict):
        await acme.create_account(dataclasses.replace(account("fourth"), eab_kid=key.kid))
    with pytest.raises(RecordNotFound):
        await acme.update_account("nope", AccountChange(status=AccountStatus.DEACTIVATED))


async def test_an_account_is_read_with_what_a_request_names_or_not_at_all(
        stores: tuple[SqliteStore, SqliteAcmeStore]) -> None:
    _, acme = stores
    acct = await acme.create_account(account())
    other = await acme.create_account(account("other-key"))
    order, authzs = order_for(acct)
    authz = authzs[0]
    # Two challenges, made in the opposite order to the one they are read back in.
    chals = (challenge(authz.id, ChallengeType.TLS_ALPN_01), challenge(authz.id))
    await acme.create_order(order, [dataclasses.replace(authz, challenges=chals)],
                            created_at=1)
    authz = dataclasses.replace(authz, challenges=chals[::-1])

    assert await acme.account_and_order("acme", acct.id, order.id) == (acct, order)
    assert await acme.account_and_order_certificate("acme", acct.id, order.id
                                                    ) == (acct, (order, None)), \
        "an order without a certificate has none"
    assert await acme.account_and_authz("acme", acct.id, authz.id) == (acct, authz)
    assert [c.type for c in authz.challenges] == [ChallengeType.HTTP_01,
                                                  ChallengeType.TLS_ALPN_01]
    assert await acme.account_and_challenge("acme", acct.id, chals[0].id
                                            ) == (acct, (chals[0], authz)), \
        "the challenge and all its siblings"
    # Another account sees its own record and the object (ownership is the caller's check).
    assert await acme.account_and_order("acme", other.id, order.id) == (other, order)
    # A missing object: the account alone.
    assert await acme.account_and_order("acme", acct.id, "nope") == (acct, None)
    assert await acme.account_and_authz("acme", acct.id, "nope") == (acct, None)
    assert await acme.account_and_challenge("acme", acct.id, "nope") == (acct, (None, None))
    assert await acme.account_and_order_certificate("acme", acct.id, "nope"
                                                    ) == (acct, (None, None))
    # No such account, or one of another provisioner: nothing, not even the object.
    assert await acme.account_and_order("acme", "nope", order.id) == (None, None)
    assert await acme.account_and_order("other", acct.id, order.id) == (None, None)
    assert await acme.account_and_authz("other", acct.id, authz.id) == (None, None)
    assert await acme.account_and_challenge("other", acct.id, chals[0].id
                                            ) == (None, (None, None))
    assert await acme.get_authz(authz.id) == authz


async def test_a_read_sqlite_refuses_on_the_event_loop_goes_to_the_store(tmp_path: Path
                                                                         ) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    acme = SqliteAcmeStore(store)
    handed: list[object] = []

    async def fallback(op: Callable[[Db], object]) -> object:
        handed.append(op)
        return await store.run_read(op)

    reader = AcmeReader(store.path, fallback)
    try:
        acct = await acme.create_account(account())

        def find(conn: Db) -> object:
            row = conn.execute("SELECT id FROM acme_accounts").fetchone()  # type: ignore[union-attr]
            return None if row is None else row[0]

        assert await reader.read(find) == acct.id
        assert handed == [], "a plain read went to the reader thread"

        def busy_here(conn: Db) -> object:
            if isinstance(conn, sqlite3.Connection):  # the event loop's own connection
                find(conn)  # a snapshot is open when SQLite says it is busy
                raise sqlite3.OperationalError("database is locked")
            return acct.id

        assert await reader.read(busy_here) == acct.id
        assert handed == [busy_here]
        assert await reader.read(find) == acct.id, "the loop's connection was left unusable"
        assert handed == [busy_here]
        # A one-statement read runs outside BEGIN; busy, it goes to the reader thread as well.
        assert await reader.read(busy_here, one_statement=True) == acct.id
        assert handed == [busy_here, busy_here]
        assert await reader.read(find, one_statement=True) == acct.id
        assert handed == [busy_here, busy_here]
    finally:
        reader.close()
        await acme.close()
        await store.close()


async def test_a_reader_that_cannot_open_the_database_uses_the_store(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "a.db")
    acme = SqliteAcmeStore(store)
    handed: list[object] = []

    async def fallback(op: Callable[[Db], object]) -> object:
        handed.append(op)
        return await store.run_read(op)

    reader = AcmeReader(tmp_path / "missing" / "a.db", fallback)
    try:
        acct = await acme.create_account(account())
        assert await reader.read(lambda conn: acct.id) == acct.id
        assert len(handed) == 1
    finally:
        reader.close()
        await acme.close()
        await store.close()
