"""appliance.acme.links: what the ACME app's URLs may be built from.

ca.json restricts provisioner names to [A-Za-z0-9._-], so a name that needs encoding cannot
reach a live CA; the encoding is checked here. The live cases (an unknown provisioner's path,
a Host with quotes) are in tests/e2e/test_acme_edge_security.py.
"""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import make_mocked_request

from appliance.acme.links import provisioner_path_segment, request_authority

ONE_SEGMENT = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})+")


@pytest.mark.parametrize("name", ["acme", "ACME-2", "a.b_c-d", "0"])
def test_a_name_of_the_config_charset_is_its_own_segment(name: str) -> None:
    assert provisioner_path_segment(name) == name


@pytest.mark.parametrize(("name", "segment"), [
    ("x\r\nSet-Cookie: a=b", "x%0D%0ASet-Cookie%3A%20a%3Db"),
    ('x">;rel="x', "x%22%3E%3Brel%3D%22x"),
    ("a/b", "a%2Fb"),
    ("50%", "50%25"),
    ("é", "%C3%A9"),
])
def test_anything_else_is_percent_encoded(name: str, segment: str) -> None:
    encoded = provisioner_path_segment(name)
    assert encoded == segment
    assert ONE_SEGMENT.fullmatch(encoded), f"{encoded!r} is not one plain path segment"


@pytest.mark.parametrize("host", ["localhost", "ca.example.test:8443", "127.0.0.1:443",
                                  "[::1]:9000", "CA.Example.Test."])
def test_a_host_name_and_port_build_urls(host: str) -> None:
    assert request_authority(make_mocked_request("GET", "/", headers={"Host": host})) == host


@pytest.mark.parametrize("host", ['localhost">;rel="x', "a b", "x<y>", "user@host",
                                  "host:port", "host:123456", "[::1"])
def test_a_host_that_is_no_host_builds_no_url(host: str) -> None:
    assert request_authority(make_mocked_request("GET", "/", headers={"Host": host})) is None
