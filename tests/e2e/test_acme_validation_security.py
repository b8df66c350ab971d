"""http-01 validation cannot be turned against the CA's network, against a real `applianctl
serve` over HTTPS with real responders on 127.0.0.1.

The CA of most tests allows 127.0.0.0/8 through `acme.validationAllowRanges` (as every ACME
e2e CA does, its responders being on loopback); `strict_ca` keeps the default deny list. The
challenge error is read the way a requester reads it, by POST-as-GET on the authorization,
and must name what failed without quoting what the CA fetched, a redirect target or the exact
status.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from acme_support import AcmeCa, running_acme_ca
from aiohttp import web
from test_acme_protocol import URN, AcmeClient

from appliance.acme import jws

pytestmark = pytest.mark.e2e

SECRET = "INTERNAL-7f3a db_password=hunter2"
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def acme_ca() -> Iterator[AcmeCa]:
    with running_acme_ca("e2e-acme-validation") as ca:
        yield ca


@pytest.fixture(scope="module")
def strict_ca() -> Iterator[AcmeCa]:
    """A CA with ca.json's default validation policy: loopback and private ranges denied."""
    with running_acme_ca("e2e-acme-validation-strict", allow_ranges=()) as ca:
        yield ca


@dataclass
class Responder:
    """A real HTTP server on 127.0.0.1; `answers` maps a path to a handler; `seen` logs paths."""

    port: int = 0
    answers: dict[str, Answer] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)

    def text(self, path: str, body: str, status: int = 200) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(text=body, status=status)
        self.answers[path] = answer

    def redirect(self, path: str, location: str) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(status=302, headers={"Location": location})
        self.answers[path] = answer


@contextlib.asynccontextmanager
async def responder(port: int = 0) -> AsyncIterator[Responder]:
    site = Responder()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        site.seen.append(request.path)
        answer = site.answers.get(request.path)
        return await answer(request) if answer else web.Response(status=404, text=SECRET)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    site.port = int(runner.addresses[0][1])
    try:
        yield site
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def client_of(ca: AcmeCa) -> AsyncIterator[AcmeClient]:
    """test_acme_protocol's client, with the directory of CA loaded."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = AcmeClient(ca, session)
        await client.load_directory()
        yield client


@pytest.fixture
async def acme(acme_ca: AcmeCa) -> AsyncIterator[AcmeClient]:
    async with client_of(acme_ca) as client:
        yield client


@pytest.fixture
async def site(acme_ca: AcmeCa) -> AsyncIterator[Responder]:
    """The responder on the CA's http-01 port."""
    async with responder(acme_ca.http_port) as served:
        yield served


@dataclass(frozen=True)
class Outcome:
    status: str
    error: dict[str, Any]
    authorization_text: str  # the whole authorization as the requester reads it
    token: str


async def validate(acme: AcmeClient, setup: Callable[[str, str], None]) -> Outcome:
    """One order for a fresh name; SETUP(challenge path, key authorization) arranges the
    responders; then the http-01 challenge is answered and its outcome read back."""
    account = await acme.new_account()
    name = acme.ca.add_name(f"v-{secrets.token_hex(4)}.example.test")
    _order_url, order = await acme.new_order(account, [name])
    (authz_url,) = order["authorizations"]
    authz = await acme.get(account, authz_url)
    (chal,) = [c for c in authz["challenges"] if c["type"] == "http-01"]
    key_authorization = f"{chal['token']}.{jws.thumbprint(jws.public_jwk(account.key))}"
    setup(f"/.well-known/acme-challenge/{chal['token']}", key_authorization)
    reply = await acme.as_account(account, chal["url"], {})
    assert reply.status == 200, reply
    authz = await acme.poll(account, authz_url, {"valid", "invalid"})
    (chal,) = [c for c in authz["challenges"] if c["type"] == "http-01"]
    return Outcome(authz["status"], chal.get("error") or {}, json.dumps(authz), chal["token"])


