"""RFC 8555 on the wire, against a real `applianctl serve`: a small JWS-speaking client (the
product's own jws.sign / public_jwk and aiohttp trusting only the root) drives accounts, orders,
challenges, finalize, revocation, key change, renewal info and the problem documents.

Besides the default `acme` provisioner the CA has `eab` (--require-eab).

The CA resolves names through a LocalDnsServer (`serve --resolver`); each test maps its own
names under example.test to 127.0.0.1 and, for http-01, serves the key authorizations itself
from a small aiohttp server on the CA's configured http-01 port. Every response the client gets
is checked for a Replay-Nonce, `Cache-Control: no-store` and a Link rel="index".
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from acme_support import AcmeCa, running_acme_ca
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from e2e_support import reconfigured, sighup_and_wait
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from appliance.acme import jws

pytestmark = pytest.mark.e2e

JOSE = "application/jose+json"
PROBLEM = "application/problem+json"
URN = "urn:ietf:params:acme:error:"
POLL_TIMEOUT = 20.0


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acme_ca() -> Iterator[AcmeCa]:
    with running_acme_ca("e2e-acme-protocol") as ca:
        ca.run_cli("provisioner", "add", "eab", "--type", "ACME", "--require-eab",
                   home=ca.ca_home)
        sighup_and_wait(ca)
        yield ca


@pytest.fixture
async def http01(acme_ca: AcmeCa) -> AsyncIterator[dict[str, str]]:
    """token -> key authorization, served on the CA's http-01 port of 127.0.0.1."""
    answers: dict[str, str] = {}

    async def serve(request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if token not in answers:
            raise web.HTTPNotFound()
        return web.Response(text=answers[token])

    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", acme_ca.http_port).start()
    try:
        yield answers
    finally:
        await runner.cleanup()


@pytest.fixture
async def acme(acme_ca: AcmeCa) -> AsyncIterator[AcmeClient]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = AcmeClient(acme_ca, session)
        await client.load_directory()
        yield client


# -- the client -----------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    links: list[str]
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def location(self) -> str:
        return self.headers["Location"]

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.content_type}: {self.body[:2000]!r}"


@dataclass
class Account:
    key: ec.EllipticCurvePrivateKey
    kid: str  # the account URL


