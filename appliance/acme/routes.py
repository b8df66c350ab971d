"""RFC 8555 routes: thin aiohttp handlers that parse, call `AcmeService`, and render.

Routes live under /acme/{provisioner}/ and /2.0/acme/{provisioner}/. Every response carries a
fresh Replay-Nonce and Link rel="index"; every error is an RFC 8555 problem document
(appliance.acme.middleware).
"""

from __future__ import annotations

import functools
import ssl

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.acme import auth, jws, messages
from appliance.acme.links import known_provisioner, provisioner_base
from appliance.acme.messages import (
    AccountUpdate,
    AuthorizationUpdate,
    CertId,
    Finalize,
    KeyChange,
    NewAccount,
    NewOrder,
    RevokeCert,
    Urls,
)
from appliance.acme.problems import PROBLEM_CONTENT_TYPE, AcmeProblem
from appliance.acme.service import AcmeService, KeyInUse, PendingNonce
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.errors import TokenReused
from appliance.storage.acme_protocol import (
    AcmeAuthz,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    OrderStatus,
)
from appliance.web_edge import REQUEST_PROVISIONER

SERVICE = web.AppKey("acme_service", AcmeService)


class Ctx:
    """One request's view: the service, which provisioner, its URLs."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.service = request.app[SERVICE]
        provisioner = known_provisioner(request, self.service)
        if provisioner is None:
            untrusted_name = request.match_info["provisioner"]
            raise AcmeProblem.malformed(f"no ACME provisioner named {untrusted_name[:64]!r}",
                                        status=404)
        self.provisioner: AcmeProvisioner = provisioner
        self.urls = Urls(provisioner_base(request, provisioner))

    def nonce(self) -> PendingNonce | None:
        return auth.pending_nonce(self.request)

    async def use_nonce(self) -> None:
        """Use up the request's nonce now (before a change the service makes without it)."""
        await use_pending_nonce(self.request, self.service)


async def use_pending_nonce(request: web.Request, service: AcmeService) -> None:
    """Use up the request's nonce if nothing did yet; badNonce for a replay."""
    pending = auth.pending_nonce(request)
    nonce = None if pending is None else pending.take()
    if nonce is None:
        return
    try:
        await service.store.use_nonce(nonce)
    except TokenReused:
        raise auth.replayed() from None


def _json(body: object, status: int = 200, location: str | None = None,
          links: tuple[str, ...] = (), retry_after: bool = False) -> web.Response:
    response = web.json_response(body, status=status)
    if location:
        response.headers["Location"] = location
    for link in links:
        response.headers.add("Link", link)
    if retry_after:
        response.headers["Retry-After"] = "1"
    return response


def _order_response(ctx: Ctx, order: AcmeOrder, status: int = 200) -> web.Response:
    return _json(messages.order_json(ctx.urls, order), status, ctx.urls.url("order", order.id),
                 retry_after=order.status is OrderStatus.PROCESSING)


