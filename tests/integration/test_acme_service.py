"""AcmeService in-process: a real Authority, a real SQLite store, a fake clock.

The challenge registry holds one validator that checks the key authorization the test
"publishes" (the network validators are proven by test_acme_challenges and the e2e suites);
everything else is the production code: the state machine, finalize, the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.acme import jws, messages
from appliance.acme.api import create_acme_app
from appliance.acme.challenge_registry import ChallengeRegistry, Validation
from appliance.acme.challenges import ChallengeFailed
from appliance.acme.issuing import AuthorityIssuing
from appliance.acme.messages import Finalize, NewAccount, NewOrder
from appliance.acme.problems import AcmeProblem
from appliance.acme.service import AcmeService
from appliance.api.app import ApiState, create_app
from appliance.authority.plan import SignPlan
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.jose.base64url import b64url_encode
from appliance.storage.acme_protocol import (
    AcmeAccount,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    ChallengeType,
    IdentifierType,
    OrderStatus,
)
from appliance.storage.sqlite_acme import SqliteAcmeStore
from tests.support.inprocess import InProcessCa, build_ca, csr_for

ORDER_LIFETIME = timedelta(hours=1)


@dataclass
class PublishedKeyAuthorizations:
    """http-01 as a test serves it: the key authorizations it has put up, by token."""

    served: dict[str, str] = field(default_factory=dict)
    identifier_types = frozenset({IdentifierType.DNS, IdentifierType.IP})
    wildcards = False

    async def validate(self, validation: Validation) -> None:
        if self.served.get(validation.token) != validation.key_authorization:
            raise ChallengeFailed("incorrectResponse", "the key authorization is not served")

    async def close(self) -> None:
        pass


class GatedIssuing(AuthorityIssuing):
    """The authority's issuing, held at the door until the test opens it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def issue(self, plan: SignPlan) -> x509.Certificate:
        self.entered.set()
        await self.gate.wait()
        return await super().issue(plan)


@dataclass
class World:
    ca: InProcessCa
    service: AcmeService
    issuing: GatedIssuing
    http01: PublishedKeyAuthorizations
    provisioner: AcmeProvisioner
    key: ec.EllipticCurvePrivateKey


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ca = await build_ca(tmp_path)
    http01 = PublishedKeyAuthorizations()
    registry = ChallengeRegistry()
    registry.register(ChallengeType.HTTP_01, http01)
    issuing = GatedIssuing(ca.authority)
    service = AcmeService(SqliteAcmeStore(ca.store), issuing, registry,
                          order_lifetime=ORDER_LIFETIME, max_concurrent=4,
                          validation_timeout=2.0, clock=ca.clock)
    provisioner = ca.authority.provisioner_named("acme")
    assert isinstance(provisioner, AcmeProvisioner)
    try:
        yield World(ca, service, issuing, http01, provisioner,
                    ec.generate_private_key(ec.SECP256R1()))
    finally:
        await service.close()
        await ca.store.close()


async def new_account(w: World) -> AcmeAccount:
    account, created = await w.service.new_account(
        w.provisioner, jws.public_jwk(w.key), NewAccount.from_json({}),
        "https://ca.test/acme/acme/new-account")
    assert created
    return account


async def ready_order(w: World, account: AcmeAccount, name: str = "a.test") -> AcmeOrder:
    order = await w.service.new_order(w.provisioner, account, NewOrder.from_json(
        {"identifiers": [{"type": "dns", "value": name}]}), None)
    assert order.status is OrderStatus.PENDING
    (authz_id,) = order.authz_ids
    authz = await w.service.store.get_authz(authz_id)
    assert authz is not None
    (chal,) = authz.challenges
    w.http01.served[chal.token] = jws.key_authorization(chal.token, account.jwk)
    done = await w.service.respond_to_challenge(authz, chal, account, None)
    assert done.status is ChallengeStatus.VALID, done.error
    ready = await w.service.store.get_order(order.id)
    assert ready is not None and ready.status is OrderStatus.READY
    return ready


def finalize_request(name: str) -> Finalize:
    csr, _ = csr_for(name, [x509.DNSName(name)])
    return Finalize(csr)


async def test_an_order_goes_from_pending_to_valid_with_its_certificate(world: World) -> None:
    account = await new_account(world)
    order = await ready_order(world, account)
    done = await world.service.finalize(world.provisioner, account, order,
                                        finalize_request("a.test"), None)
    assert done.status is OrderStatus.VALID and done.cert_serial is not None
    _, (found, der) = await world.service.store.account_and_order_certificate(
        "acme", account.id, order.id)
    assert found == done and der is not None, "the order's certificate is not recorded"
    cert = x509.load_der_x509_certificate(der)
    assert format(cert.serial_number, "x") == done.cert_serial
    with pytest.raises(AcmeProblem) as again:
        await world.service.finalize(world.provisioner, account, done,
                                     finalize_request("a.test"), None)
    assert again.value.type == "orderNotReady"


async def test_a_csr_for_other_names_leaves_the_order_ready(world: World) -> None:
    account = await new_account(world)
    order = await ready_order(world, account)
    with pytest.raises(AcmeProblem) as refused:
        await world.service.finalize(world.provisioner, account, order,
                                     finalize_request("b.test"), None)
    assert refused.value.type == "badCSR"
    after = await world.service.store.get_order(order.id)
    assert after is not None and after.status is OrderStatus.READY