@dataclass
class Issued:
    order_url: str
    order: dict[str, Any]
    key: ec.EllipticCurvePrivateKey
    pem: bytes
    leaf: x509.Certificate
    names: list[str] = field(default_factory=list)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class AcmeClient:
    """Just enough RFC 8555 to drive the server, with raw access for the malformed cases."""

    def __init__(self, ca: AcmeCa, session: aiohttp.ClientSession,
                 provisioner: str = "acme") -> None:
        self.ca = ca
        self.session = session
        self.ssl = ca.ssl_context()
        self.directory_url = ca.directory_of(provisioner)
        self.index_link = f'<{self.directory_url}>;rel="index"'
        self.dir: dict[str, Any] = {}
        self.nonce_pool: list[str] = []

    async def request(self, method: str, url: str, *, body: bytes | None = None,
                      content_type: str = JOSE) -> Reply:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, url, data=body, headers=headers,
                                        ssl=self.ssl) as resp:
            reply = Reply(resp.status, dict(resp.headers), resp.headers.getall("Link", []),
                          resp.content_type, await resp.read())
        # Every ACME response, problems included, carries these (RFC 8555 §6.5, §7.1).
        assert reply.headers.get("Replay-Nonce"), f"no Replay-Nonce on {method} {url}: {reply}"
        assert self.index_link in reply.links, (
            f"no Link rel=index on {method} {url}: {reply.links}")
        assert reply.headers.get("Cache-Control") == "no-store", reply.headers
        self.nonce_pool.append(reply.headers["Replay-Nonce"])
        return reply

    async def load_directory(self) -> None:
        reply = await self.request("GET", self.directory_url)
        assert reply.status == 200, reply
        self.dir = reply.json()

    async def fresh_nonce(self) -> str:
        reply = await self.request("HEAD", self.dir["newNonce"])
        assert reply.status == 200, reply
        self.nonce_pool.pop()
        return reply.headers["Replay-Nonce"]

    async def nonce(self) -> str:
        return self.nonce_pool.pop() if self.nonce_pool else await self.fresh_nonce()

    def sign(self, key: ec.EllipticCurvePrivateKey, payload: dict[str, Any] | None, url: str,
             nonce: str, kid: str | None) -> dict[str, Any]:
        return jws.sign(key, payload, url=url, nonce=nonce, kid=kid)

    async def post(self, url: str, payload: dict[str, Any] | None, key: ec.EllipticCurvePrivateKey,
                   *, kid: str | None = None, nonce: str | None = None,
                   jws_url: str | None = None) -> Reply:
        """POST a JWS (payload None: POST-as-GET) signed with kid, or with the embedded jwk."""
        message = self.sign(key, payload, jws_url or url, nonce or await self.nonce(), kid)
        return await self.post_body(url, json.dumps(message).encode())

    async def post_body(self, url: str, body: bytes) -> Reply:
        return await self.request("POST", url, body=body)

    async def as_account(self, account: Account, url: str,
                         payload: dict[str, Any] | None = None, **kw: Any) -> Reply:
        return await self.post(url, payload, account.key, kid=account.kid, **kw)

    # -- flows ------------------------------------------------------------------------------
    async def new_account(self, key: ec.EllipticCurvePrivateKey | None = None,
                          **extra: Any) -> Account:
        key = key or new_key()
        reply = await self.post(self.dir["newAccount"],
                                {"termsOfServiceAgreed": True,
                                 "contact": ["mailto:e2e@example.test"], **extra}, key)
        assert reply.status == 201, reply
        assert reply.json()["status"] == "valid"
        return Account(key, reply.location)

    async def new_order(self, account: Account, names: list[str]) -> tuple[str, dict[str, Any]]:
        reply = await self.as_account(account, self.dir["newOrder"], {
            "identifiers": [{"type": "dns", "value": n} for n in names]})
        assert reply.status == 201, reply
        assert reply.json()["status"] == "pending"
        return reply.location, reply.json()

    async def get(self, account: Account, url: str) -> dict[str, Any]:
        reply = await self.as_account(account, url)
        assert reply.status == 200, reply
        result: dict[str, Any] = reply.json()
        return result

    async def poll(self, account: Account, url: str, done: set[str]) -> dict[str, Any]:
        deadline = time.monotonic() + POLL_TIMEOUT
        while True:
            body = await self.get(account, url)
            if body["status"] in done:
                return body
            assert time.monotonic() < deadline, f"{url} is still {body['status']}: {body}"
            await asyncio.sleep(0.05)

    async def start_challenges(self, account: Account, order: dict[str, Any], kind: str,
                               answers: dict[str, str] | None = None) -> list[str]:
        """POST {} to the `kind` challenge of every authorization; return the authz URLs."""
        thumbprint = jws.thumbprint(jws.public_jwk(account.key))
        for authz_url in order["authorizations"]:
            authz = await self.get(account, authz_url)
            (chal,) = [c for c in authz["challenges"] if c["type"] == kind]
            if answers is not None:
                answers[chal["token"]] = f"{chal['token']}.{thumbprint}"
            reply = await self.as_account(account, chal["url"], {})
            assert reply.status == 200, reply
            assert f'<{authz_url}>;rel="up"' in reply.links, reply.links
        return list(order["authorizations"])

    async def ready_order(self, account: Account, names: list[str],
                          answers: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """An order whose authorizations are valid through http-01."""
        order_url, order = await self.new_order(account, names)
        for authz_url in await self.start_challenges(account, order, "http-01", answers):
            authz = await self.poll(account, authz_url, {"valid", "invalid"})
            assert authz["status"] == "valid", authz
        order = await self.poll(account, order_url, {"ready", "invalid"})
        assert order["status"] == "ready", order
        return order_url, order

    async def finalize(self, account: Account, order: dict[str, Any], names: list[str],
                       key: ec.EllipticCurvePrivateKey) -> Reply:
        return await self.as_account(account, order["finalize"],
                                     {"csr": b64url(csr_der(key, names))})

    async def issue(self, account: Account, names: list[str],
                    answers: dict[str, str]) -> Issued:
        order_url, order = await self.ready_order(account, names, answers)
        key = new_key()
        reply = await self.finalize(account, order, names, key)
        assert reply.status == 200, reply
        order = reply.json()
        if order["status"] != "valid":
            order = await self.poll(account, order_url, {"valid", "invalid"})
        assert order["status"] == "valid", order
        cert = await self.as_account(account, order["certificate"])
        assert cert.status == 200, cert
        assert cert.content_type == "application/pem-certificate-chain", cert
        leaf = x509.load_pem_x509_certificates(cert.body)[0]
        return Issued(order_url, order, key, cert.body, leaf, names)


def csr_der(key: ec.EllipticCurvePrivateKey, names: list[str]) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def sign_with_header(key: ec.EllipticCurvePrivateKey, header: dict[str, Any],
                     payload: bytes) -> dict[str, Any]:
    """A flattened JWS with exactly `header` as its protected header (for malformed requests)."""
    token = JWS(payload)
    token.add_signature(JWK.from_pyca(key), alg=None, protected=json.dumps(header))
    result: dict[str, Any] = json.loads(token.serialize(compact=False))
    return result


def assert_problem(reply: Reply, kind: str, status: int | None = None) -> dict[str, Any]:
    """An RFC 8555 §6.7 problem document of `kind`, whose "status" is the HTTP status."""
    assert reply.content_type == PROBLEM, f"not a problem document: {reply}"
    doc: dict[str, Any] = reply.json()
    assert doc.get("type") == URN + kind, f"expected {kind}: {reply}"
    assert doc.get("status") == reply.status, f"status member differs from HTTP: {reply}"
    assert isinstance(doc.get("detail"), str) and doc["detail"], reply
    if status is not None:
        assert reply.status == status, f"expected HTTP {status}: {reply}"
    else:
        assert 400 <= reply.status < 600, reply
    return doc


def names_for(ca: AcmeCa, *labels: str) -> list[str]:
    """Fresh names under example.test, each with an A record 127.0.0.1 in the CA's resolver."""
    tag = secrets.token_hex(3)
    return [ca.add_name(f"{label}-{tag}.example.test") for label in labels]


def write_chain(ca: AcmeCa, issued: Issued, stem: str) -> Path:
    path = ca.work / f"{stem}.crt"
    path.write_bytes(issued.pem)
    return path


def cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 renewalInfo id: base64url(AKI keyIdentifier) "." base64url(serial DER)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER INTEGER contents
    return f"{b64url(aki.key_identifier)}.{b64url(serial_bytes)}"


# -- directory, nonces, accounts ------------------------------------------------------------------
async def test_directory_and_new_nonce(acme: AcmeClient) -> None:
    base = acme.directory_url.rsplit("/", 1)[0]
    for member in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange",
                   "renewalInfo"):
        assert acme.dir[member].startswith(base + "/"), (member, acme.dir)
    assert acme.dir["meta"]["externalAccountRequired"] is False
    head = await acme.request("HEAD", acme.dir["newNonce"])
    get = await acme.request("GET", acme.dir["newNonce"])
    assert (head.status, get.status) == (200, 204)
    assert head.headers["Replay-Nonce"] != get.headers["Replay-Nonce"]
    # The same directory under /2.0.
    alt = acme.directory_url.replace("/acme/acme/", "/2.0/acme/acme/")
    async with acme.session.get(alt, ssl=acme.ssl) as resp:
        assert resp.status == 200
        assert (await resp.json())["newOrder"] == acme.dir["newOrder"].replace(
            "/acme/acme/", "/2.0/acme/acme/")


