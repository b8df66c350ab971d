"""The web applications a worker serves, composed from its services: the API with ACME mounted
(on the TLS port) and the plain-HTTP app (insecureAddress: CRL and root only).

api/ and acme/ each have their aiohttp factory; this is where the two meet, since neither may
import the other's wiring. A test builds the same thing in-process: `compose_services` around a
throwaway token, then `create_server_app`, then aiohttp's test server.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web

from appliance.acme.api import AcmeState, mount_acme, validation_settings
from appliance.api.app import ApiState, create_app, create_insecure_app
from appliance.config import load_config
from appliance.errors import ApplianceError
from appliance.server.composition import Services
from appliance.storage.sqlite_acme import SqliteAcmeStore

log = structlog.get_logger("appliance.server")


@dataclass
class ServerApp:
    """A process's services and the applications over them."""

    services: Services
    state: ApiState
    app: web.Application
    insecure_app: web.Application | None  # None without an insecureAddress

    def reload(self) -> None:
        """Re-read ca.json into the authority and the limits; a bad file keeps the old one."""
        services = self.services
        try:
            config = load_config(services.config_path)
            services.authority.reload(config)
        except ApplianceError as e:
            log.error("reload_failed", reason=e.message)
            return
        if config.address != services.config.address or config.tls != services.config.tls:
            log.warning("reload_needs_restart", reason="address and tls take effect on restart")
        services.config = config
        self.state.config = config
        self.state.apply_limits(config)
        log.info("config_reloaded", provisioners=len(config.authority.provisioners))


def create_server_app(services: Services, *, resolver: str | None = None) -> ServerApp:
    """The API app with ACME mounted, and the plain-HTTP app when ca.json asks for one.

    `resolver` (IP:port) is the DNS server ACME validations resolve names through.
    """
    config = services.config
    state = ApiState(authority=services.authority, config=config, root=services.root,
                     intermediates=[services.intermediate])
    state.apply_limits(config)
    app = create_app(state)
    acme_state = AcmeState(
        authority=services.authority, store=SqliteAcmeStore(services.store),
        settings=validation_settings(config, resolver),
        max_concurrent=config.acme.max_concurrent_validations,
        order_lifetime=config.acme.order_lifetime.value)
    mount_acme(app, acme_state, config.max_body_bytes)
    insecure_app = create_insecure_app(state) if config.insecure_address else None
    return ServerApp(services, state, app, insecure_app)
