"""aiohttp app factory: thin handlers (parse, call the domain, render) and the edge middlewares."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web, web_response
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import __version__
from appliance.api.ratelimit import TokenBuckets
from appliance.audit import AuditError, AuditEvent
from appliance.authority.authority import Authority
from appliance.authority.lifecycle import RevokeRequest
from appliance.authority.provisioners.jwk import JwkProvisioner
from appliance.authority.requests import SignRequest
from appliance.config import CIPHER_SUITES, CaConfig
from appliance.errors import ApplianceError, BadRequest, NotFound, PayloadTooLarge, Unauthorized
from appliance.issuance.ca_certs import fingerprint, pem
from appliance.issuance.issuer import IssuedCertificate
from appliance.web_edge import (
    REQUEST_ERROR,
    REQUEST_PROVISIONER,
    EdgeAnswer,
    RouteRole,
    declare_route,
    rules_of,
)

log = structlog.get_logger("appliance.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ApiState:
    """What the handlers reach; swapped field by field on reload, never looked up globally."""

    authority: Authority
    config: CaConfig
    root: x509.Certificate
    intermediates: list[x509.Certificate]
    health: Callable[[], tuple[int, dict[str, Any]]] = field(
        default=lambda: (200, {"status": "ok"}))
    issuance_limit: TokenBuckets = field(default_factory=lambda: TokenBuckets(0, 0))
    failed_auth_limit: TokenBuckets = field(default_factory=lambda: TokenBuckets(0, 0))
    request_timeout: float = 30.0

    def apply_limits(self, config: CaConfig) -> None:
        """(Re)build the rate limits and time limit from ca.json."""
        rl = config.rate_limits
        self.issuance_limit = TokenBuckets(rl.issuance.per_second, rl.issuance.burst)
        self.failed_auth_limit = TokenBuckets(rl.failed_auth.per_second, rl.failed_auth.burst)
        self.request_timeout = config.request_timeout.value.total_seconds()


STATE = web.AppKey("state", ApiState)
SERVER_HEADER = "appliance"  # names no product and no version: a scanner learns nothing


def hide_server_versions() -> None:
    """Every response's Server header says SERVER_HEADER, not "Python/3.11 aiohttp/<version>".

    aiohttp adds the header (setdefault) from a constant of aiohttp.web_response when it writes
    any response's headers, also the 400 it answers to malformed HTTP before any application
    sees the request, where no on_response_prepare signal runs. So each application factory
    rebinds that constant for its process; the e2e suite checks every listener and such a 400.
    """
    # It is web_response's own name (imported from aiohttp.http), which is what it reads.
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]


# Request ids need to be unique, not secret: a PRNG seeded once per process spares a getrandom
# system call on every request.
_request_ids = random.Random(secrets.randbits(128))  # noqa: S311 - not a secret


def error_body(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status)


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request; typed errors become step-ca JSON; nothing internal leaks."""
    start = time.perf_counter()
    request_id = (request.headers.get("X-Request-Id", "")[:64]
                  or f"{_request_ids.getrandbits(64):016x}")
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await _limited(request, handler)
        response.headers["X-Request-Id"] = request_id
        log.info("request", method=request.method, path=request.path, status=response.status,
                 duration_ms=round((time.perf_counter() - start) * 1000, 2),
                 peer=request.remote, provisioner=request.get(REQUEST_PROVISIONER),
                 error=request.get(REQUEST_ERROR))
    return response


async def _edge_answer(request: web.Request, answer: EdgeAnswer | None, status: int,
                       message: str) -> web.StreamResponse:
    request[REQUEST_ERROR] = message
    if answer is None:
        return error_body(status, message)
    return await answer(request, status, message)


async def _too_many(request: web.Request, answer: EdgeAnswer | None, wait: float, what: str
                    ) -> web.StreamResponse:
    seconds = max(int(wait + 0.999), 1)
    message = f"too many {what} from {request.remote}; retry in {seconds} s"
    response = await _edge_answer(request, answer, 429, message)
    response.headers["Retry-After"] = str(seconds)
    return response