async def test_a_rate_limited_request_gets_a_nonce_for_its_retry(acme_ca: AcmeCa) -> None:
    """The edge's 429 comes before the ACME app runs; it still carries a usable nonce."""
    with reconfigured(acme_ca, rateLimits={"issuance": {"perSecond": 1, "burst": 1}}):
        # One connection, so one worker and one rate-limit bucket.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = AcmeClient(acme_ca, session)
            await client.load_directory()  # every reply is checked for the ACME headers
            account = await client.new_account()
            names = [{"type": "dns", "value": "limited.example.test"}]
            first = await client.as_account(account, client.dir["newOrder"],
                                            {"identifiers": names})
            assert first.status == 201, first
            limited = await client.as_account(account, client.dir["newOrder"],
                                              {"identifiers": names})
            doc = assert_problem(limited, "rateLimited", 429)
            assert "too many issuance requests" in doc["detail"], doc
            wait = int(limited.headers["Retry-After"])
            await asyncio.sleep(wait + 0.2)
            retry = await client.as_account(account, client.dir["newOrder"],
                                            {"identifiers": names},
                                            nonce=limited.headers["Replay-Nonce"])
            assert retry.status == 201, retry


async def test_account_creation_and_lookup(acme: AcmeClient) -> None:
    account = await acme.new_account()
    again = await acme.post(acme.dir["newAccount"], {"termsOfServiceAgreed": True}, account.key)
    assert again.status == 200, again
    assert again.location == account.kid
    existing = await acme.post(acme.dir["newAccount"], {"onlyReturnExisting": True},
                               account.key)
    assert existing.status == 200 and existing.location == account.kid, existing
    body = await acme.get(account, account.kid)
    assert body["status"] == "valid" and body["contact"] == ["mailto:e2e@example.test"]


async def test_only_return_existing_for_an_unknown_key(acme: AcmeClient) -> None:
    reply = await acme.post(acme.dir["newAccount"], {"onlyReturnExisting": True}, new_key())
    assert_problem(reply, "accountDoesNotExist", 400)


async def test_bad_nonce_then_the_fresh_nonce_works(acme: AcmeClient) -> None:
    key = new_key()
    made_up = b64url(secrets.token_bytes(40))
    reply = await acme.post(acme.dir["newAccount"], {"termsOfServiceAgreed": True}, key,
                            nonce=made_up)
    assert_problem(reply, "badNonce", 400)
    retry = await acme.post(acme.dir["newAccount"], {"termsOfServiceAgreed": True}, key,
                            nonce=reply.headers["Replay-Nonce"])
    assert retry.status == 201, retry