# -- handlers -----------------------------------------------------------------------------------
async def directory(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    meta: dict[str, object] = {"externalAccountRequired": ctx.provisioner.require_eab}
    if ctx.provisioner.terms_of_service:
        meta["termsOfService"] = ctx.provisioner.terms_of_service
    url = ctx.urls.url
    return web.json_response({
        "newNonce": url("new-nonce"), "newAccount": url("new-account"),
        "newOrder": url("new-order"), "revokeCert": url("revoke-cert"),
        "keyChange": url("key-change"), "renewalInfo": url("renewal-info"), "meta": meta})


async def new_nonce(request: web.Request) -> web.Response:
    Ctx(request)
    return web.Response(status=200 if request.method == "HEAD" else 204)


async def new_account(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    message = await auth.by_key(request, ctx.service, ctx.urls)
    await ctx.use_nonce()
    assert message.jwk is not None
    account, created = await ctx.service.new_account(
        ctx.provisioner, message.jwk, NewAccount.from_json(message.payload_json()),
        ctx.urls.url("new-account"))
    return _json(messages.account_json(ctx.urls, account), 201 if created else 200,
                 ctx.urls.account(account.id))


async def account(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account_only(request, ctx.service, ctx.urls, ctx.provisioner)
    await ctx.use_nonce()
    acct = signed.account
    if request.match_info["id"] != acct.id:
        raise AcmeProblem.unauthorized("an account can only read or change itself")
    if not signed.message.post_as_get:
        update = AccountUpdate.from_json(signed.message.payload_json())
        acct = await ctx.service.update_account(acct, update)
    return _json(messages.account_json(ctx.urls, acct), 200, ctx.urls.account(acct.id))


async def key_change(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account_only(request, ctx.service, ctx.urls, ctx.provisioner)
    await ctx.use_nonce()
    account_url = ctx.urls.account(signed.account.id)
    inner = KeyChange.from_json(signed.message.payload_json()).untrusted_inner_jws
    new_jwk = jws.verify_key_change(inner, signed.message, account_url, signed.account.jwk)
    changed = await ctx.service.change_key(signed.account, new_jwk)
    if isinstance(changed, KeyInUse):
        response = web.json_response(AcmeProblem.malformed("another account uses that key",
                                                           status=409).to_json(),
                                     status=409, content_type=PROBLEM_CONTENT_TYPE)
        response.headers["Location"] = ctx.urls.account(changed.account_id)
        return response
    return _json(messages.account_json(ctx.urls, changed), 200, account_url)


async def new_order(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account_only(request, ctx.service, ctx.urls, ctx.provisioner)
    order = await ctx.service.new_order(ctx.provisioner, signed.account,
                                        NewOrder.from_json(signed.message.payload_json()),
                                        ctx.nonce())
    return _order_response(ctx, order, 201)


async def get_order(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account(request, ctx.service, ctx.urls, ctx.provisioner,
                                   ctx.service.store.account_and_order)
    order = await ctx.service.owned_order(ctx.provisioner, signed.found, signed.account)
    return _order_response(ctx, order)


async def list_orders(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account_only(request, ctx.service, ctx.urls, ctx.provisioner)
    if request.match_info["id"] != signed.account.id:
        raise AcmeProblem.unauthorized("an account can only list its own orders")
    ids = await ctx.service.store.list_orders(signed.account.id)
    return _json({"orders": [ctx.urls.url("order", i) for i in ids]})


def _owned_authz(found: AcmeAuthz | None, account_id: str) -> AcmeAuthz:
    if found is None:
        raise AcmeProblem.malformed("no such authorization", status=404)
    if found.account_id != account_id:
        raise AcmeProblem.unauthorized("the authorization belongs to another account")
    return found


async def authz(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account(request, ctx.service, ctx.urls, ctx.provisioner,
                                   ctx.service.store.account_and_authz)
    found = _owned_authz(signed.found, signed.account.id)
    if not signed.message.post_as_get:
        AuthorizationUpdate.from_json(signed.message.payload_json())
        found = await ctx.service.deactivate_authz(found, ctx.nonce())
    polling = found.status is AuthorizationStatus.PENDING and any(
        c.status is ChallengeStatus.PROCESSING for c in found.challenges)
    return _json(messages.authz_json(ctx.urls, found, ctx.service.clock()),
                 retry_after=polling)


async def challenge(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account(request, ctx.service, ctx.urls, ctx.provisioner,
                                   ctx.service.store.account_and_challenge)
    chal, found_authz = signed.found
    if chal is None:
        raise AcmeProblem.malformed("no such challenge", status=404)
    owned = _owned_authz(found_authz, signed.account.id)
    if not signed.message.post_as_get:
        chal = await ctx.service.respond_to_challenge(owned, chal, signed.account, ctx.nonce())
    up = f'<{ctx.urls.url("authz", owned.id)}>;rel="up"'
    return _json(messages.challenge_json(ctx.urls, chal), 200, links=(up,),
                 retry_after=chal.status in (ChallengeStatus.PENDING,
                                             ChallengeStatus.PROCESSING))


async def finalize(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account(request, ctx.service, ctx.urls, ctx.provisioner,
                                   ctx.service.store.account_and_order)
    order = await ctx.service.owned_order(ctx.provisioner, signed.found, signed.account)
    payload = signed.message.payload_json()
    if order.status is not OrderStatus.READY:  # before the CSR: the state is the news
        raise AcmeProblem.order_not_ready(f"the order is {order.status}, not ready")
    order = await ctx.service.finalize(ctx.provisioner, signed.account, order,
                                       Finalize.from_json(payload), ctx.nonce())
    request[REQUEST_PROVISIONER] = ctx.provisioner.name
    return _order_response(ctx, order)


async def certificate(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account(request, ctx.service, ctx.urls, ctx.provisioner,
                                   ctx.service.store.account_and_order_certificate)
    found, der = signed.found
    order = await ctx.service.owned_order(ctx.provisioner, found, signed.account)
    if order.cert_serial is None:
        raise AcmeProblem.malformed("the order has no certificate yet", status=404)
    if der is None:
        raise AcmeProblem.server_internal("the certificate record is missing")
    body = ssl.DER_cert_to_PEM_cert(der) + _chain_pem(ctx.service.issuing.chain)
    return web.Response(text=body, content_type="application/pem-certificate-chain")


@functools.lru_cache(maxsize=8)
def _chain_pem(chain: tuple[x509.Certificate, ...]) -> str:
    """The issuer's chain in PEM, encoded once per chain (a reload may bring another)."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)


async def revoke_cert(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    signed = await auth.by_account_or_key(request, ctx.service, ctx.urls, ctx.provisioner)
    await ctx.use_nonce()
    revocation = RevokeCert.from_json(signed.message.payload_json())
    await ctx.service.revoke(ctx.provisioner, signed.account, signed.jwk,
                             revocation.certificate, revocation.reason)
    return web.Response(status=200)


async def renewal_info(request: web.Request) -> web.Response:
    ctx = Ctx(request)
    window = await ctx.service.renewal_window(CertId.parse(request.match_info["id"]))
    body = {"suggestedWindow": {"start": window.start.isoformat().replace("+00:00", "Z"),
                                "end": window.end.isoformat().replace("+00:00", "Z")}}
    response = web.json_response(body)
    response.headers["Retry-After"] = "21600"
    return response
