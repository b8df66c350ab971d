"""What an aiohttp application tells the web edge about its requests.

The edge middleware (appliance.api.app) rate-limits issuing routes, audits refusals of audited
ones, and answers for the whole server when a limit is hit or a request runs out of time. An
application, the API or a mounted sub-app such as ACME, declares here which of its routes
issue or are audited, and in what form the edge's own answers must reach its clients; the
edge reads the declarations of the applications a request was routed through.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


class RouteRole(enum.Flag):
    """What the edge does for a route beyond serving it."""

    NONE = 0
    ISSUING = enum.auto()  # POSTs take from the issuance rate limit
    AUDITED = enum.auto()  # a refused POST (4xx) is an audit event


# The edge's own answer (a rate limit's 429, the time limit's 503) in the form the application
# the request is for speaks: (request, status, message) -> response.
EdgeAnswer = Callable[[web.Request, int, str], Awaitable[web.StreamResponse]]


@dataclass
class EdgeRules:
    """One application's declarations."""

    roles: dict[web.AbstractRoute, RouteRole] = field(default_factory=dict)
    answer: EdgeAnswer | None = None  # None: the edge's own (step-ca JSON)


EDGE_RULES = web.AppKey("edge_rules", EdgeRules)
# What a handler tells the edge's request log line and refusal audit about its request.
REQUEST_PROVISIONER = web.RequestKey("provisioner", str)
REQUEST_ERROR = web.RequestKey("error", str)


def edge_rules(app: web.Application) -> EdgeRules:
    """The application's declarations, to add to before it starts."""
    rules = app.get(EDGE_RULES)
    if rules is None:
        rules = app[EDGE_RULES] = EdgeRules()
    return rules


def declare_route(app: web.Application, route: web.AbstractRoute, role: RouteRole) -> None:
    edge_rules(app).roles[route] = role


def rules_of(request: web.Request) -> tuple[RouteRole, EdgeAnswer | None]:
    """The matched route's role and the answer of the innermost application that has one."""
    route = request.match_info.route
    role, answer = RouteRole.NONE, None
    for app in reversed(request.match_info.apps):
        rules = app.get(EDGE_RULES)
        if rules is not None:
            role = role or rules.roles.get(route, RouteRole.NONE)
            answer = answer or rules.answer
    return role, answer