async def test_a_nonce_is_good_once(acme: AcmeClient) -> None:
    account = await acme.new_account()
    nonce = await acme.fresh_nonce()
    first = await acme.as_account(account, account.kid, nonce=nonce)
    assert first.status == 200, first
    second = await acme.as_account(account, account.kid, nonce=nonce)
    assert_problem(second, "badNonce", 400)


async def test_a_replayed_request_is_refused(acme: AcmeClient) -> None:
    account = await acme.new_account()
    names = names_for(acme.ca, "replay")
    body = json.dumps(acme.sign(account.key, {"identifiers": [
        {"type": "dns", "value": names[0]}]}, acme.dir["newOrder"], await acme.fresh_nonce(),
        account.kid)).encode()
    first = await acme.post_body(acme.dir["newOrder"], body)
    assert first.status == 201, first
    second = await acme.post_body(acme.dir["newOrder"], body)
    assert_problem(second, "badNonce", 400)
    orders = await acme.get(account, account.kid + "/orders")
    assert orders["orders"] == [first.location], "the replay made a second order"


async def test_every_step_of_an_issuance_refuses_a_replay(
        acme_ca: AcmeCa, acme: AcmeClient, http01: dict[str, str]) -> None:
    """Each request of an issuance, sent again byte for byte (also on a new connection, which
    may reach the other worker), is badNonce, and the replay changes nothing."""
    account = await acme.new_account()
    names = names_for(acme.ca, "replay-steps")

    async def twice(url: str, payload: dict[str, Any] | None) -> Reply:
        body = json.dumps(acme.sign(account.key, payload, url, await acme.fresh_nonce(),
                                    account.kid)).encode()
        first = await acme.post_body(url, body)
        again = await acme.post_body(url, body)
        assert_problem(again, "badNonce", 400)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as other:
            elsewhere = await AcmeClient(acme_ca, other).post_body(url, body)
        assert_problem(elsewhere, "badNonce", 400)
        return first

    created = await twice(acme.dir["newOrder"],
                          {"identifiers": [{"type": "dns", "value": n} for n in names]})
    assert created.status == 201, created
    order_url, order = created.location, created.json()
    (authz_url,) = order["authorizations"]
    authz = await twice(authz_url, None)
    assert authz.status == 200, authz
    (chal,) = [c for c in authz.json()["challenges"] if c["type"] == "http-01"]
    http01[chal["token"]] = f"{chal['token']}.{jws.thumbprint(jws.public_jwk(account.key))}"
    started = await twice(chal["url"], {})
    assert started.status == 200, started
    assert (await acme.poll(account, order_url, {"ready", "invalid"}))["status"] == "ready"
    final = await twice(order["finalize"], {"csr": b64url(csr_der(new_key(), names))})
    assert final.status == 200, final
    order = await acme.poll(account, order_url, {"valid", "invalid"})
    assert order["status"] == "valid", order
    cert = await twice(order["certificate"], None)
    assert cert.status == 200 and cert.body.startswith(b"-----BEGIN CERTIFICATE"), cert
    missing = await twice(acme.dir["newOrder"].replace("new-order", "order/no-such-order"),
                          None)
    assert_problem(missing, "malformed", 404)
    orders = await acme.get(account, account.kid + "/orders")
    assert orders["orders"] == [order_url], "a replay made another order"


async def test_the_jws_url_must_be_the_request_url(acme: AcmeClient) -> None:
    account = await acme.new_account()
    reply = await acme.as_account(account, acme.dir["newOrder"],
                                  {"identifiers": [{"type": "dns", "value": "x.example.test"}]},
                                  jws_url=acme.dir["newAccount"])
    doc = assert_problem(reply, "unauthorized", 403)
    assert acme.dir["newAccount"] in doc["detail"]


async def test_jwk_and_kid_together_are_malformed(acme: AcmeClient) -> None:
    account = await acme.new_account()
    header = {"alg": "ES256", "nonce": await acme.fresh_nonce(), "url": account.kid,
              "kid": account.kid, "jwk": jws.public_jwk(account.key)}
    reply = await acme.post_body(account.kid,
                                 json.dumps(sign_with_header(account.key, header, b"")).encode())
    doc = assert_problem(reply, "malformed", 400)
    assert "jwk" in doc["detail"] and "kid" in doc["detail"]


async def test_an_unknown_account_kid(acme: AcmeClient) -> None:
    base = acme.directory_url.rsplit("/", 1)[0]
    reply = await acme.post(acme.dir["newOrder"],
                            {"identifiers": [{"type": "dns", "value": "x.example.test"}]},
                            new_key(), kid=f"{base}/account/{secrets.token_urlsafe(16)}")
    assert_problem(reply, "accountDoesNotExist", 400)


