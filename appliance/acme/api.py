"""RFC 8555 over aiohttp: thin handlers over the ACME state in the store and the authority.

Routes live under /acme/{provisioner}/ and /2.0/acme/{provisioner}/. Every response carries a
fresh Replay-Nonce and Link rel="index"; every error is an RFC 8555 problem document.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from appliance.acme import jws
from appliance.acme.challenges import (
    ChallengeFailed,
    HttpValidationClient,
    ValidationSettings,
    validate_dns01,
    validate_http01,
    validate_tls_alpn01,
)
from appliance.acme.nonces import NonceIssuer
from appliance.acme.problems import AcmeProblem, from_appliance_error
from appliance.api.app import STATE
from appliance.authority.authority import Authority
from appliance.authority.lifecycle import RevokeRequest
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.durations import parse_duration
from appliance.errors import ApplianceError, PolicyViolation
from appliance.issuance.names import normalise_dns
from appliance.storage import acme as st
from appliance.storage.sqlite import SqliteStore, serial_hex

log = structlog.get_logger("appliance.acme")

MAX_IDENTIFIERS = 100
CHALLENGE_WAIT = 2.0  # seconds a challenge POST waits for its validation before answering
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def problem(kind: str, detail: str, status: int | None = None) -> AcmeProblem:
    return AcmeProblem(kind, detail, status)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise problem("malformed", f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise problem("malformed", f"{what} is not valid base64url") from None


def iso(ts: int | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace(
        "+00:00", "Z")


@dataclass
class AcmeState:
    """Services the ACME handlers use; swapped on reload like the API's."""

    authority: Authority
    store: SqliteStore
    settings: ValidationSettings
    max_concurrent: int
    order_lifetime: timedelta
    nonces: NonceIssuer | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    semaphore: asyncio.Semaphore | None = None
    http_client: HttpValidationClient | None = None  # made on first use, closed at cleanup
    reader: st.AcmeReader | None = None  # likewise; used from the event loop's thread only

    def reads(self) -> st.AcmeReader:
        if self.reader is None:
            self.reader = st.AcmeReader(self.store.path, self.store.run_read)
        return self.reader

    def http_validation_client(self) -> HttpValidationClient:
        if self.http_client is None:
            self.http_client = HttpValidationClient(self.settings)
        return self.http_client

    async def close(self) -> None:
        """Let running validations finish (bounded by their timeout), then close the client."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.settings.timeout + 5)
        if self.http_client is not None:
            await self.http_client.close()
        if self.reader is not None:
            self.reader.close()


ACME = web.AppKey("acme", AcmeState)


class Ctx:
    """One request's view: which provisioner, its base URL."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.state = request.app[ACME]
        name = request.match_info["provisioner"]
        prov = self.state.authority.provisioner_named(name)
        if not isinstance(prov, AcmeProvisioner):
            raise problem("malformed", f"no ACME provisioner named {name!r}", 404)
        self.provisioner = prov
        prefix = "/2.0" if request.path.startswith("/2.0/") else ""
        self.base = f"https://{request.host}{prefix}/acme/{name}"

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    @property
    def store(self) -> SqliteStore:
        return self.state.store

    async def read(self, op: Callable[[Any], T], *, one_statement: bool = False) -> T:
        """Run a storage read (one snapshot; see `AcmeReader.read` for `one_statement`)."""
        return await self.state.reads().read(op, one_statement=one_statement)

    async def use_nonce(self) -> None:
        """Use up the request's nonce now (before a change of state that `write` cannot carry)."""
        pending = self.request.pop(_PENDING_NONCE, None)
        if pending is not None and not await self.store.run_op(st.op_use_nonce(*pending)):
            raise _replayed()

    async def write(self, op: Callable[[Any], T]) -> T:
        """Run a write; the request's nonce, if not yet used, is used in the same commit.

        `op` must return its refusals, not raise them (the nonce is written first).
        """
        pending = self.request.pop(_PENDING_NONCE, None)
        if pending is None:
            return await self.store.run_op(op)
        nonce, expires = pending
        fresh, result = await self.store.run_op(st.op_with_nonce(nonce, expires, op))
        if not fresh:
            raise _replayed()
        return cast(T, result)


# -- responses ----------------------------------------------------------------------------------
async def _nonce(state: AcmeState) -> str:
    if state.nonces is None:
        state.nonces = NonceIssuer(await state.store.run_op(st.op_get_secret("acme-nonce-key")))
    return state.nonces.new()


