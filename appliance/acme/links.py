"""The URLs the ACME app sends (directory entries, Location, Link, account/order/authz URLs):
built only from a provisioner of ca.json and a Host that is a host name, never from text a
requester could fill with CR/LF, quotes or '>' to reach a header.

The path's provisioner segment is the requester's text: it only selects a provisioner, and the
URLs name that provisioner by its own name, percent-encoded as one path segment.
"""

from __future__ import annotations

import re
import urllib.parse

from aiohttp import web

from appliance.acme.problems import AcmeProblem
from appliance.acme.service import AcmeService
from appliance.authority.provisioners.acme import AcmeProvisioner

# An RFC 3986 host (a reg-name of unreserved characters, or an IP literal) and a port: what
# the ACME app builds its URLs on. Anything else in Host (a quote, '>', a space) would go into
# every Link and Location; aiohttp passes such a Host through.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def known_provisioner(request: web.Request, service: AcmeService) -> AcmeProvisioner | None:
    """The ACME provisioner the request's path names, if ca.json has one by that name."""
    untrusted_name = request.match_info.get("provisioner")
    return None if untrusted_name is None else service.issuing.provisioner_named(untrusted_name)


def provisioner_path_segment(name: str) -> str:
    """A provisioner's name as one URL path segment: all but the unreserved characters of
    RFC 3986 section 2.3 percent-encoded (a '/' too), so the name is one segment and nothing
    in it can end a URL or a header."""
    return urllib.parse.quote(name, safe="")


def request_authority(request: web.Request) -> str | None:
    """The request's Host if it is a host[:port] to build URLs on; None otherwise."""
    untrusted_host = request.host
    return untrusted_host if _AUTHORITY.fullmatch(untrusted_host) else None


def provisioner_base(request: web.Request, provisioner: AcmeProvisioner) -> str:
    """The provisioner's ACME URL prefix, https://HOST[/2.0]/acme/NAME; malformed (400) when
    the Host header is no host name."""
    authority = request_authority(request)
    if authority is None:
        raise AcmeProblem.malformed("the Host header is not a host name and port")
    prefix = "/2.0" if request.path.startswith("/2.0/") else ""
    return f"https://{authority}{prefix}/acme/{provisioner_path_segment(provisioner.name)}"


def index_link(request: web.Request, service: AcmeService) -> str | None:
    """Link rel="index" to the provisioner's directory (RFC 8555 section 7.1); None for a path
    that names no provisioner of ca.json (it has no directory) or a Host that is no host."""
    provisioner = known_provisioner(request, service)
    if provisioner is None or request_authority(request) is None:
        return None
    return f'<{provisioner_base(request, provisioner)}/directory>;rel="index"'