async def test_an_oversized_body_is_a_413_problem(acme: AcmeClient) -> None:
    account = await acme.new_account()
    payload = {"identifiers": [{"type": "dns", "value": "x.example.test"}],
               "padding": "x" * 100_000}
    reply = await acme.as_account(account, acme.dir["newOrder"], payload)
    assert_problem(reply, "malformed", 413)
    huge = await acme.post_body(acme.dir["newOrder"], b"{" + b" " * 900_000 + b"}")
    assert_problem(huge, "malformed", 413)


async def test_the_content_type_must_be_jose(acme: AcmeClient) -> None:
    account = await acme.new_account()
    message = acme.sign(account.key, None, account.kid, await acme.nonce(), account.kid)
    reply = await acme.request("POST", account.kid, body=json.dumps(message).encode(),
                               content_type="application/json")
    assert_problem(reply, "malformed", 415)


async def test_external_account_binding(acme_ca: AcmeCa, acme: AcmeClient) -> None:
    eab = AcmeClient(acme_ca, acme.session, "eab")
    await eab.load_directory()
    assert eab.dir["meta"]["externalAccountRequired"] is True
    key = new_key()
    url = eab.dir["newAccount"]
    reply = await eab.post(url, {"termsOfServiceAgreed": True}, key)
    assert_problem(reply, "externalAccountRequired", 400)

    created = json.loads(acme_ca.run_cli("acme", "eab", "add", "eab", home=acme_ca.ca_home)
                         .stdout)
    kid, hmac_key = created["kid"], base64.urlsafe_b64decode(created["hmacKey"] + "==")
    jwk = jws.public_jwk(key)

    async def register(binding: dict[str, Any], account_key: ec.EllipticCurvePrivateKey
                       ) -> Reply:
        return await eab.post(url, {"termsOfServiceAgreed": True,
                                    "externalAccountBinding": binding}, account_key)

    wrong_mac = jws.sign_eab(secrets.token_bytes(32), kid, jwk, url)
    assert_problem(await register(wrong_mac, key), "unauthorized", 403)
    other_key_bound = jws.sign_eab(hmac_key, kid, jws.public_jwk(new_key()), url)
    assert_problem(await register(other_key_bound, key), "unauthorized", 403)
    unknown_kid = jws.sign_eab(hmac_key, "no-such-kid", jwk, url)
    assert_problem(await register(unknown_kid, key), "unauthorized", 403)

    reply = await register(jws.sign_eab(hmac_key, kid, jwk, url), key)
    assert reply.status == 201, reply
    account = Account(key, reply.location)
    assert account.kid.startswith(eab.directory_url.rsplit("/", 1)[0] + "/account/")
    assert (await eab.get(account, account.kid))["status"] == "valid"
    # The account belongs to the eab provisioner only.
    assert_problem(await acme.as_account(account, acme.dir["newOrder"], {
        "identifiers": [{"type": "dns", "value": "x.example.test"}]}), "accountDoesNotExist")

    second = new_key()
    reused = await register(jws.sign_eab(hmac_key, kid, jws.public_jwk(second), url), second)
    doc = assert_problem(reused, "unauthorized", 403)
    assert "already bound" in doc["detail"], doc


# -- orders -------------------------------------------------------------------------------------
async def test_an_unsupported_identifier_type(acme: AcmeClient) -> None:
    account = await acme.new_account()
    reply = await acme.as_account(account, acme.dir["newOrder"], {
        "identifiers": [{"type": "email", "value": "someone@example.test"}]})
    doc = assert_problem(reply, "unsupportedIdentifier", 400)
    assert "email" in doc["detail"]


async def test_finalize_before_the_order_is_ready(acme: AcmeClient) -> None:
    account = await acme.new_account()
    names = names_for(acme.ca, "early")
    _, order = await acme.new_order(account, names)
    reply = await acme.finalize(account, order, names, new_key())
    assert_problem(reply, "orderNotReady", 403)


async def test_issue_with_http01_and_a_csr_with_an_extra_name(
        acme: AcmeClient, http01: dict[str, str]) -> None:
    account = await acme.new_account()
    names = names_for(acme.ca, "www", "api")
    order_url, order = await acme.ready_order(account, names, http01)
    extra = f"extra-{secrets.token_hex(3)}.example.test"
    key = new_key()
    reply = await acme.finalize(account, order, [*names, extra], key)
    doc = assert_problem(reply, "badCSR", 400)
    assert extra in doc["detail"], doc
    missing = await acme.finalize(account, order, names[:1], key)
    doc = assert_problem(missing, "badCSR", 400)
    assert names[1] in doc["detail"], doc
    assert (await acme.get(account, order_url))["status"] == "ready"
    final = await acme.finalize(account, order, names, key)
    assert final.status == 200, final
    assert final.location == order_url
    order = await acme.poll(account, order_url, {"valid", "invalid"})
    assert order["status"] == "valid", order
    cert = await acme.as_account(account, order["certificate"])
    assert cert.status == 200, cert
    path = acme.ca.work / "http01.crt"
    path.write_bytes(cert.body)
    leaf = acme.ca.verify_issued(path, names)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
            == key.public_key().public_bytes(serialization.Encoding.DER, spki))
    again = await acme.finalize(account, order, names, key)
    assert_problem(again, "orderNotReady", 403)