async def _limited(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limits per client address and the request time limit, around the handler."""
    state = request.app[STATE]
    client = request.remote or "unknown"
    role, answer = rules_of(request)
    wait = state.failed_auth_limit.retry_after(client)
    if wait:
        return await _too_many(request, answer, wait, "failed authentications")
    if request.method == "POST" and RouteRole.ISSUING in role:
        wait = state.issuance_limit.take(client)
        if wait:
            return await _too_many(request, answer, wait, "issuance requests")
    try:
        async with asyncio.timeout(state.request_timeout):
            response = await _handle(request, handler)
    except TimeoutError:
        response = await _edge_answer(request, answer, 503,
                                      "the request took too long; try again")
    if response.status in (401, 403):
        state.failed_auth_limit.take(client)
    if 400 <= response.status < 500 and request.method == "POST" and \
            RouteRole.AUDITED in role:
        audit = state.authority.issuer.audit
        if audit is not None:
            try:
                await audit.append(AuditEvent(
                    "request.refused", "failure", f"client:{client}",
                    {"path": request.path[:200], "status": response.status,
                     "reason": str(request.get(REQUEST_ERROR) or "")[:500],
                     "provisioner": request.get(REQUEST_PROVISIONER)}))
            except AuditError:
                log.error("audit_write_failed", audit_event="request.refused")
    return response


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApplianceError as e:
        response = error_body(e.status, e.message)
        request[REQUEST_ERROR] = e.message
        retry_after = getattr(e, "retry_after", None)  # Unavailable: the token is away...
        if retry_after:
            response.headers["Retry-After"] = str(retry_after)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].config.max_body_bytes
        response = error_body(413, f"request body is larger than {limit} bytes")
    except web.HTTPNotFound:
        response = error_body(404, f"no such endpoint: {request.method} {request.path[:200]}")
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        response = error_body(405, f"method {request.method} is not allowed on "
                                   f"{request.path[:200]}; use {allowed}")
        response.headers["Allow"] = allowed
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = error_body(e.status, e.reason)
    except Exception:
        log.exception("unhandled_error", path=request.path)
        response = error_body(500, "internal server error")
    return response


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > request.app[
            STATE].config.max_body_bytes:
        raise PayloadTooLarge(
            f"request body is larger than {request.app[STATE].config.max_body_bytes} bytes")
    body = await request.read()
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at position {e.pos}"
                         ) from None
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid JSON: it is not UTF-8") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: it is nested too deeply") from None


def tls_options(config: CaConfig) -> dict[str, Any]:
    return {"cipherSuites": config.tls.cipher_suites, "minVersion": config.tls.min_version,
            "maxVersion": config.tls.max_version, "renegotiation": config.tls.renegotiation}


# -- handlers ---------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    status, body = request.app[STATE].health()
    response = web.json_response(body, status=status)
    if isinstance(body.get("retryAfter"), int):
        response.headers["Retry-After"] = str(body["retryAfter"])
    return response


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__, "requireClientAuthentication": False})


async def root_by_fingerprint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wanted = request.match_info["sha"].lower().replace(":", "")
    if wanted != fingerprint(state.root):
        raise NotFound(f"root certificate with fingerprint {wanted[:80]} was not found")
    return web.json_response({"ca": pem(state.root)})


def _crts(certs: list[x509.Certificate], as_pem: bool) -> web.Response:
    if as_pem:
        return web.Response(text="".join(pem(c) for c in certs),
                            content_type="application/x-pem-file")
    return web.json_response({"crts": [pem(c) for c in certs]})


async def roots(request: web.Request) -> web.Response:
    return _crts([request.app[STATE].root], False)


async def roots_pem(request: web.Request) -> web.Response:
    return _crts([request.app[STATE].root], True)


async def intermediates(request: web.Request) -> web.Response:
    return _crts(request.app[STATE].intermediates, False)


async def intermediates_pem(request: web.Request) -> web.Response:
    return _crts(request.app[STATE].intermediates, True)


async def provisioners(request: web.Request) -> web.Response:
    """step-ca pagination (`cursor` opaque, `limit` at most 100, default 20), in ca.json order,
    so that clients that take the first JWK provisioner take the one listed first."""
    state = request.app[STATE]
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit must be a whole number") from None
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be between 1 and 100")
    items = state.authority.provisioners
    cursor = request.query.get("cursor", "")
    if cursor and not cursor.isdigit():
        raise BadRequest("cursor must be a value returned as nextCursor")
    start = int(cursor) if cursor else 0
    page = items[start:start + limit]
    next_cursor = str(start + limit) if start + limit < len(items) else ""
    return web.json_response({"provisioners": [p.public_json() for p in page],
                              "nextCursor": next_cursor})


async def encrypted_key(request: web.Request) -> web.Response:
    kid = request.match_info["kid"]
    for p in request.app[STATE].authority.provisioners:
        if isinstance(p, JwkProvisioner) and p.kid == kid and p.config.encrypted_key:
            return web.json_response({"key": p.config.encrypted_key})
    raise NotFound("encrypted key not found")


async def sign(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sign_request = SignRequest.from_json(await read_json(request))
    issued, provisioner = await state.authority.sign(sign_request)
    request[REQUEST_PROVISIONER] = provisioner
    return _issued_response(state, issued, 201)


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate of an mTLS connection (verified to the root in the handshake)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return x509.load_der_x509_certificate(der) if der else None


def _issued_response(state: ApiState, issued: IssuedCertificate, status: int) -> web.Response:
    chain = issued.pem_chain()
    return web.json_response(
        {"crt": chain[0], "ca": chain[1] if len(chain) > 1 else "", "certChain": chain,
         "tlsOptions": tls_options(state.config)},
        status=status)


async def renew(request: web.Request) -> web.Response:
    """mTLS with the certificate being renewed, or `Authorization: Bearer <x5c token>`."""
    state = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        cert, token_use = state.authority.verify_x5c_token(auth[7:].strip(), rekey=False)
        issued, provisioner = await state.authority.renew(cert, token_use=token_use)
    else:
        peer = peer_certificate(request)
        if peer is None:
            raise Unauthorized("renew needs the certificate over mTLS or an x5c Bearer token")
        issued, provisioner = await state.authority.renew(peer)
    request[REQUEST_PROVISIONER] = provisioner
    return _issued_response(state, issued, 201)


async def rekey(request: web.Request) -> web.Response:
    """mTLS with the current certificate, or an x5c Bearer token (certificates without
    clientAuth cannot be TLS client certificates); an expired certificate cannot rekey."""
    state = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    peer: x509.Certificate | None
    if auth.lower().startswith("bearer "):
        peer, token_use = state.authority.verify_x5c_token(auth[7:].strip(), rekey=True)
    else:
        peer, token_use = peer_certificate(request), None
    if peer is None:
        raise Unauthorized("rekey needs the current certificate over mTLS or an x5c token")
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
        raise BadRequest("missing csr: a PEM certificate request for the new key is required")
    issued, provisioner = await state.authority.rekey(peer, body["csr"], token_use)
    request[REQUEST_PROVISIONER] = provisioner
    return _issued_response(state, issued, 201)


async def revoke(request: web.Request) -> web.Response:
    state = request.app[STATE]
    revoke_request = RevokeRequest.from_json(await read_json(request))
    request[REQUEST_PROVISIONER] = await state.authority.revoke(revoke_request,
                                                         peer_certificate(request))
    return web.json_response({"status": "ok"})


async def crl(request: web.Request) -> web.Response:
    record = await request.app[STATE].authority.crl.current()
    headers = {"Cache-Control": "public, max-age=60"}
    if "pem" in request.query:
        body = x509.load_der_x509_crl(record.der).public_bytes(serialization.Encoding.PEM)
        return web.Response(body=body, content_type="application/x-pem-file", headers=headers)
    return web.Response(body=record.der, content_type="application/pkix-crl", headers=headers)


def create_insecure_app(state: ApiState) -> web.Application:
    """The plain-HTTP listener (insecureAddress): the CRL and the root, nothing else."""
    hide_server_versions()
    app = web.Application(client_max_size=1024, middlewares=[edge_middleware])
    app[STATE] = state
    for prefix in ("", "/1.0"):
        app.router.add_get(f"{prefix}/crl", crl)
        app.router.add_get(f"{prefix}/roots.pem", roots_pem)
        app.router.add_get(f"{prefix}/root/{{sha}}", root_by_fingerprint)
    return app


def create_app(state: ApiState) -> web.Application:
    """The API application; `state` carries every service the handlers use."""
    hide_server_versions()
    app = web.Application(client_max_size=state.config.max_body_bytes,
                          middlewares=[edge_middleware])
    app[STATE] = state
    for prefix in ("", "/1.0"):
        app.router.add_get(f"{prefix}/health", health)
        app.router.add_get(f"{prefix}/version", version)
        app.router.add_get(f"{prefix}/root/{{sha}}", root_by_fingerprint)
        app.router.add_get(f"{prefix}/roots", roots)
        app.router.add_get(f"{prefix}/roots.pem", roots_pem)
        app.router.add_get(f"{prefix}/intermediates", intermediates)
        app.router.add_get(f"{prefix}/intermediates.pem", intermediates_pem)
        app.router.add_get(f"{prefix}/provisioners", provisioners)
        app.router.add_get(f"{prefix}/provisioners/{{kid}}/encrypted-key", encrypted_key)
        issuing = RouteRole.ISSUING | RouteRole.AUDITED
        declare_route(app, app.router.add_post(f"{prefix}/sign", sign), issuing)
        declare_route(app, app.router.add_post(f"{prefix}/renew", renew), issuing)
        declare_route(app, app.router.add_post(f"{prefix}/rekey", rekey), issuing)
        declare_route(app, app.router.add_post(f"{prefix}/revoke", revoke), RouteRole.AUDITED)
        app.router.add_get(f"{prefix}/crl", crl)
    return app


__all__ = ["ApiState", "CIPHER_SUITES", "STATE", "create_app"]


def create_sealed_app(progress: Callable[[], tuple[int, int]]) -> web.Application:
    """While sealed: /health says so with the quorum's progress; everything else is 503."""
    async def sealed_health(request: web.Request) -> web.Response:
        have, need = progress()
        return web.json_response({"status": "sealed", "progress": f"{have}/{need}"},
                                 status=503)

    async def sealed(request: web.Request) -> web.Response:
        have, need = progress()
        return error_body(503, f"the CA is sealed ({have}/{need} unseal shares handed in): "
                               "custodians must run 'applianctl unlock'")

    hide_server_versions()
    app = web.Application(client_max_size=1024)
    for prefix in ("", "/1.0"):
        app.router.add_get(f"{prefix}/health", sealed_health)
    app.router.add_route("*", "/{tail:.*}", sealed)
    return app
