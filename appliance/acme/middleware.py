"""What every ACME response gets: a problem document for every error, a fresh Replay-Nonce,
no-store, Link rel="index"; and the request's nonce used up, whatever the answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from appliance.acme.auth import replayed
from appliance.acme.links import index_link
from appliance.acme.problems import PROBLEM_CONTENT_TYPE, AcmeProblem, from_appliance_error
from appliance.acme.routes import SERVICE, use_pending_nonce
from appliance.acme.service import AcmeService
from appliance.errors import ApplianceError, TokenReused
from appliance.web_edge import REQUEST_ERROR

log = structlog.get_logger("appliance.acme")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(problem: AcmeProblem) -> web.Response:
    return web.json_response(problem.to_json(), status=problem.status,
                             content_type=PROBLEM_CONTENT_TYPE)


def _problem_of(request: web.Request, error: Exception) -> AcmeProblem:
    """The problem document an exception out of a handler becomes."""
    if isinstance(error, web.HTTPException):
        status = 413 if isinstance(error, web.HTTPRequestEntityTooLarge) else error.status
        detail = ("request body is too large" if status == 413
                  else f"{error.reason}: {request.method} {request.path[:200]}")
        return AcmeProblem.malformed(detail, status=status)
    if isinstance(error, AcmeProblem):
        return error
    if isinstance(error, TokenReused):  # the one token ACME's store records: a nonce
        return replayed()
    if isinstance(error, ApplianceError):
        return from_appliance_error(error)
    log.exception("acme_unhandled_error", path=request.path[:200])
    return AcmeProblem.server_internal()


@web.middleware
async def acme_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Problem documents, the nonce's use, Replay-Nonce and Link rel=index on every response.

    A handler that changes state uses the request's nonce in the same commit; here every other
    request's nonce is used, so a replay gets badNonce instead of what the handler answered.
    """
    service = request.app[SERVICE]
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _refused(request, _problem_of(request, e))
    except Exception as e:  # noqa: BLE001 - every answer is a problem document
        response = _refused(request, _problem_of(request, e), getattr(e, "retry_after", None))
    try:
        await use_pending_nonce(request, service)
    except (AcmeProblem, ApplianceError) as e:
        response = _refused(request, _problem_of(request, e))
    await add_acme_headers(service, request, response)
    return response


def _refused(request: web.Request, problem: AcmeProblem, retry_after: int | None = None
             ) -> web.Response:
    request[REQUEST_ERROR] = problem.detail
    response = problem_response(problem)
    if retry_after:  # Unavailable (the token is away): when to try again
        response.headers["Retry-After"] = str(retry_after)
    return response


async def add_acme_headers(service: AcmeService, request: web.Request,
                           response: web.StreamResponse) -> None:
    """A fresh Replay-Nonce (RFC 8555 §6.5), no-store, Link rel="index"."""
    try:
        response.headers["Replay-Nonce"] = await service.new_nonce()
    except ApplianceError:
        pass
    response.headers["Cache-Control"] = "no-store"
    # Only a provisioner of ca.json gets an index, its URL built from its own name: the
    # path's text would carry a requester's CR/LF or quotes into the header (an injected
    # Set-Cookie or Link parameter, or a response aiohttp refuses to write, dropping the
    # connection). An unknown provisioner has no directory, as in step-ca.
    try:
        link = index_link(request, service)
    except Exception:  # noqa: BLE001 - the lookup itself failed: the answer says so, unlinked
        link = None
    if link is not None:
        response.headers.add("Link", link)


def edge_answer(service: AcmeService) -> Callable[[web.Request, int, str],
                                                  Awaitable[web.StreamResponse]]:
    """The edge's own answers (429, the time limit's 503) as problem documents with a nonce,
    so that a client told to slow down has the nonce for its next try (§6.5)."""
    async def answer(request: web.Request, status: int, message: str) -> web.StreamResponse:
        problem = (AcmeProblem.rate_limited(message) if status == 429
                   else AcmeProblem.server_internal(message, status=status))
        response = problem_response(problem)
        await add_acme_headers(service, request, response)
        return response
    return answer