async def test_another_accounts_order_is_unauthorized(acme: AcmeClient) -> None:
    owner, other = await acme.new_account(), await acme.new_account()
    order_url, order = await acme.new_order(owner, names_for(acme.ca, "mine"))
    assert_problem(await acme.as_account(other, order_url), "unauthorized", 403)
    assert_problem(await acme.as_account(other, order["authorizations"][0]), "unauthorized",
                   403)
    assert_problem(await acme.as_account(other, owner.kid), "unauthorized", 403)
    assert_problem(await acme.as_account(other, owner.kid + "/orders"), "unauthorized", 403)


async def test_orders_list(acme: AcmeClient) -> None:
    account = await acme.new_account()
    assert (await acme.get(account, account.kid + "/orders"))["orders"] == []
    urls = [(await acme.new_order(account, names_for(acme.ca, f"list{i}")))[0]
            for i in range(3)]
    listed = (await acme.get(account, account.kid + "/orders"))["orders"]
    assert sorted(listed) == sorted(urls)
    assert (await acme.get(account, account.kid))["orders"] == account.kid + "/orders"


async def test_an_unreachable_name_makes_the_challenge_and_the_order_invalid(
        acme: AcmeClient, http01: dict[str, str]) -> None:
    account = await acme.new_account()
    tag = secrets.token_hex(3)
    nxdomain = f"nowhere-{tag}.example.test"  # no record at all
    refused = acme.ca.add_name(f"closed-{tag}.example.test", "127.0.0.3")  # nothing listens
    order_url, order = await acme.new_order(account, [nxdomain, refused])
    authz_urls = await acme.start_challenges(account, order, "http-01", http01)
    kinds = {}
    for authz_url in authz_urls:
        authz = await acme.poll(account, authz_url, {"valid", "invalid"})
        assert authz["status"] == "invalid", authz
        (chal,) = [c for c in authz["challenges"] if c["type"] == "http-01"]
        assert chal["status"] == "invalid", chal
        error = chal["error"]
        assert error["type"] in (URN + "dns", URN + "connection"), error
        assert error["identifier"] == authz["identifier"], error
        kinds[authz["identifier"]["value"]] = error["type"]
    assert kinds[nxdomain] == URN + "dns", kinds
    assert kinds[refused] == URN + "connection", kinds
    order = await acme.poll(account, order_url, {"invalid"})
    assert order["status"] == "invalid"
    reply = await acme.finalize(account, order, [nxdomain, refused], new_key())
    assert_problem(reply, "orderNotReady", 403)


# -- accounts: key change and deactivation --------------------------------------------------------
async def test_key_change(acme: AcmeClient) -> None:
    account = await acme.new_account()
    old_key, new = account.key, new_key()
    url = acme.dir["keyChange"]
    inner = jws.sign(new, {"account": account.kid, "oldKey": jws.public_jwk(old_key)},
                     url=url, nonce=None)
    reply = await acme.post(url, inner, old_key, kid=account.kid)
    assert reply.status == 200, reply
    assert reply.location == account.kid
    # The old key is refused for the account; for newAccount it no longer names an account.
    assert_problem(await acme.post(account.kid, None, old_key, kid=account.kid), "malformed",
                   400)
    assert_problem(await acme.post(acme.dir["newAccount"], {"onlyReturnExisting": True},
                                   old_key), "accountDoesNotExist", 400)
    account.key = new
    assert (await acme.get(account, account.kid))["status"] == "valid"
    found = await acme.post(acme.dir["newAccount"], {"onlyReturnExisting": True}, new)
    assert found.status == 200 and found.location == account.kid, found


async def test_key_change_to_a_key_in_use_is_a_409_conflict(acme: AcmeClient) -> None:
    """RFC 8555 §7.3.5: 409 Conflict with the other account's URL in Location."""
    account, other = await acme.new_account(), await acme.new_account()
    url = acme.dir["keyChange"]
    inner = jws.sign(account.key, {"account": other.kid, "oldKey": jws.public_jwk(other.key)},
                     url=url, nonce=None)
    clash = await acme.as_account(other, url, inner)
    assert clash.status == 409, clash
    assert clash.location == account.kid
    assert (await acme.get(other, other.kid))["status"] == "valid"  # still its own key
    assert_problem(clash, "malformed", 409)


