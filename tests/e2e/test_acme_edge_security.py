"""What a requester writes into an ACME URL or a nonce, against a real `applianctl serve`.

The provisioner segment of the path is the requester's text: it must never reach a header (the
Link rel="index" was once built from it, so CR/LF dropped the connection with a traceback and a
quote injected a Link parameter), and an unknown provisioner gets a problem document with a
fresh nonce and no index. The Host is the requester's text too: one that is no host name gets a
problem, not URLs built on it. A nonce has one spelling: its 54 base64url characters end in one
that carries 4 unused bits, and another value of those bits must not make a second nonce.

Requests go through http.client over TLS, so that the path is sent exactly as written and one
keep-alive connection shows whether the server dropped it.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from acme_support import ACME_PROVISIONER, AcmeCa, running_acme_ca
from cryptography.hazmat.primitives.asymmetric import ec
from e2e_support import server_errors

from appliance.acme import jws

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"
URN = "urn:ietf:params:acme:error:"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
CRLF_PATH = "/acme/x%0d%0aSet-Cookie:%20a=b/directory"
QUOTE_PATH = "/acme/x%22%3E;rel=%22x/directory"


@pytest.fixture(scope="module")
def acme_ca() -> Iterator[AcmeCa]:
    with running_acme_ca("e2e-acme-edge") as ca:
        yield ca


@dataclass(repr=False)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header_list(self, name: str) -> list[str]:
        return self.headers.get_all(name) or []

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"HTTP {self.status} {dict(self.headers)}: {self.body[:500]!r}"


class Connection:
    """One keep-alive HTTPS connection to the CA, trusting only its root."""

    def __init__(self, ca: AcmeCa) -> None:
        self.ca = ca
        self.conn = http.client.HTTPSConnection("localhost", ca.port, timeout=30,
                                                context=ca.ssl_context())

    def send(self, method: str, path: str, body: bytes | None = None,
             host: str | None = None) -> Answer:
        headers = {"Content-Type": "application/jose+json"} if body is not None else {}
        if host is not None:
            headers["Host"] = host
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            return Answer(response.status, response.headers, response.read())
        except (http.client.HTTPException, OSError) as e:
            pytest.fail(f"{method} {path}: the server dropped the connection ({e!r}); "
                        f"log:\n{self.ca.log_tail()}", pytrace=False)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def conn(acme_ca: AcmeCa) -> Iterator[Connection]:
    connection = Connection(acme_ca)
    yield connection
    connection.close()


def index_link(ca: AcmeCa, prefix: str = "") -> str:
    return f'<{ca.url}{prefix}/acme/{ACME_PROVISIONER}/directory>;rel="index"'


def assert_unknown_provisioner(answer: Answer) -> None:
    """404 malformed problem document, a fresh nonce, and no index: there is no directory."""
    assert answer.status == 404, answer
    assert answer.headers.get_content_type() == PROBLEM, answer
    assert answer.json()["type"] == f"{URN}malformed", answer
    assert answer.headers.get("Replay-Nonce"), f"no Replay-Nonce: {answer}"
    assert answer.header_list("Link") == [], f"a Link for an unknown provisioner: {answer}"


def log_since(ca: AcmeCa, offset: int) -> str:
    with open(ca.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# -- the provisioner segment ----------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "/2.0"])
def test_crlf_in_the_provisioner_is_a_clean_404(acme_ca: AcmeCa, conn: Connection,
                                                prefix: str) -> None:
    since = acme_ca.log_size()
    answer = conn.send("GET", f"{prefix}{CRLF_PATH}")
    assert_unknown_provisioner(answer)
    assert not answer.header_list("Set-Cookie"), f"the path set a header: {answer}"
    # The same connection still serves: the answer was written whole, not dropped.
    after = conn.send("GET", f"{prefix}/acme/{ACME_PROVISIONER}/directory")
    assert after.status == 200, after
    assert index_link(acme_ca, prefix) in after.header_list("Link"), after
    log = log_since(acme_ca, since)
    assert "Traceback" not in log, f"the CA logged a traceback:\n{log}"
    assert not server_errors(acme_ca, since), server_errors(acme_ca, since)


def test_a_quote_in_the_provisioner_injects_no_link(acme_ca: AcmeCa, conn: Connection) -> None:
    answer = conn.send("GET", QUOTE_PATH)
    assert_unknown_provisioner(answer)
    assert not any('rel="x' in v or '">' in v for v in answer.headers.values()), answer


@pytest.mark.parametrize("path", ["/acme/nobody/new-nonce", "/acme/x%0d%0ay/new-nonce"])
def test_an_unknown_provisioners_new_nonce_is_a_problem_with_a_nonce(
        conn: Connection, path: str) -> None:
    assert_unknown_provisioner(conn.send("GET", path))  # GET: HEAD has no body to read


@pytest.mark.parametrize("prefix", ["", "/2.0"])
def test_a_known_provisioners_urls_name_it(acme_ca: AcmeCa, conn: Connection,
                                           prefix: str) -> None:
    answer = conn.send("GET", f"{prefix}/acme/{ACME_PROVISIONER}/directory")
    assert answer.status == 200, answer
    assert answer.header_list("Link") == [index_link(acme_ca, prefix)], answer
    base = f"{acme_ca.url}{prefix}/acme/{ACME_PROVISIONER}/"
    directory = answer.json()
    urls = [v for k, v in directory.items() if k != "meta"]
    assert urls and all(u.startswith(base) for u in urls), directory


@pytest.mark.parametrize("host", ['localhost">;rel="x', "x<y>"])
def test_a_host_header_that_is_no_host_reaches_no_url(conn: Connection, host: str) -> None:
    """The Host is the requester's text too: a 400 problem, not URLs built on it."""
    answer = conn.send("GET", f"/acme/{ACME_PROVISIONER}/directory", host=host)
    assert answer.status == 400, answer
    assert answer.headers.get_content_type() == PROBLEM, answer
    assert answer.json()["type"] == f"{URN}malformed", answer
    assert answer.headers.get("Replay-Nonce"), answer
    assert answer.header_list("Link") == [], answer
    assert host not in answer.body.decode(), answer