def assert_refused(outcome: Outcome, problem: str, says: str, *hidden: str) -> None:
    assert outcome.status == "invalid", outcome
    assert outcome.error.get("type") == URN + problem, outcome.error
    assert says in outcome.error.get("detail", ""), outcome.error
    for text in ("hunter2", "INTERNAL"):
        assert text not in outcome.authorization_text, (
            f"{text!r} reached the requester: {outcome.error}")
    # The authorization's own URLs carry the CA's port: these are looked for in the error.
    for text in hidden:
        assert text not in json.dumps(outcome.error), f"{text!r} is in {outcome.error}"


async def test_a_redirect_to_an_internal_port_is_refused_unfetched_and_unnamed(
        acme: AcmeClient, site: Responder) -> None:
    async with responder() as internal:
        internal.text("/secret", SECRET)
        outcome = await validate(acme, lambda path, _ka: site.redirect(
            path, f"http://127.0.0.1:{internal.port}/secret"))
        assert_refused(outcome, "incorrectResponse", "redirected to a port the CA does not follow",
                       str(internal.port), "/secret")
        assert internal.seen == [], "the CA fetched the internal service"


async def test_a_wrong_answer_is_not_quoted(acme: AcmeClient, site: Responder) -> None:
    """Loopback is allowed here and /secret is on the validation port: the CA fetches it,
    and says only that it was not the key authorization."""
    def setup(path: str, _ka: str) -> None:
        site.redirect(path, "/secret")
        site.text("/secret", SECRET)
    outcome = await validate(acme, setup)
    assert_refused(outcome, "incorrectResponse", "wrong key authorization")
    assert "/secret" in site.seen


async def test_a_redirect_to_the_cas_own_api_is_refused(acme: AcmeClient, site: Responder,
                                                        acme_ca: AcmeCa) -> None:
    outcome = await validate(acme, lambda path, _ka: site.redirect(
        path, f"https://127.0.0.1:{acme_ca.port}/1.0/provisioners"))
    assert_refused(outcome, "incorrectResponse", "redirected to a port the CA does not follow",
                   str(acme_ca.port), "provisioners", "crts", "BEGIN CERTIFICATE")


async def test_ten_redirects_are_followed_and_eleven_refused(acme: AcmeClient,
                                                             site: Responder) -> None:
    def chain(hops: int) -> Callable[[str, str], None]:
        def setup(path: str, key_authorization: str) -> None:
            site.redirect(path, f"/hop-marker/{hops - 1}")
            for n in range(hops - 1, 0, -1):
                site.redirect(f"/hop-marker/{n}", f"/hop-marker/{n - 1}")
            site.text("/hop-marker/0", key_authorization)
        return setup

    assert (await validate(acme, chain(10))).status == "valid"
    outcome = await validate(acme, chain(11))
    assert_refused(outcome, "incorrectResponse", "more than 10 redirects", "hop-marker")


async def test_a_4xx_answer_is_reported_by_its_class(acme: AcmeClient, site: Responder) -> None:
    outcome = await validate(acme, lambda path, _ka: site.text(path, SECRET, status=404))
    assert_refused(outcome, "incorrectResponse", "answered with a 4xx status")
    # The detail names the challenge URL (its token and port are digits by chance), not 404.
    detail = outcome.error["detail"].replace(outcome.token, "").replace(str(site.port), "")
    assert "404" not in detail, outcome.error


async def test_the_default_policy_refuses_loopback_without_connecting(
        strict_ca: AcmeCa) -> None:
    """No allow list: the name resolves to 127.0.0.1, where the right answer waits unread."""
    async with client_of(strict_ca) as acme, responder(strict_ca.http_port) as waiting:
        outcome = await validate(acme, lambda path, ka: waiting.text(path, ka))
        assert_refused(outcome, "connection", "not contacted", "127.0.0.1")
        assert waiting.seen == [], "the CA connected to a denied address"