async def test_account_deactivation(acme: AcmeClient) -> None:
    account = await acme.new_account()
    order_url, _ = await acme.new_order(account, names_for(acme.ca, "deact"))
    reply = await acme.as_account(account, account.kid, {"status": "deactivated"})
    assert reply.status == 200, reply
    assert reply.json()["status"] == "deactivated"
    for url, payload in ((account.kid, None), (order_url, None),
                         (acme.dir["newOrder"], {"identifiers": [
                             {"type": "dns", "value": "x.example.test"}]})):
        assert_problem(await acme.as_account(account, url, payload), "unauthorized")
    again = await acme.post(acme.dir["newAccount"], {"termsOfServiceAgreed": True}, account.key)
    assert_problem(again, "unauthorized")


async def test_a_deactivated_account_gets_401(acme: AcmeClient) -> None:
    """RFC 8555 §7.3.6: requests from a deactivated account MUST get 401 unauthorized."""
    account = await acme.new_account()
    reply = await acme.as_account(account, account.kid, {"status": "deactivated"})
    assert reply.status == 200, reply
    assert_problem(await acme.as_account(account, account.kid), "unauthorized", 401)


# -- revocation, renewal info ------------------------------------------------------------------
async def test_revoke_by_account_and_by_certificate_key(
        acme: AcmeClient, http01: dict[str, str]) -> None:
    ca = acme.ca
    account, stranger = await acme.new_account(), await acme.new_account()
    by_account = await acme.issue(account, names_for(ca, "rev1"), http01)
    by_key = await acme.issue(account, names_for(ca, "rev2"), http01)
    url = acme.dir["revokeCert"]

    def payload(issued: Issued, reason: int) -> dict[str, Any]:
        return {"certificate": b64url(issued.leaf.public_bytes(serialization.Encoding.DER)),
                "reason": reason}

    # Neither another account nor a key that is not the certificate's may revoke.
    assert_problem(await acme.as_account(stranger, url, payload(by_account, 1)),
                   "unauthorized", 403)
    assert_problem(await acme.post(url, payload(by_key, 1), new_key()), "unauthorized", 403)
    assert_problem(await acme.as_account(account, url, payload(by_account, 7)),
                   "badRevocationReason", 400)

    reply = await acme.as_account(account, url, payload(by_account, 4))
    assert reply.status == 200, reply
    reply = await acme.post(url, payload(by_key, 1), by_key.key)  # jwk of the certificate key
    assert reply.status == 200, reply
    assert_problem(await acme.as_account(account, url, payload(by_key, 1)), "alreadyRevoked",
                   400)
    assert_problem(await acme.post(url, payload(by_account, 1), by_account.key),
                   "alreadyRevoked", 400)

    crl_file, crl = ca.write_crl("protocol")
    for issued, reason in ((by_account, x509.ReasonFlags.superseded),
                           (by_key, x509.ReasonFlags.key_compromise)):
        entry = crl.get_revoked_certificate_by_serial_number(issued.leaf.serial_number)
        assert entry is not None, f"{issued.names} is not on the CRL"
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == reason
        result = ca.openssl_crl_check(write_chain(ca, issued, issued.names[0]), crl_file)
        assert result.returncode != 0 and "revoked" in result.stdout + result.stderr, result

    # renewalInfo of a revoked certificate: renew now.
    info = await acme.request("GET", f"{acme.dir['renewalInfo']}/{cert_id(by_key.leaf)}")
    assert info.status == 200, info
    window = info.json()["suggestedWindow"]
    assert parse_time(window["end"]) <= datetime.now(UTC) + timedelta(minutes=1), window


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_renewal_info(acme: AcmeClient, http01: dict[str, str]) -> None:
    account = await acme.new_account()
    issued = await acme.issue(account, names_for(acme.ca, "ari"), http01)
    reply = await acme.request("GET", f"{acme.dir['renewalInfo']}/{cert_id(issued.leaf)}")
    assert reply.status == 200, reply
    assert reply.headers.get("Retry-After"), reply.headers
    window = reply.json()["suggestedWindow"]
    start, end = parse_time(window["start"]), parse_time(window["end"])
    leaf = issued.leaf
    assert leaf.not_valid_before_utc < start < end < leaf.not_valid_after_utc, (window, leaf)
    # An unknown serial, and an id that is not AKI.serial.
    aki, serial = cert_id(leaf).split(".")[0], b64url(b"\x01\x02")
    unknown = await acme.request("GET", f"{acme.dir['renewalInfo']}/{aki}.{serial}")
    assert_problem(unknown, "malformed", 404)
    assert_problem(await acme.request("GET", f"{acme.dir['renewalInfo']}/nodot"), "malformed",
                   400)