async def test_authorizations_and_orders_expire_by_the_clock(world: World) -> None:
    account = await new_account(world)
    order = await world.service.new_order(world.provisioner, account, NewOrder.from_json(
        {"identifiers": [{"type": "dns", "value": "late.test"}]}), None)
    authz = await world.service.store.get_authz(order.authz_ids[0])
    assert authz is not None
    assert messages.authz_status_at(authz, world.ca.clock()) is AuthorizationStatus.PENDING
    world.ca.clock.advance(ORDER_LIFETIME.total_seconds() + 1)
    assert messages.authz_status_at(authz, world.ca.clock()) is AuthorizationStatus.EXPIRED
    with pytest.raises(AcmeProblem) as refused:
        await world.service.respond_to_challenge(authz, authz.challenges[0], account, None)
    assert refused.value.type == "malformed" and "cannot be validated" in refused.value.detail
    lapsed = await world.service.owned_order(world.provisioner, order, account)
    assert lapsed.status is OrderStatus.INVALID
    assert lapsed.error is not None and lapsed.error["detail"] == "the order expired"


async def test_a_finalize_cancelled_mid_issuance_leaves_the_order_at_its_certificate(
        world: World) -> None:
    account = await new_account(world)
    order = await ready_order(world, account)
    world.issuing.gate.clear()
    request = asyncio.create_task(world.service.finalize(
        world.provisioner, account, order, finalize_request("a.test"), None))
    await asyncio.wait_for(world.issuing.entered.wait(), 5)
    request.cancel()  # the client dropped, or the request ran out of time
    with pytest.raises(asyncio.CancelledError):
        await request
    processing = await world.service.store.get_order(order.id)
    assert processing is not None and processing.status is OrderStatus.PROCESSING
    world.issuing.gate.set()
    await world.service.close()  # waits for the finalize it runs
    done = await world.service.store.get_order(order.id)
    assert done is not None and done.status is OrderStatus.VALID, done
    assert done.cert_serial is not None
    record = await world.ca.store.get_certificate(int(done.cert_serial, 16))
    assert record is not None and record.der is not None, "the order points at no certificate"
    assert [r.provisioner for r in world.ca.issuer.requests] == ["acme"]


# -- over HTTP: the API edge with the ACME sub-app, in-process -----------------------------------
class BrokenIssuing(GatedIssuing):
    """Fails in a way no handler expects, for the provisioner named "broken"."""

    def provisioner_named(self, name: str) -> AcmeProvisioner | None:
        if name == "broken":
            raise RuntimeError("an internal detail that must not reach the client")
        return super().provisioner_named(name)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[World, TestClient]]:
    ca = await build_ca(tmp_path)
    http01 = PublishedKeyAuthorizations()
    registry = ChallengeRegistry()
    registry.register(ChallengeType.HTTP_01, http01)
    issuing = BrokenIssuing(ca.authority)
    service = AcmeService(SqliteAcmeStore(ca.store), issuing, registry,
                          order_lifetime=ORDER_LIFETIME, max_concurrent=4,
                          validation_timeout=2.0, clock=ca.clock)
    state = ApiState(authority=ca.authority, config=ca.authority.config, root=ca.root,
                     intermediates=[ca.issuer.certificate])
    state.request_timeout = 0.5
    app = create_app(state)
    app.add_subapp("/acme", create_acme_app(service, 65536))
    provisioner = ca.authority.provisioner_named("acme")
    assert isinstance(provisioner, AcmeProvisioner)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield World(ca, service, issuing, http01, provisioner,
                    ec.generate_private_key(ec.SECP256R1())), client
    finally:
        await client.close()
        await service.close()
        await ca.store.close()


def assert_acme_problem(response: ClientResponse, body: dict[str, object], kind: str,
                        status: int, *, index: bool = True) -> None:
    assert response.status == status, body
    assert response.content_type == "application/problem+json", response.headers
    assert body["type"] == f"urn:ietf:params:acme:error:{kind}", body
    assert response.headers.get("Replay-Nonce"), "no fresh nonce with the problem"
    if index:  # a path that names no provisioner has no directory to point at
        assert "rel=\"index\"" in response.headers.get("Link", ""), response.headers


async def test_a_finalize_past_the_time_limit_is_a_problem_and_the_order_still_gets_its_cert(
        http: tuple[World, TestClient]) -> None:
    w, client = http
    account = await new_account(w)
    order = await ready_order(w, account)
    host = f"{client.server.host}:{client.server.port}"
    nonce = (await client.head("/acme/acme/new-nonce")).headers["Replay-Nonce"]
    url = f"https://{host}/acme/acme/order/{order.id}/finalize"
    csr, _ = csr_for("a.test", [x509.DNSName("a.test")])
    body = jws.sign(w.key, {"csr": b64url_encode(csr.public_bytes(serialization.Encoding.DER))},
                    url=url, nonce=nonce, kid=f"https://{host}/acme/acme/account/{account.id}")
    w.issuing.gate.clear()
    response = await client.post(f"/acme/acme/order/{order.id}/finalize", json=body,
                                 headers={"Content-Type": "application/jose+json"})
    assert_acme_problem(response, await response.json(content_type=None), "serverInternal", 503)
    w.issuing.gate.set()
    await w.service.close()
    done = await w.service.store.get_order(order.id)
    assert done is not None and done.status is OrderStatus.VALID and done.cert_serial, done


async def test_an_unexpected_failure_is_a_500_problem_with_a_nonce(
        http: tuple[World, TestClient]) -> None:
    _, client = http
    response = await client.get("/acme/broken/directory")
    body = await response.json(content_type=None)
    # The provisioner lookup is what fails, so there is no directory to link to.
    assert_acme_problem(response, body, "serverInternal", 500, index=False)
    assert "internal detail" not in json.dumps(body), body


async def test_an_unknown_acme_path_is_a_problem_with_a_nonce(
        http: tuple[World, TestClient]) -> None:
    _, client = http
    response = await client.post("/acme/acme/no-such-thing")
    assert_acme_problem(response, await response.json(content_type=None), "malformed", 404,
                        index=False)
