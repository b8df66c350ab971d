"""The ACME sub-application: RFC 8555 under /acme/{provisioner}/ and /2.0/acme/{provisioner}/.

Whoever builds the server passes the authority and an `AcmeStore`; this builds the
`AcmeService` over them and mounts the routes (appliance.acme.routes) behind the ACME
middleware, and declares to the edge which routes issue or are audited, and how its own
answers (429, 503) look to an ACME client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from aiohttp import web

from appliance.acme import routes
from appliance.acme.challenge_registry import ChallengeRegistry, standard_registry
from appliance.acme.challenges import ValidationSettings
from appliance.acme.issuing import AuthorityIssuing
from appliance.acme.middleware import acme_middleware, edge_answer
from appliance.acme.service import AcmeService
from appliance.acme.validation_addresses import (
    DEFAULT_DENY_RANGES,
    AddressPolicy,
    parse_ranges,
)
from appliance.authority.authority import Authority
from appliance.config import CaConfig
from appliance.storage.acme_protocol import AcmeStore
from appliance.web_edge import RouteRole, declare_route, edge_rules


@dataclass(frozen=True)
class AcmeState:
    """What the ACME service is made of (one per process)."""

    authority: Authority
    store: AcmeStore
    settings: ValidationSettings
    max_concurrent: int
    order_lifetime: timedelta
    clock: Callable[[], float] = time.time
    challenges: ChallengeRegistry | None = field(default=None)  # None: the standard three

    def service(self) -> AcmeService:
        return AcmeService(
            self.store, AuthorityIssuing(self.authority),
            self.challenges or standard_registry(self.settings),
            order_lifetime=self.order_lifetime, max_concurrent=self.max_concurrent,
            validation_timeout=self.settings.timeout, clock=self.clock)


_ISSUING = RouteRole.ISSUING | RouteRole.AUDITED


def _add_routes(app: web.Application) -> None:
    r = app.router
    prefix = "/{provisioner}"
    r.add_get(f"{prefix}/directory", routes.directory)
    r.add_route("HEAD", f"{prefix}/new-nonce", routes.new_nonce)
    r.add_get(f"{prefix}/new-nonce", routes.new_nonce, allow_head=False)
    declare_route(app, r.add_post(f"{prefix}/new-account", routes.new_account),
                  RouteRole.AUDITED)
    r.add_post(f"{prefix}/account/{{id}}", routes.account)
    r.add_post(f"{prefix}/account/{{id}}/orders", routes.list_orders)
    r.add_post(f"{prefix}/key-change", routes.key_change)
    declare_route(app, r.add_post(f"{prefix}/new-order", routes.new_order), _ISSUING)
    r.add_post(f"{prefix}/order/{{id}}", routes.get_order)
    declare_route(app, r.add_post(f"{prefix}/order/{{id}}/finalize", routes.finalize),
                  _ISSUING)
    r.add_post(f"{prefix}/authz/{{id}}", routes.authz)
    r.add_post(f"{prefix}/challenge/{{id}}", routes.challenge)
    r.add_post(f"{prefix}/cert/{{id}}", routes.certificate)
    declare_route(app, r.add_post(f"{prefix}/revoke-cert", routes.revoke_cert),
                  RouteRole.AUDITED)
    r.add_get(f"{prefix}/renewal-info/{{id}}", routes.renewal_info)


def create_acme_app(service: AcmeService, max_body: int) -> web.Application:
    """One ACME application (mounted at /acme and at /2.0/acme)."""
    app = web.Application(client_max_size=max_body, middlewares=[acme_middleware])
    app[routes.SERVICE] = service
    edge_rules(app).answer = edge_answer(service)
    _add_routes(app)
    return app


def mount_acme(parent: web.Application, state: AcmeState, max_body: int) -> AcmeService:
    """RFC 8555 under /acme/{provisioner}/ and /2.0/acme/{provisioner}/ of `parent`."""
    service = state.service()
    for prefix in ("/acme", "/2.0/acme"):
        parent.add_subapp(prefix, create_acme_app(service, max_body))

    async def run_service(_app: web.Application) -> AsyncIterator[None]:
        purging = asyncio.get_running_loop().create_task(service.purge_periodically())
        yield
        purging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purging
        await service.close()

    parent.cleanup_ctx.append(run_service)
    return service


def validation_settings(config: CaConfig, resolver: str | None) -> ValidationSettings:
    addresses = AddressPolicy(
        deny_ranges=DEFAULT_DENY_RANGES + parse_ranges(config.acme.validation_deny_ranges),
        allow_ranges=parse_ranges(config.acme.validation_allow_ranges),
        # The CA's own listeners: never a validation target, whatever is allowed.
        own_ports=frozenset(int(a.rpartition(":")[2])
                            for a in (config.address, config.insecure_address) if a))
    return ValidationSettings(http_port=config.acme.http_port, tls_port=config.acme.tls_port,
                              resolver=resolver,
                              timeout=config.acme.validation_timeout.value
                              .total_seconds(), addresses=addresses)