# -- persistence ----------------------------------------------------------------------------------
async def test_accounts_orders_and_nonces_survive_a_restart(
        acme_ca: AcmeCa, acme: AcmeClient, http01: dict[str, str]) -> None:
    account = await acme.new_account()
    pending_url, _ = await acme.new_order(account, names_for(acme_ca, "pending"))
    issued = await acme.issue(account, names_for(acme_ca, "kept"), http01)
    nonce = await acme.fresh_nonce()
    acme_ca.restart()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        after = AcmeClient(acme_ca, session)
        await after.load_directory()
        assert after.dir == acme.dir
        first = await after.as_account(account, pending_url, nonce=nonce)  # a nonce from before
        assert first.status == 200, first
        assert first.json()["status"] == "pending"
        kept = await after.get(account, issued.order_url)
        assert kept["status"] == "valid" and kept["certificate"] == issued.order["certificate"]
        cert = await after.as_account(account, kept["certificate"])
        assert cert.status == 200 and cert.body == issued.pem
        listed = (await after.get(account, account.kid + "/orders"))["orders"]
        assert sorted(listed) == sorted([pending_url, issued.order_url])
        # Single use holds across the restart too.
        assert_problem(await after.as_account(account, account.kid, nonce=nonce), "badNonce")


# -- names and malformed payloads (issue 12) ------------------------------------------------------
async def replay_is_refused(acme: AcmeClient, url: str, body: bytes) -> None:
    """The same request again: its nonce was used by the refusal, so it cannot be replayed."""
    assert_problem(await acme.post_body(url, body), "badNonce", 400)


@pytest.mark.parametrize("form", ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "10.1",
                                  "0177.0.0.1", "127.0.0.1."])
async def test_a_dns_identifier_that_reads_as_an_address_is_rejected(
        acme: AcmeClient, form: str) -> None:
    """RFC 8738: an address is an ip identifier; as a dns one it would dodge IP policy."""
    account = await acme.new_account()
    url = acme.dir["newOrder"]
    body = json.dumps(acme.sign(account.key, {"identifiers": [
        {"type": "dns", "value": f"ok-{secrets.token_hex(3)}.example.test"},
        {"type": "dns", "value": form}]}, url, await acme.fresh_nonce(), account.kid)).encode()
    doc = assert_problem(await acme.post_body(url, body), "rejectedIdentifier", 400)
    assert form in doc["detail"] and "ip identifier" in doc["detail"], doc
    await replay_is_refused(acme, url, body)
    assert (await acme.get(account, account.kid + "/orders"))["orders"] == [], (
        "a refused new-order made an order")


async def test_finalize_with_a_malformed_subject_alt_name_is_bad_csr(
        acme: AcmeClient, http01: dict[str, str]) -> None:
    """Two subjectAltName extensions, or an undecodable one: badCSR with a fresh nonce (the
    client checks Replay-Nonce on every answer), the nonce used, the order still ready."""
    from tests.support.forged_csr import der, two_san_csr, undecodable_san_csr

    account = await acme.new_account()
    names = names_for(acme.ca, "forged")
    order_url, order = await acme.ready_order(account, names, http01)
    key = new_key()
    dns = [x509.DNSName(n) for n in names]
    forged = {"two subjectAltName extensions": (two_san_csr(key, dns, dns), "more than once"),
              "an undecodable subjectAltName": (undecodable_san_csr(key), "cannot be decoded")}
    for what, (csr, says) in forged.items():
        body = json.dumps(acme.sign(account.key, {"csr": b64url(der(csr))}, order["finalize"],
                                    await acme.fresh_nonce(), account.kid)).encode()
        doc = assert_problem(await acme.post_body(order["finalize"], body), "badCSR", 400)
        assert says in doc["detail"], (what, doc)
        await replay_is_refused(acme, order["finalize"], body)
        after = await acme.get(account, order_url)
        assert after["status"] == "ready" and "certificate" not in after, (what, after)
    # Nothing was lost: the order still finalizes with a well-formed CSR.
    good = await acme.finalize(account, order, names, key)
    assert good.status == 200, good


async def test_key_change_whose_payload_is_not_json_is_malformed(acme: AcmeClient) -> None:
    account = await acme.new_account()
    url = acme.dir["keyChange"]
    for payload in (b"not json", b'{"protected": ', b"[1, 2]", b"NaN"):
        header = {"alg": "ES256", "kid": account.kid, "nonce": await acme.fresh_nonce(),
                  "url": url}
        body = json.dumps(sign_with_header(account.key, header, payload)).encode()
        doc = assert_problem(await acme.post_body(url, body), "malformed", 400)
        assert "payload" in doc["detail"], (payload, doc)
        await replay_is_refused(acme, url, body)
    assert (await acme.get(account, account.kid))["status"] == "valid"  # the key is unchanged
