"""The SELECTs of the SQLite ACME store, and the records their rows make."""

from __future__ import annotations

import json

from appliance.storage.acme_protocol import (
    AccountStatus,
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    ChallengeType,
    EabKey,
    Identifier,
    IdentifierType,
    JsonObject,
    OrderStatus,
)
from appliance.storage.sqlite_acme_reads import NC, Row

SELECT_ACCOUNT = ("SELECT id, provisioner, thumbprint, jwk, status, contact, eab_kid, "
                  "created_at FROM acme_accounts ")
SQL_ACCOUNT_BY_ID = SELECT_ACCOUNT + "WHERE id = ? AND provisioner = ?"
SQL_ACCOUNT_BY_THUMBPRINT = SELECT_ACCOUNT + "WHERE provisioner = ? AND thumbprint = ?"
SQL_ORDER = ("SELECT id, provisioner, account_id, status, expires, identifiers, not_before, "
             "not_after, authz_ids, error, cert_serial, replaces FROM acme_orders WHERE id = ?")
SQL_AUTHZ = ("SELECT id, order_id, account_id, identifier_type, identifier_value, wildcard, "
             "status, expires FROM acme_authzs WHERE id = ?")
SELECT_CHALLENGE = ("SELECT id, authz_id, type, token, status, validated, error "
                    "FROM acme_challenges ")
SQL_AUTHZ_CHALLENGES = SELECT_CHALLENGE + "WHERE authz_id = ? ORDER BY type"
SQL_CHALLENGE = SELECT_CHALLENGE + "WHERE id = ?"
SELECT_EAB = ("SELECT kid, provisioner, reference, hmac_key, created_at, account_id, bound_at "
              "FROM acme_eab_keys ")

# Each authenticated ACME request reads its account and the object its URL names. As one SELECT
# (the account LEFT JOINed with the object) it is one consistent snapshot by itself: no
# BEGIN/ROLLBACK around it, and one trip into SQLite instead of four or five, each of which lets
# go of the GIL and may have to wait to get it back from the writer or the PKCS#11 thread.
SELECT_JOINED_ACCOUNT = ("SELECT a.id, a.provisioner, a.thumbprint, a.jwk, a.status, "
                         "a.contact, a.eab_kid, a.created_at, ")
JOINED_ORDER_COLUMNS = ("o.id, o.provisioner, o.account_id, o.status, o.expires, "
                        "o.identifiers, o.not_before, o.not_after, o.authz_ids, o.error, "
                        "o.cert_serial, o.replaces")
SQL_ACCOUNT_ORDER = (
    SELECT_JOINED_ACCOUNT + JOINED_ORDER_COLUMNS + " "
    "FROM acme_accounts a LEFT JOIN acme_orders o ON o.id = ? "
    "WHERE a.id = ? AND a.provisioner = ?")
# The certificates table is the store's; cert_serial is its key (lowercase hex).
SQL_ACCOUNT_ORDER_DER = (
    SELECT_JOINED_ACCOUNT + JOINED_ORDER_COLUMNS + ", k.der "
    "FROM acme_accounts a LEFT JOIN acme_orders o ON o.id = ? "
    "LEFT JOIN certificates k ON k.serial = o.cert_serial "
    "WHERE a.id = ? AND a.provisioner = ?")
SQL_ACCOUNT_AUTHZ = (
    SELECT_JOINED_ACCOUNT + "z.id, z.order_id, z.account_id, z.identifier_type, "
    "z.identifier_value, z.wildcard, z.status, z.expires, c.id, c.authz_id, c.type, c.token, "
    "c.status, c.validated, c.error "
    "FROM acme_accounts a LEFT JOIN acme_authzs z ON z.id = ? "
    "LEFT JOIN acme_challenges c ON c.authz_id = z.id "
    "WHERE a.id = ? AND a.provisioner = ? ORDER BY c.type")
SQL_ACCOUNT_CHALLENGE = (
    SELECT_JOINED_ACCOUNT + "t.id, t.authz_id, t.type, t.token, t.status, t.validated, "
    "t.error, "
    "z.id, z.order_id, z.account_id, z.identifier_type, z.identifier_value, z.wildcard, "
    "z.status, z.expires, c.id, c.authz_id, c.type, c.token, c.status, c.validated, c.error "
    "FROM acme_accounts a LEFT JOIN acme_challenges t ON t.id = ? "
    "LEFT JOIN acme_authzs z ON z.id = t.authz_id "
    "LEFT JOIN acme_challenges c ON c.authz_id = z.id "
    "WHERE a.id = ? AND a.provisioner = ? ORDER BY c.type")
NZ = 8  # columns of an authorization


def json_object_of(text: str | None) -> JsonObject | None:
    if not text:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def account_of(row: Row) -> AcmeAccount:
    return AcmeAccount(row[0], row[1], row[2], json.loads(row[3]), AccountStatus(row[4]),
                       tuple(json.loads(row[5])), row[6], row[7])


def identifiers_of(text: str) -> tuple[Identifier, ...]:
    return tuple(Identifier(IdentifierType(i["type"]), i["value"]) for i in json.loads(text))


def order_of(row: Row) -> AcmeOrder:
    return AcmeOrder(row[0], row[1], row[2], OrderStatus(row[3]), row[4], identifiers_of(row[5]),
                     row[6], row[7], tuple(json.loads(row[8])), json_object_of(row[9]), row[10],
                     row[11])


def challenge_of(row: Row) -> AcmeChallenge:
    return AcmeChallenge(row[0], row[1], ChallengeType(row[2]), row[3], ChallengeStatus(row[4]),
                         row[5], json_object_of(row[6]))


def authz_of(row: Row, challenges: tuple[AcmeChallenge, ...]) -> AcmeAuthz:
    return AcmeAuthz(row[0], row[1], row[2], Identifier(IdentifierType(row[3]), row[4]),
                     bool(row[5]), AuthorizationStatus(row[6]), row[7], challenges)


def eab_of(row: Row) -> EabKey:
    return EabKey(row[0], row[1], row[2], bytes(row[3]), row[4], row[5], row[6])


def authz_from(rows: list[Row], at: int) -> AcmeAuthz | None:
    """The authorization at column `at` of joined rows, with the challenges that follow it."""
    first = rows[0]
    if first[at] is None:
        return None
    chals = tuple(challenge_of(r[at + NZ:at + NZ + NC]) for r in rows if r[at + NZ] is not None)
    return authz_of(first[at:at + NZ], chals)