# -- nonces ---------------------------------------------------------------------------------------
def other_spelling(nonce: str) -> str:
    """The nonce with other unused bits in its last character: different text, same bytes."""
    assert len(nonce) % 4 == 2, f"{nonce!r}: expected a last character with 4 unused bits"
    index = B64URL.index(nonce[-1])
    other = nonce[:-1] + B64URL[index ^ 0b1111]
    lenient = base64.urlsafe_b64decode
    assert other != nonce
    assert lenient(other + "==") == lenient(nonce + "=="), "the spellings differ in bytes"
    return other


def new_account(conn: Connection, nonce: str) -> Answer:
    url = f"{conn.ca.url}/acme/{ACME_PROVISIONER}/new-account"
    message = jws.sign(ec.generate_private_key(ec.SECP256R1()),
                       {"termsOfServiceAgreed": True}, url=url, nonce=nonce, kid=None)
    return conn.send("POST", f"/acme/{ACME_PROVISIONER}/new-account",
                     json.dumps(message).encode())


def assert_bad_nonce(answer: Answer) -> None:
    assert answer.status == 400, answer
    assert answer.headers.get_content_type() == PROBLEM, answer
    assert answer.json()["type"] in (f"{URN}badNonce", f"{URN}malformed"), answer
    assert answer.headers.get("Replay-Nonce"), answer


def test_a_nonce_has_one_spelling(conn: Connection) -> None:
    fresh = conn.send("HEAD", f"/acme/{ACME_PROVISIONER}/new-nonce")
    assert fresh.status == 200, fresh
    nonce = fresh.headers["Replay-Nonce"]
    assert_bad_nonce(new_account(conn, other_spelling(nonce)))
    # Refusing the other spelling did not use the nonce: its own spelling works, once.
    assert new_account(conn, nonce).status == 201
    assert_bad_nonce(new_account(conn, nonce))
    assert_bad_nonce(new_account(conn, other_spelling(nonce)))
