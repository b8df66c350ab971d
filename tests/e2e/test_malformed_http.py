"""Requests aiohttp cannot parse get step-ca's JSON error shape, and it quotes nothing sent."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.e2e.e2e_support import CaServer

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("template", [
    "GET /health HTTP/1.1\r\nHost: localhost\r\nX-Probe: {marker}\x01\r\n\r\n",  # control byte
    "GET /health\x00{marker} HTTP/1.1\r\nHost: localhost\r\n\r\n",  # NUL in the URL
    "GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: {marker}\r\n\r\n",  # bad number
], ids=["control-byte-header", "nul-in-url", "bad-content-length"])
def test_unparseable_request_is_a_step_ca_json_400_that_quotes_nothing(
        ca: CaServer, template: str) -> None:
    marker = secrets.token_hex(8)
    answer = ca.raw_tls_request(template.format(marker=marker).encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    assert " 400 " in status_line, answer[:300]
    content_type = next((h.split(":", 1)[1].strip() for h in headers
                         if h.lower().startswith("content-type:")), "")
    assert content_type.startswith("application/json"), headers
    assert json.loads(body) == {"status": 400, "message": "the request is not valid HTTP"}
    assert marker.encode() not in answer, answer