def _json(ctx: Ctx, body: Any, status: int = 200, location: str | None = None,
          links: list[str] | None = None) -> web.Response:
    response = web.json_response(body, status=status)
    if location:
        response.headers["Location"] = location
    for link in links or []:
        response.headers.add("Link", link)
    return response


def _problem_response(prob: AcmeProblem) -> web.Response:
    return web.json_response(prob.to_json(), status=prob.status,
                             content_type="application/problem+json")


@web.middleware
async def acme_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Problem documents, Replay-Nonce and Link rel=index on every ACME response.

    A request's nonce is used up before its answer leaves, whatever the answer: a handler that
    changes state uses it in the same commit (`Ctx.write`), and here every other request's
    nonce is used, so a replay gets badNonce instead of what the handler answered.
    """
    state = request.app[ACME]
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status = 413 if isinstance(e, web.HTTPRequestEntityTooLarge) else e.status
        detail = ("request body is too large" if status == 413
                  else f"{e.reason}: {request.method} {request.path[:200]}")
        response = _problem_response(problem("malformed", detail, status))
    except (AcmeProblem, ApplianceError) as e:
        prob = e if isinstance(e, AcmeProblem) else from_appliance_error(e)
        response = _problem_response(prob)
        request["error"] = prob.detail
    pending: tuple[str, int] | None = request.pop(_PENDING_NONCE, None)
    if pending is not None:
        refusal: AcmeProblem | None
        try:
            fresh = await state.store.run_op(st.op_use_nonce(*pending))
        except ApplianceError as e:
            refusal = from_appliance_error(e)
        else:
            refusal = None if fresh else _replayed()
        if refusal is not None:
            response = _problem_response(refusal)
            request["error"] = refusal.detail
    await add_acme_headers(state, request, response)
    return response


async def add_acme_headers(state: AcmeState, request: web.Request,
                           response: web.StreamResponse) -> None:
    """What every ACME response carries: a fresh Replay-Nonce, no-store, Link rel="index".

    Also called for the answers given before the ACME app runs (the edge's 429s), so that a
    client told to slow down has the nonce for its next try (RFC 8555 section 6.5).
    """
    try:
        response.headers["Replay-Nonce"] = await _nonce(state)
    except ApplianceError:
        pass
    response.headers["Cache-Control"] = "no-store"
    name = request.match_info.get("provisioner")
    if name:
        prefix = "/2.0" if request.path.startswith("/2.0/") else ""
        response.headers.add("Link", f'<https://{request.host}{prefix}/acme/{name}/directory>'
                                     ';rel="index"')


# -- authentication of a POST -------------------------------------------------------------------
# request key: (nonce, expiry) of a request whose nonce is checked but not yet used up.
_PENDING_NONCE = "acme_pending_nonce"


def _replayed() -> AcmeProblem:
    return problem("badNonce", "the nonce is unknown, expired or already used")


@dataclass
class Authenticated:
    message: jws.JwsMessage
    account: st.AcmeAccount | None
    jwk: dict[str, Any]
    found: Any = None  # what the `read` operation passed to authenticate returned


# How a kid request reads its account together with the object its URL names (provisioner,
# account id, the URL's id): one of the storage layer's op_account_and_* reads.
ReadWithAccount = Callable[[str, str, str], st.AccountRead]


async def authenticate(ctx: Ctx, *, jwk_allowed: bool = False, kid_allowed: bool = True,
                       need_account: bool = True,
                       read: ReadWithAccount | None = None) -> Authenticated:
    """Check a POST's JWS: shape, nonce (ours and unexpired), url, key, signature, account.

    The nonce is used up later, in the same commit as the request's first change of state
    (`Ctx.write`, `Ctx.use_nonce`) or by the middleware before the answer leaves. `read` (kid
    requests only) reads the account and the object named by the URL's id in one statement;
    that object is `found`.
    """
    request = ctx.request
    if request.content_type != "application/jose+json":
        raise problem("malformed", "ACME requests must be application/jose+json", 415)
    body = await request.read()
    message = jws.parse(body)
    if ctx.state.nonces is None:
        await _nonce(ctx.state)
    expires = ctx.state.nonces.check(message.nonce) if ctx.state.nonces else None
    if expires is None:
        raise _replayed()
    request[_PENDING_NONCE] = (message.nonce, expires)
    expected = f"https://{request.host}{request.path}"
    if message.url != expected:
        raise problem("unauthorized", f"the JWS url {message.url[:200]!r} is not the request "
                                      f"URL {expected!r}")
    account = None
    found = None
    if message.jwk is not None:
        if not jwk_allowed:
            raise problem("malformed", "this request must be signed with the account key "
                                       "(kid), not a jwk")
        key = message.jwk
    else:
        if not kid_allowed or message.kid is None:
            raise problem("malformed", "this request must carry a jwk, not a kid")
        prefix = ctx.url("account", "")
        if not message.kid.startswith(prefix):
            raise problem("accountDoesNotExist", "the kid is not an account URL of this "
                                                 "provisioner")
        account_id = message.kid[len(prefix):]
        if read is None:
            account = await ctx.read(st.op_find_account(ctx.provisioner.name,
                                                        account_id=account_id))
        else:
            account, found = await ctx.read(
                read(ctx.provisioner.name, account_id, request.match_info["id"]),
                one_statement=True)
        if account is None:
            raise problem("accountDoesNotExist", "no account with this kid exists")
        key = account.jwk
    jws.verify(message, key)
    if account is not None and account.status != "valid":
        raise problem("unauthorized", f"the account is {account.status}", 401)
    if need_account and account is None and not jwk_allowed:
        raise problem("accountDoesNotExist", "no account")
    return Authenticated(message, account, key, found)


def _account_json(ctx: Ctx, account: st.AcmeAccount) -> dict[str, Any]:
    return {"status": account.status, "contact": account.contact,
            "orders": ctx.url("account", account.id, "orders"),
            "termsOfServiceAgreed": True}


def _check_contacts(untrusted: Any) -> list[str]:
    if untrusted is None:
        return []
    if not isinstance(untrusted, list) or not all(isinstance(c, str) for c in untrusted):
        raise problem("malformed", "contact must be a list of URLs")
    for contact in untrusted:
        if not contact.startswith("mailto:"):
            raise problem("unsupportedContact", f"only mailto: contacts are supported, not "
                                                f"{contact[:80]!r}")
        address = contact[7:]
        if "@" not in address or "," in address or "?" in address or len(address) > 254:
            raise problem("invalidContact", f"{contact[:80]!r} is not a single e-mail address")
    return list(untrusted)


# -- handlers -----------------------------------------------------------------------------------
async def directory(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    meta: dict[str, Any] = {"externalAccountRequired": ctx.provisioner.require_eab}
    if ctx.provisioner.terms_of_service:
        meta["termsOfService"] = ctx.provisioner.terms_of_service
    return web.json_response({
        "newNonce": ctx.url("new-nonce"), "newAccount": ctx.url("new-account"),
        "newOrder": ctx.url("new-order"), "revokeCert": ctx.url("revoke-cert"),
        "keyChange": ctx.url("key-change"), "renewalInfo": ctx.url("renewal-info"),
        "meta": meta})


async def new_nonce(request: web.Request) -> web.Response:
    Ctx(request)
    status = 200 if request.method == "HEAD" else 204
    return web.Response(status=status)


async def new_account(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, jwk_allowed=True, kid_allowed=False, need_account=False)
    await ctx.use_nonce()
    payload = auth.message.payload_json()
    thumb = jws.thumbprint(auth.jwk)
    existing = await ctx.read(st.op_find_account(ctx.provisioner.name, thumbprint=thumb))
    if existing is not None:
        if existing.status != "valid":
            raise problem("unauthorized", f"the account for this key is {existing.status}", 401)
        return _json(ctx, _account_json(ctx, existing), 200, ctx.url("account", existing.id))
    if payload.get("onlyReturnExisting") is True:
        raise problem("accountDoesNotExist", "no account exists for this key")
    contacts = _check_contacts(payload.get("contact"))
    if ctx.provisioner.terms_of_service and payload.get("termsOfServiceAgreed") is not True:
        raise problem("userActionRequired", "agree to the terms of service to register")
    eab = payload.get("externalAccountBinding")
    eab_kid = None
    if eab is not None:
        eab_kid = await _check_eab(ctx, eab, auth.jwk)
    elif ctx.provisioner.require_eab:
        raise problem("externalAccountRequired", "this provisioner requires external account "
                                                 "binding (--eab with a key id and HMAC key)")
    account = st.AcmeAccount(st.new_id(), ctx.provisioner.name, thumb, auth.jwk, "valid",
                             contacts, eab_kid, int(time.time()))
    try:
        account = await ctx.store.run_op(st.op_create_account(account, eab_kid))
    except st.AcmeConflict as e:
        raise problem("unauthorized", str(e)) from None
    log.info("acme_account_created", provisioner=ctx.provisioner.name, account=account.id)
    return _json(ctx, _account_json(ctx, account), 201, ctx.url("account", account.id))


async def _check_eab(ctx: Ctx, eab: Any, outer_jwk: dict[str, Any]) -> str:
    kid = _eab_kid(eab)
    key = await ctx.read(st.op_get_eab(ctx.provisioner.name, kid))
    if key is None:
        raise problem("unauthorized", "unknown external account key id")
    if key.account_id is not None:
        raise problem("unauthorized", "this external account key is already bound to an "
                                      "account")
    return jws.verify_external_account_binding(
        eab, outer_jwk, ctx.url("new-account"), lambda k: key.hmac_key if k == kid else None)


def _eab_kid(eab: Any) -> str:
    if not isinstance(eab, dict) or not isinstance(eab.get("protected"), str):
        raise problem("malformed", "externalAccountBinding must be a flattened JWS")
    try:
        header = json.loads(b64url_decode(eab["protected"], "externalAccountBinding"))
    except ValueError:
        raise problem("malformed", "externalAccountBinding header is not JSON") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or not kid:
        raise problem("malformed", "externalAccountBinding needs a kid")
    return kid


async def account(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx)
    await ctx.use_nonce()
    assert auth.account is not None
    if request.match_info["id"] != auth.account.id:
        raise problem("unauthorized", "an account can only read or change itself")
    acct = auth.account
    if not auth.message.post_as_get:
        payload = auth.message.payload_json()
        status = payload.get("status")
        if status is not None and status != "deactivated":
            raise problem("malformed", "an account's status can only become deactivated")
        contacts = _check_contacts(payload["contact"]) if "contact" in payload else None
        acct = await ctx.store.run_op(st.op_update_account(acct.id, contact=contacts,
                                                           status=status))
    return _json(ctx, _account_json(ctx, acct), 200, ctx.url("account", acct.id))


async def key_change(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx)
    await ctx.use_nonce()
    assert auth.account is not None
    account_url = ctx.url("account", auth.account.id)
    inner = json.loads(auth.message.payload) if auth.message.payload else None
    new_jwk = jws.verify_key_change(inner, auth.message, account_url, auth.account.jwk)
    thumb = jws.thumbprint(new_jwk)
    other = await ctx.read(st.op_find_account(ctx.provisioner.name, thumbprint=thumb))
    if other is not None:
        response = web.json_response(problem("malformed", "another account uses that key", 409)
                                     .to_json(), status=409,
                                     content_type="application/problem+json")
        response.headers["Location"] = ctx.url("account", other.id)
        return response
    try:
        acct = await ctx.store.run_op(st.op_update_account(auth.account.id, jwk=new_jwk,
                                                           thumbprint=thumb))
    except st.AcmeConflict as e:
        raise problem("malformed", str(e), 409) from None
    log.info("acme_key_changed", account=acct.id)
    return _json(ctx, _account_json(ctx, acct), 200, account_url)


def _parse_identifiers(ctx: Ctx, untrusted: Any) -> list[dict[str, str]]:
    if not isinstance(untrusted, list) or not untrusted:
        raise problem("malformed", "identifiers must be a non-empty list")
    if len(untrusted) > MAX_IDENTIFIERS:
        raise problem("rejectedIdentifier", f"at most {MAX_IDENTIFIERS} identifiers per order")
    out: list[dict[str, str]] = []
    for ident in untrusted:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            raise problem("malformed", "each identifier needs a type and a value")
        kind, value = ident.get("type"), ident["value"]
        if kind == "dns":
            try:
                value = normalise_dns(value)
            except ApplianceError:
                raise problem("rejectedIdentifier", f"{value[:100]!r} is not a valid DNS name"
                              ) from None
            if "*" in value[1:] or (value.startswith("*") and not value.startswith("*.")):
                raise problem("rejectedIdentifier", f"{value!r}: a wildcard may only be the "
                                                    "whole first label")
        elif kind == "ip":
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                raise problem("rejectedIdentifier", f"{value[:100]!r} is not an IP address"
                              ) from None
        else:
            raise problem("unsupportedIdentifier", f"identifier type {str(kind)[:20]!r} is not "
                                                   "supported (dns, ip)")
        entry = {"type": kind, "value": value}
        if entry not in out:
            out.append(entry)
    return out


def _identifier_names(identifiers: list[dict[str, str]]) -> tuple[x509.GeneralName, ...]:
    names: list[x509.GeneralName] = []
    for i in identifiers:
        if i["type"] == "dns":
            names.append(x509.DNSName(i["value"]))
        else:
            names.append(x509.IPAddress(ipaddress.ip_address(i["value"])))
    return tuple(names)


def _order_json(ctx: Ctx, order: st.AcmeOrder) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": order.status, "expires": iso(order.expires),
        "identifiers": order.identifiers,
        "authorizations": [ctx.url("authz", a) for a in order.authz_ids],
        "finalize": ctx.url("order", order.id, "finalize"),
    }
    if order.not_before:
        body["notBefore"] = iso(order.not_before)
    if order.not_after:
        body["notAfter"] = iso(order.not_after)
    if order.error:
        body["error"] = order.error
    if order.cert_serial:
        body["certificate"] = ctx.url("cert", order.id)
    if order.replaces:
        body["replaces"] = order.replaces
    return body


async def new_order(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx)
    assert auth.account is not None
    payload = auth.message.payload_json()
    identifiers = _parse_identifiers(ctx, payload.get("identifiers"))
    prov = ctx.provisioner
    # Refuse names outside policy now, with rejectedIdentifier, rather than at finalize.
    names = _identifier_names(identifiers)
    nb = payload.get("notBefore")
    na = payload.get("notAfter")
    if (nb is not None and not isinstance(nb, str)) or (na is not None and not isinstance(na, str)):
        raise problem("malformed", "notBefore and notAfter must be RFC 3339 strings")
    try:
        grant = ctx.state.authority.authorize_order(prov, names, nb, na)
    except PolicyViolation as e:
        raise problem("rejectedIdentifier", e.message) from None
    not_before = int(grant.not_before.timestamp()) if grant.not_before else None
    not_after = int(grant.not_after.timestamp()) if grant.not_after else None
    replaces = payload.get("replaces")
    if replaces is not None:
        await _check_replaces(ctx, replaces, auth.account)
    now = int(time.time())
    expires = now + int(ctx.state.order_lifetime.total_seconds())
    order_id = st.new_id()
    authzs: list[st.AcmeAuthz] = []
    for ident in identifiers:
        wildcard = ident["type"] == "dns" and ident["value"].startswith("*.")
        value = ident["value"][2:] if wildcard else ident["value"]
        if wildcard:
            kinds: tuple[str, ...] = ("dns-01",)
        elif ident["type"] == "ip":
            kinds = ("http-01", "tls-alpn-01")
        else:
            kinds = ("http-01", "dns-01", "tls-alpn-01")
        kinds = tuple(k for k in kinds if k in prov.challenges)
        if not kinds:
            raise problem("rejectedIdentifier", f"no challenge type this provisioner offers "
                                                f"can validate {ident['value']!r}")
        authz_id = st.new_id()
        authzs.append(st.AcmeAuthz(
            authz_id, order_id, auth.account.id, ident["type"], value, wildcard, "pending",
            expires, [st.AcmeChallenge(st.new_id(), authz_id, k, b64url(_random(32)), "pending",
                                       None, None) for k in kinds]))
    order = st.AcmeOrder(order_id, prov.name, auth.account.id, "pending", expires, identifiers,
                         not_before, not_after, [a.id for a in authzs], None, None, replaces)
    await ctx.write(st.op_create_order(order, authzs))
    return _json(ctx, _order_json(ctx, order), 201, ctx.url("order", order.id))


def _random(n: int) -> bytes:
    import secrets

    return secrets.token_bytes(n)


async def _owned_order(ctx: Ctx, found: st.AcmeOrder | None, account: st.AcmeAccount
                       ) -> st.AcmeOrder:
    """The order `found` (read with the account), if it is this account's."""
    order = found
    if order is None or order.provisioner != ctx.provisioner.name:
        raise problem("malformed", "no such order", 404)
    if order.account_id != account.id:
        raise problem("unauthorized", "the order belongs to another account")
    if order.status in ("pending", "ready") and order.expires < time.time():
        await ctx.store.run_op(st.op_purge(int(time.time())))
        order = await ctx.read(st.op_get_order(order.id))
        assert order is not None
    return order


async def get_order(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, read=st.op_account_and_order)
    assert auth.account is not None
    order = await _owned_order(ctx, auth.found, auth.account)
    response = _json(ctx, _order_json(ctx, order), 200, ctx.url("order", order.id))
    if order.status == "processing":
        response.headers["Retry-After"] = "1"
    return response


async def list_orders(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx)
    assert auth.account is not None
    if request.match_info["id"] != auth.account.id:
        raise problem("unauthorized", "an account can only list its own orders")
    ids = await ctx.read(st.op_list_orders(auth.account.id))
    return _json(ctx, {"orders": [ctx.url("order", i) for i in ids]})


def _challenge_json(ctx: Ctx, chal: st.AcmeChallenge) -> dict[str, Any]:
    body: dict[str, Any] = {"type": chal.type, "url": ctx.url("challenge", chal.id),
                            "status": chal.status, "token": chal.token}
    if chal.validated:
        body["validated"] = iso(chal.validated)
    if chal.error:
        body["error"] = chal.error
    return body


def _owned_authz(authz: st.AcmeAuthz | None, account: st.AcmeAccount) -> st.AcmeAuthz:
    """The authorization (read with the account), if it is this account's."""
    if authz is None:
        raise problem("malformed", "no such authorization", 404)
    if authz.account_id != account.id:
        raise problem("unauthorized", "the authorization belongs to another account")
    return authz


def _authz_json(ctx: Ctx, authz: st.AcmeAuthz) -> dict[str, Any]:
    status = authz.status
    if status == "pending" and authz.expires < time.time():
        status = "expired"
    body: dict[str, Any] = {
        "identifier": {"type": authz.identifier_type, "value": authz.identifier_value},
        "status": status, "expires": iso(authz.expires),
        "challenges": [_challenge_json(ctx, c) for c in authz.challenges]}
    if authz.wildcard:
        body["wildcard"] = True
    return body


async def authz(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, read=st.op_account_and_authz)
    assert auth.account is not None
    a = _owned_authz(auth.found, auth.account)
    if not auth.message.post_as_get:
        payload = auth.message.payload_json()
        if payload.get("status") != "deactivated":
            raise problem("malformed", "an authorization's status can only become deactivated")
        await ctx.write(st.op_deactivate_authz(a.id))
        a = _owned_authz(await ctx.read(st.op_get_authz(a.id)), auth.account)
    response = _json(ctx, _authz_json(ctx, a))
    if a.status == "pending" and any(c.status == "processing" for c in a.challenges):
        response.headers["Retry-After"] = "1"
    return response


async def challenge(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, read=st.op_account_and_challenge)
    assert auth.account is not None
    chal, found_authz = auth.found
    if chal is None:
        raise problem("malformed", "no such challenge", 404)
    a = _owned_authz(found_authz, auth.account)
    if not auth.message.post_as_get and chal.status == "pending":
        if a.status != "pending" or a.expires < time.time():
            raise problem("malformed", f"the authorization is {a.status}; it cannot be validated")
        finished = None
        if await ctx.write(st.op_start_challenge(chal.id)):
            task = _spawn_validation(ctx.state, a, chal, auth.account.jwk)
            # Most validations take milliseconds: answering with the outcome saves clients a
            # polling round (lego waits 5 s when told "processing" without Retry-After).
            with contextlib.suppress(TimeoutError):
                finished = await asyncio.wait_for(asyncio.shield(task), CHALLENGE_WAIT)
        chal = finished or await ctx.read(st.op_get_challenge(chal.id))
        assert chal is not None
    up = f'<{ctx.url("authz", a.id)}>;rel="up"'
    response = _json(ctx, _challenge_json(ctx, chal), 200, links=[up])
    if chal.status in ("pending", "processing"):
        response.headers["Retry-After"] = "1"
    return response


def _spawn_validation(state: AcmeState, a: st.AcmeAuthz, chal: st.AcmeChallenge,
                      account_jwk: dict[str, Any]) -> asyncio.Task[st.AcmeChallenge]:
    """Validate off the request path, bounded in time and in how many run at once; the task's
    result is the challenge as recorded afterwards."""
    async def run() -> st.AcmeChallenge:
        if state.semaphore is None:
            state.semaphore = asyncio.Semaphore(state.max_concurrent)
        key_auth = jws.key_authorization(chal.token, account_jwk)
        error: dict[str, Any] | None = None
        async with state.semaphore:
            try:
                await asyncio.wait_for(_validate(state, a, chal, key_auth),
                                       state.settings.timeout + 5)
            except ChallengeFailed as e:
                error = problem(e.problem_type, e.detail).to_json()
            except TimeoutError:
                error = problem("connection", "validation timed out").to_json()
            except Exception as e:  # noqa: BLE001 - recorded as the challenge's error
                log.exception("acme_validation_error")
                error = problem("serverInternal", f"validation failed: {type(e).__name__}"
                                ).to_json()
        error_with_id = None
        if error is not None:
            error_with_id = dict(error, identifier={"type": a.identifier_type,
                                                    "value": a.identifier_value})
        done: st.AcmeChallenge = await state.store.run_op(
            st.op_finish_challenge(chal.id, error is None, error_with_id))
        log.info("acme_challenge_done", type=chal.type, identifier=a.identifier_value,
                 valid=error is None, error=(error or {}).get("detail"))
        return done

    task = asyncio.get_running_loop().create_task(run())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return task


async def _validate(state: AcmeState, a: st.AcmeAuthz, chal: st.AcmeChallenge,
                    key_auth: str) -> None:
    settings = state.settings
    if chal.type == "http-01":
        await validate_http01(a.identifier_type, a.identifier_value, chal.token, key_auth,
                              settings, state.http_validation_client())
    elif chal.type == "dns-01":
        await validate_dns01(a.identifier_value, key_auth, settings)
    elif chal.type == "tls-alpn-01":
        await validate_tls_alpn01(a.identifier_type, a.identifier_value, key_auth, settings)
    else:
        raise ChallengeFailed("malformed", f"unknown challenge type {chal.type}")


async def finalize(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, read=st.op_account_and_order)
    assert auth.account is not None
    order = await _owned_order(ctx, auth.found, auth.account)
    payload = auth.message.payload_json()
    if order.status != "ready":
        raise problem("orderNotReady", f"the order is {order.status}, not ready", 403)
    der = b64url_decode(payload.get("csr"), "csr")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise problem("badCSR", "csr is not a DER certificate request") from None
    try:
        plan = ctx.provisioner.authorize_finalize(
            _identifier_names(order.identifiers), csr,
            not_before=datetime.fromtimestamp(order.not_before, UTC) if order.not_before else None,
            not_after=datetime.fromtimestamp(order.not_after, UTC) if order.not_after else None,
            account_id=auth.account.id)
    except ApplianceError as e:
        raise problem("badCSR", e.message) from None
    if not await ctx.write(st.op_start_finalize(order.id)):
        raise problem("orderNotReady", "the order is already being finalized", 403)
    try:
        issued = await ctx.state.authority.issue(plan)
    except ApplianceError as e:
        p = from_appliance_error(e)
        await ctx.store.run_op(st.op_finish_finalize(order.id, None, p.to_json()))
        raise p from None
    except BaseException:
        await ctx.store.run_op(st.op_finish_finalize(
            order.id, None, problem("serverInternal", "issuance failed").to_json()))
        raise
    finished = await ctx.store.run_op(st.op_finish_finalize(
        order.id, serial_hex(issued.certificate.serial_number), None))
    order = await _owned_order(ctx, finished, auth.account)
    request["provisioner"] = ctx.provisioner.name
    log.info("acme_issued", account=auth.account.id, order=order.id,
             serial=serial_hex(issued.certificate.serial_number))
    return _json(ctx, _order_json(ctx, order), 200, ctx.url("order", order.id))


async def certificate(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, read=st.op_account_and_order_with_certificate)
    assert auth.account is not None
    found, der = auth.found
    order = await _owned_order(ctx, found, auth.account)
    if order.cert_serial is None:
        raise problem("malformed", "the order has no certificate yet", 404)
    if der is None:
        raise problem("serverInternal", "the certificate record is missing", 500)
    body = ssl.DER_cert_to_PEM_cert(der) + _chain_pem(ctx.state.authority.issuer.chain)
    return web.Response(text=body, content_type="application/pem-certificate-chain")


@functools.lru_cache(maxsize=8)
def _chain_pem(chain: tuple[x509.Certificate, ...]) -> str:
    """The issuer's chain in PEM, encoded once per chain (a reload may bring another)."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)


async def revoke_cert(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    auth = await authenticate(ctx, jwk_allowed=True, need_account=False)
    await ctx.use_nonce()
    payload = auth.message.payload_json()
    der = b64url_decode(payload.get("certificate"), "certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise problem("malformed", "certificate is not DER") from None
    reason = payload.get("reason", 0)
    if not isinstance(reason, int) or reason not in (0, 1, 3, 4, 5, 9):
        raise problem("badRevocationReason", "reason must be one of 0, 1, 3, 4, 5, 9")
    record = await ctx.state.authority.recorded(cert)
    if auth.account is not None:
        if record.provisioner != ctx.provisioner.name or not await _account_owns(
                ctx, auth.account, serial_hex(cert.serial_number)):
            raise problem("unauthorized", "this account did not order that certificate")
    else:
        cert_key = cert.public_key()
        if not isinstance(cert_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                          | ed25519.Ed25519PublicKey) or jws.thumbprint(auth.jwk) != \
                jws.thumbprint(jws.public_jwk(cert_key)):
            raise problem("unauthorized", "the request is not signed by the certificate's key")
    try:
        await ctx.state.authority.revoke(
            RevokeRequest(cert.serial_number, None, reason, "ACME revokeCert"), cert,
            method="acme")
    except ApplianceError as e:
        if "already revoked" in e.message:
            raise problem("alreadyRevoked", e.message) from None
        raise
    return web.Response(status=200)


async def _account_owns(ctx: Ctx, account: st.AcmeAccount, serial: str) -> bool:
    for order_id in await ctx.read(st.op_list_orders(account.id)):
        order = await ctx.read(st.op_get_order(order_id))
        if order is not None and order.cert_serial == serial:
            return True
    return False


# -- ACME Renewal Information (RFC 9773) ------------------------------------------------------
def _parse_cert_id(untrusted: str) -> tuple[bytes, int]:
    aki_b64, _, serial_b64 = untrusted.partition(".")
    if not aki_b64 or not serial_b64:
        raise problem("malformed", "a renewalInfo id is base64url(AKI).base64url(serial)")
    aki = b64url_decode(aki_b64, "renewalInfo key identifier")
    serial = int.from_bytes(b64url_decode(serial_b64, "renewalInfo serial"), "big")
    return aki, serial


async def _check_replaces(ctx: Ctx, replaces: Any, account: st.AcmeAccount) -> None:
    if not isinstance(replaces, str):
        raise problem("malformed", "replaces must be a renewalInfo certificate id")
    _, serial = _parse_cert_id(replaces)
    if not await _account_owns(ctx, account, serial_hex(serial)):
        raise problem("malformed", "replaces names a certificate this account did not order",
                      409)


async def renewal_info(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    aki, serial = _parse_cert_id(request.match_info["id"])
    record = await ctx.store.get_certificate(serial)
    if record is None or record.der is None:
        raise problem("malformed", "no certificate with that id", 404)
    cert = x509.load_der_x509_certificate(record.der)
    try:
        ext_aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        if ext_aki.key_identifier != aki:
            raise problem("malformed", "no certificate with that id", 404)
    except x509.ExtensionNotFound:
        pass
    start = cert.not_valid_before_utc
    life = cert.not_valid_after_utc - start
    window = (start + life * 2 / 3, start + life * 5 / 6)
    if await ctx.store.get_revocation(serial) is not None:
        now = datetime.now(UTC)
        window = (now - timedelta(hours=1), now)
    body = {"suggestedWindow": {"start": window[0].isoformat().replace("+00:00", "Z"),
                                "end": window[1].isoformat().replace("+00:00", "Z")}}
    response = web.json_response(body)
    response.headers["Retry-After"] = "21600"
    return response


def _add_routes(app: web.Application) -> None:
    for prefix in ("/{provisioner}",):
        r = app.router
        r.add_get(f"{prefix}/directory", directory)
        r.add_route("HEAD", f"{prefix}/new-nonce", new_nonce)
        r.add_get(f"{prefix}/new-nonce", new_nonce, allow_head=False)
        r.add_post(f"{prefix}/new-account", new_account)
        r.add_post(f"{prefix}/account/{{id}}", account)
        r.add_post(f"{prefix}/account/{{id}}/orders", list_orders)
        r.add_post(f"{prefix}/key-change", key_change)
        r.add_post(f"{prefix}/new-order", new_order)
        r.add_post(f"{prefix}/order/{{id}}", get_order)
        r.add_post(f"{prefix}/order/{{id}}/finalize", finalize)
        r.add_post(f"{prefix}/authz/{{id}}", authz)
        r.add_post(f"{prefix}/challenge/{{id}}", challenge)
        r.add_post(f"{prefix}/cert/{{id}}", certificate)
        r.add_post(f"{prefix}/revoke-cert", revoke_cert)
        r.add_get(f"{prefix}/renewal-info/{{id}}", renewal_info)


def mount_acme(parent: web.Application, state: AcmeState, max_body: int) -> None:
    """RFC 8555 under /acme/{provisioner}/ and /2.0/acme/{provisioner}/ of `parent`."""
    for prefix in ("/acme", "/2.0/acme"):
        app = web.Application(client_max_size=max_body, middlewares=[acme_middleware])
        app[ACME] = state
        _add_routes(app)
        parent.add_subapp(prefix, app)
    parent[STATE].acme_headers = functools.partial(add_acme_headers, state)

    async def close_state(_app: web.Application) -> None:
        await state.close()

    parent.on_cleanup.append(close_state)


def validation_settings(config: Any, resolver: str | None) -> ValidationSettings:
    return ValidationSettings(http_port=config.acme.http_port, tls_port=config.acme.tls_port,
                              resolver=resolver,
                              timeout=parse_duration(config.acme.validation_timeout)
                              .total_seconds())
