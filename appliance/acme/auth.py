"""Authentication of an ACME POST (RFC 8555 §6.2-§6.5): JWS shape, nonce, url, key, account.

The nonce is checked here and used up later: in the same commit as the request's first change
of state (the service takes it as `NonceUse`), or by the middleware before the answer leaves,
whatever the answer. So a replay gets badNonce instead of what the handler answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from appliance.acme import jws
from appliance.acme.messages import Urls
from appliance.acme.problems import AcmeProblem
from appliance.acme.service import AcmeService, PendingNonce
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.storage.acme_protocol import AccountStatus, AcmeAccount, JsonObject

F = TypeVar("F")

# The checked nonce of a request, until it is used up.
PENDING_NONCE = web.RequestKey("acme_pending_nonce", PendingNonce)

# How a kid request reads its account together with the object its URL names, as one read:
# (provisioner, account id, the URL's id) -> (the account, the object).
ReadWithAccount = Callable[[str, str, str], Awaitable[tuple[AcmeAccount | None, F]]]


def replayed() -> AcmeProblem:
    return AcmeProblem.bad_nonce("the nonce is unknown, expired or already used")


def pending_nonce(request: web.Request) -> PendingNonce | None:
    """The request's checked nonce, for the service to use up with the change it authorizes."""
    pending: PendingNonce | None = request.get(PENDING_NONCE)
    return pending


@dataclass(frozen=True)
class Authenticated(Generic[F]):
    message: jws.JwsMessage
    account: AcmeAccount | None
    jwk: JsonObject
    found: F  # what the read passed to `authenticate` returned with the account


@dataclass(frozen=True)
class AccountRequest(Generic[F]):
    """A request signed by an account (kid), with what its URL names."""

    message: jws.JwsMessage
    account: AcmeAccount
    found: F


async def _verified_message(request: web.Request, service: AcmeService, urls: Urls
                            ) -> jws.JwsMessage:
    if request.content_type != jws.JOSE_CONTENT_TYPE:
        raise AcmeProblem.malformed("ACME requests must be application/jose+json", status=415)
    message = jws.parse(await request.read())
    nonce = await service.check_nonce(message.nonce)
    if nonce is None:
        raise replayed()
    request[PENDING_NONCE] = nonce
    expected = f"https://{request.host}{request.path}"
    if message.url != expected:
        raise AcmeProblem.unauthorized(f"the JWS url {message.url[:200]!r} is not the request "
                                       f"URL {expected!r}")
    return message


def _account_id(urls: Urls, kid: str) -> str:
    prefix = urls.account("")
    if not kid.startswith(prefix):
        raise AcmeProblem.account_does_not_exist("the kid is not an account URL of this "
                                                 "provisioner")
    return kid[len(prefix):]


def _valid_account(message: jws.JwsMessage, account: AcmeAccount | None) -> AcmeAccount:
    if account is None:
        raise AcmeProblem.account_does_not_exist("no account with this kid exists")
    jws.verify(message, account.jwk)
    if account.status is not AccountStatus.VALID:
        raise AcmeProblem.unauthorized(f"the account is {account.status}", status=401)
    return account


async def by_account(request: web.Request, service: AcmeService, urls: Urls,
                     provisioner: AcmeProvisioner, read: ReadWithAccount[F]
                     ) -> AccountRequest[F]:
    """A request that must be signed by an account (kid); `read` reads the account and what
    the URL's id names in one statement."""
    message = await _verified_message(request, service, urls)
    if message.jwk is not None:
        raise AcmeProblem.malformed("this request must be signed with the account key (kid), "
                                    "not a jwk")
    assert message.kid is not None
    account, found = await read(provisioner.name, _account_id(urls, message.kid),
                                request.match_info.get("id", ""))
    return AccountRequest(message, _valid_account(message, account), found)


async def by_account_only(request: web.Request, service: AcmeService, urls: Urls,
                          provisioner: AcmeProvisioner) -> AccountRequest[None]:
    """A request that must be signed by an account (kid), naming nothing else."""
    async def read(name: str, account_id: str, _: str) -> tuple[AcmeAccount | None, None]:
        return await service.store.find_account(name, account_id), None
    return await by_account(request, service, urls, provisioner, read)


async def by_key(request: web.Request, service: AcmeService, urls: Urls) -> jws.JwsMessage:
    """A request that must carry its key (jwk): newAccount."""
    message = await _verified_message(request, service, urls)
    if message.jwk is None:
        raise AcmeProblem.malformed("this request must carry a jwk, not a kid")
    jws.verify(message, message.jwk)
    return message


async def by_account_or_key(request: web.Request, service: AcmeService, urls: Urls,
                            provisioner: AcmeProvisioner) -> Authenticated[None]:
    """revokeCert: signed by an account (kid) or by the certificate's key (jwk)."""
    message = await _verified_message(request, service, urls)
    if message.jwk is not None:
        jws.verify(message, message.jwk)
        return Authenticated(message, None, message.jwk, None)
    assert message.kid is not None
    account = _valid_account(message, await service.store.find_account(
        provisioner.name, _account_id(urls, message.kid)))
    return Authenticated(message, account, account.jwk, None)
