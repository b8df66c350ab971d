"""Hostile and malformed requests over real HTTPS: each is refused with a 4xx step-ca error body
that says what is wrong, and the CA keeps serving. Also: token replay across a restart, SIGHUP
with a broken ca.json, and concurrent issuance recorded in the database before it is returned."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from e2e_support import Api, CaServer, Response, Tokens, open_api

from appliance.authority.provisioners.jwk_tokens import TokenSigner
from appliance.client import make_csr

pytestmark = pytest.mark.e2e

SIGN = "/1.0/sign"
LEAKS = ("Traceback", "CKR_", "pkcs11", "File \"", "sqlalchemy", "sqlite3.")


# -- helpers --------------------------------------------------------------------------------------
def csr_pem(subject: str, sans: list[str] | None = None, key: Any = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, subject, sans if sans is not None else [subject])
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def flip_signature_byte(pem: str) -> str:
    """The same CSR with the last byte of its signature changed: a bad signature, valid DER."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    assert not x509.load_pem_x509_csr(tampered.encode()).is_signature_valid
    return tampered


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_parts(tokens: Tokens, subject: str, alg: str) -> tuple[str, dict[str, Any]]:
    """header.payload of a token with valid claims but header `alg`, and its claims."""
    claims = jwt.decode(tokens.mint(subject), options={"verify_signature": False})
    header = {"alg": alg, "kid": tokens.kid, "typ": "JWT"}
    return (f"{b64url(json.dumps(header).encode())}."
            f"{b64url(json.dumps(claims).encode())}"), claims


def none_token(tokens: Tokens, subject: str, alg: str = "none") -> str:
    signing_input, _ = unsigned_parts(tokens, subject, alg)
    return f"{signing_input}."


def hs256_token(tokens: Tokens, subject: str) -> str:
    """The classic key-confusion forgery: HMAC keyed with the provisioner's public key."""
    signing_input, _ = unsigned_parts(tokens, subject, "HS256")
    public_pem = tokens.signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_message(resp: Response, status: int) -> str:
    """Check the step-ca error shape and return its message."""
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.text[:500]}"
    assert resp.content_type == "application/json", f"error is {resp.content_type}: {resp.text}"
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"status", "message"}, body
    assert body["status"] == status, body
    assert isinstance(body["message"], str) and body["message"], body
    for leak in LEAKS:
        assert leak not in body["message"], f"error message leaks internals: {body['message']}"
    return str(body["message"])


async def assert_refused(api: Api, resp: Response, status: int, *fragments: str) -> str:
    message = error_message(resp, status)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (
            f"message {message!r} does not say {fragment!r}")
    health = await api.get("/health")
    assert (health.status, health.json()) == (200, {"status": "ok"}), (
        f"/health after a refused request: {health.status} {health.text}")
    return message


def issued_leaf(resp: Response) -> x509.Certificate:
    assert resp.status == 201, f"expected 201, got {resp.status}: {resp.text[:500]}"
    body = resp.json()
    assert set(body) >= {"crt", "ca", "certChain", "tlsOptions"}, body.keys()
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in body["certChain"]]
    assert body["crt"] == body["certChain"][0] and body["ca"] == body["certChain"][1]
    return chain[0]


# -- malformed requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RawCase:
    body: bytes
    status: int
    fragments: tuple[str, ...]


RAW_CASES = {
    "malformed_json": RawCase(b'{"csr": "abc", "ott": ', 400, ("not valid JSON",)),
    "not_utf8": RawCase(b'{"csr": "\xff\xfe"}', 400, ("not valid JSON",)),
    "json_array": RawCase(b'["csr", "ott"]', 400, ("JSON object",)),
    "json_string": RawCase(b'"csr"', 400, ("JSON object",)),
    "json_null": RawCase(b"null", 400, ("JSON object",)),
    "empty_body": RawCase(b"", 400, ("not valid JSON",)),
    # Under the size limit, but deeper than Python's json module can recurse.
    "deeply_nested_json": RawCase(b"[" * 60000, 400, ("JSON",)),
    "body_over_limit": RawCase(b'{"csr": "' + b"A" * 65537 + b'", "ott": "x"}', 413,
                               ("larger than 65536",)),
}


@pytest.mark.parametrize("case", RAW_CASES.values(), ids=RAW_CASES.keys())
async def test_malformed_body_is_refused(api: Api, case: RawCase) -> None:
    await assert_refused(api, await api.post_raw(SIGN, case.body), case.status, *case.fragments)


async def test_body_over_limit_without_content_length_is_refused(api: Api) -> None:
    """Chunked upload: the limit must hold when the size is not announced up front."""
    async def chunks() -> Any:
        for _ in range(20):
            yield b"A" * 4096

    resp = await api.request("POST", SIGN, data=chunks(),
                             headers={"Content-Type": "application/json"})
    await assert_refused(api, resp, 413, "larger than 65536")


BODY_CASES: dict[str, tuple[Callable[[Tokens], Any], int, tuple[str, ...]]] = {
    "missing_csr": (lambda t: {"ott": t.mint("a.example")}, 400, ("missing csr",)),
    "missing_ott": (lambda t: {"csr": csr_pem("a.example")}, 400, ("missing ott",)),
    "csr_not_a_string": (lambda t: {"csr": 42, "ott": t.mint("a.example")}, 400, ("csr",)),
    "csr_not_pem": (lambda t: {"csr": "MIIBnotpem", "ott": t.mint("a.example")}, 400,
                    ("PEM",)),
    "csr_pem_garbage": (lambda t: {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                          "-----END CERTIFICATE REQUEST-----\n",
                                   "ott": t.mint("a.example")}, 400, ("not a valid PEM",)),
    "csr_bad_signature": (lambda t: {"csr": flip_signature_byte(csr_pem("a.example")),
                                     "ott": t.mint("a.example")}, 400, ("signature",)),
    "csr_rsa_1024": (lambda t: {"csr": csr_pem("a.example", key=rsa.generate_private_key(
        65537, 1024)), "ott": t.mint("a.example")}, 400, ("1024", "weak")),
    "csr_over_16k": (lambda t: {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 20000
                                       + "\n-----END CERTIFICATE REQUEST-----\n",
                                "ott": t.mint("a.example")}, 400, ("larger than 16384",)),
    "ott_over_8k": (lambda t: {"csr": csr_pem("a.example"), "ott": "a" * 9000}, 400,
                    ("token", "larger")),
    "not_after_not_a_string": (lambda t: {"csr": csr_pem("a.example"), "ott": t.mint("a.example"),
                                          "notAfter": 3600}, 400, ("notAfter",)),
}


@pytest.mark.parametrize("case", BODY_CASES.values(), ids=BODY_CASES.keys())
async def test_bad_sign_body_is_refused(api: Api, tokens: Tokens, case: Any) -> None:
    make, status, fragments = case
    await assert_refused(api, await api.post_json(SIGN, make(tokens)), status, *fragments)


@pytest.mark.parametrize("curve", [ec.SECP192R1(), ec.SECP224R1(), ec.SECP256K1(),
                                   ec.BrainpoolP256R1(), ec.BrainpoolP384R1()],
                         ids=lambda c: c.name)
async def test_weak_or_unapproved_curve_is_refused(api: Api, tokens: Tokens,
                                                   curve: ec.EllipticCurve) -> None:
    body = {"csr": csr_pem("c.example", key=ec.generate_private_key(curve)),
            "ott": tokens.mint("c.example")}
    await assert_refused(api, await api.post_json(SIGN, body), 400, curve.name, "not allowed")


# -- tokens ---------------------------------------------------------------------------------------
def other_key_signer(tokens: Tokens, *, same_kid: bool, issuer: str = "admin") -> TokenSigner:
    other = ec.generate_private_key(ec.SECP256R1())
    signer = TokenSigner.for_key(other, issuer)
    return TokenSigner(other, tokens.kid, "ES256", issuer) if same_kid else signer


def now() -> float:
    return datetime.now(UTC).timestamp()


TOKEN_CASES: dict[str, tuple[Callable[[Tokens, str], str], int, tuple[str, ...]]] = {
    "expired": (lambda t, s: t.mint(s, now=now() - 3600), 401, ("expired",)),
    "not_yet_valid": (lambda t, s: t.mint(s, now=now() + 600), 401, ("not yet valid",)),
    "other_audience": (lambda t, s: t.mint(s, audience="https://other.example/1.0/sign"), 401,
                       ("audience",)),
    "revoke_audience": (lambda t, s: t.mint(s, audience=t.audience.replace("/sign", "/revoke")),
                        401, ("audience",)),
    "unknown_kid": (lambda t, s: other_key_signer(t, same_kid=False).mint(
        s, t.audience, sans=[s], root_fingerprint=t.fingerprint), 401, ("provisioner",)),
    "unknown_iss": (lambda t, s: TokenSigner(t.signer.key, t.kid, "ES256", "intruder").mint(
        s, t.audience, sans=[s], root_fingerprint=t.fingerprint), 401, ("provisioner",)),
    "forged_signature": (lambda t, s: other_key_signer(t, same_kid=True).mint(
        s, t.audience, sans=[s], root_fingerprint=t.fingerprint), 401, ("signature",)),
    "wrong_root_fingerprint": (lambda t, s: t.signer.mint(
        s, t.audience, sans=[s], root_fingerprint="00" * 32), 401, ("sha",)),
    "lifetime_over_an_hour": (lambda t, s: t.mint(s, lifetime=7200), 401, ("lifetime",)),
    "alg_none": (lambda t, s: none_token(t, s), 401, ("'none'", "not allowed")),
    "alg_None_mixed_case": (lambda t, s: none_token(t, s, "nOnE"), 401, ("not allowed",)),
    "alg_hs256_public_key_as_secret": (lambda t, s: hs256_token(t, s), 401,
                                       ("HS256", "not allowed")),
    "not_a_jwt": (lambda t, s: "not.a.jwt", 401, ("malformed",)),
    "subject_over_64": (lambda t, s: t.mint("a" * 65, [s]), 400, ("subject", "64")),
}


@pytest.mark.parametrize("case", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
async def test_bad_token_is_refused(api: Api, tokens: Tokens, case: Any) -> None:
    make, status, fragments = case
    body = {"csr": csr_pem("t.example"), "ott": make(tokens, "t.example")}
    await assert_refused(api, await api.post_json(SIGN, body), status, *fragments)


async def test_replayed_token_is_refused(api: Api, tokens: Tokens) -> None:
    token = tokens.mint("replay.example")
    issued_leaf(await api.post_json(SIGN, {"csr": csr_pem("replay.example"), "ott": token}))
    # Again on the other mount point (and, with two workers, perhaps on the other worker).
    again = await api.post_json("/sign", {"csr": csr_pem("replay.example"), "ott": token})
    await assert_refused(api, again, 401, "already used")


# -- the CSR against the token, and durations -----------------------------------------------------
SIGN_CASES: dict[str, tuple[Callable[[Tokens], dict[str, Any]], int, tuple[str, ...]]] = {
    "csr_san_not_in_token": (lambda t: {
        "csr": csr_pem("n.example", ["n.example", "evil.example"]),
        "ott": t.mint("n.example", ["n.example"])}, 403, ("evil.example", "not among")),
    "csr_ip_not_in_token": (lambda t: {
        "csr": csr_pem("n.example", ["n.example", "10.0.0.66"]),
        "ott": t.mint("n.example", ["n.example"])}, 403, ("10.0.0.66",)),
    "csr_cn_not_token_subject": (lambda t: {
        "csr": csr_pem("evil.example", ["n.example"]),
        "ott": t.mint("n.example", ["n.example"])}, 403, ("evil.example", "subject")),
    "not_after_beyond_max": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"), "notAfter": "48h"}, 403,
        ("maximum", "24h")),
    "duration_under_min": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"), "notAfter": "1m"}, 403,
        ("minimum", "5m")),
    "not_after_before_not_before": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"),
        "notBefore": iso(datetime.now(UTC) + timedelta(hours=2)),
        "notAfter": iso(datetime.now(UTC) + timedelta(hours=1))}, 400, ("notAfter", "after")),
    "not_after_garbage": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"), "notAfter": "next tuesday"},
        400, ("notAfter", "next tuesday")),
    "not_before_garbage": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"), "notBefore": "2025-13-45"},
        400, ("notBefore",)),
    "not_after_without_zone": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"),
        "notAfter": (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S")},
        400, ("time zone",)),
    "not_before_two_days_ago": (lambda t: {
        "csr": csr_pem("d.example"), "ott": t.mint("d.example"),
        "notBefore": iso(datetime.now(UTC) - timedelta(days=2)), "notAfter": "1h"}, 400,
        ("notBefore", "past")),
}


@pytest.mark.parametrize("case", SIGN_CASES.values(), ids=SIGN_CASES.keys())
async def test_request_outside_the_token_or_claims_is_refused(api: Api, tokens: Tokens,
                                                              case: Any) -> None:
    make, status, fragments = case
    await assert_refused(api, await api.post_json(SIGN, make(tokens)), status, *fragments)


OUT_OF_RANGE = {
    "not_after_100M_hours": {"notAfter": "100000000h"},
    "not_after_400_digit_hours": {"notAfter": "9" * 400 + "h"},
    "not_after_minus_100M_hours": {"notAfter": "-100000000h"},
    "not_before_100M_hours": {"notBefore": "100000000h"},
    "not_before_year_9999": {"notBefore": "9999-12-31T23:00:00Z"},
}


@pytest.mark.parametrize("times", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
async def test_out_of_range_times_are_refused_not_a_server_error(api: Api, tokens: Tokens,
                                                                 times: dict[str, str]) -> None:
    """Times whose arithmetic overflows a datetime are the requester's fault: 4xx, not 500."""
    body = {"csr": csr_pem("r.example"), "ott": tokens.mint("r.example"), **times}
    resp = await api.post_json(SIGN, body)
    assert 400 <= resp.status < 500, f"{times} got {resp.status}: {resp.text}"
    await assert_refused(api, resp, resp.status)


async def test_a_good_request_still_works(api: Api, tokens: Tokens) -> None:
    """The control for the cases above: the same shapes, within bounds, are issued."""
    body = {"csr": csr_pem("ok.example", ["ok.example", "10.0.0.5"]),
            "ott": tokens.mint("ok.example", ["ok.example", "10.0.0.5"]), "notAfter": "2h"}
    leaf = issued_leaf(await api.post_json(SIGN, body))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=2) <= lifetime <= timedelta(hours=2, minutes=1)


# -- routes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "status", "fragment"), [
    ("GET", "/nope", 404, "no such endpoint"),
    ("GET", "/1.0/nope", 404, "no such endpoint"),
    ("GET", "/root/" + "0" * 64, 404, "not found"),
    ("GET", "/provisioners/no-such-kid/encrypted-key", 404, "not found"),
    ("GET", "/provisioners?limit=0", 400, "limit"),
    ("GET", "/provisioners?limit=ten", 400, "limit"),
    ("GET", SIGN, 405, "not allowed"),
    ("DELETE", "/roots", 405, "not allowed"),
    ("PUT", "/health", 405, "not allowed"),
])
async def test_bad_route_or_method_gets_json(api: Api, method: str, path: str, status: int,
                                             fragment: str) -> None:
    await assert_refused(api, await api.request(method, path), status, fragment)


# -- replay across a restart ----------------------------------------------------------------------
async def test_token_replay_after_restart_is_refused(ca: CaServer, tokens: Tokens) -> None:
    token = tokens.mint("restart.example")
    async with open_api(ca) as api:
        issued_leaf(await api.post_json(SIGN, {"csr": csr_pem("restart.example"), "ott": token}))
    await asyncio.get_running_loop().run_in_executor(None, ca.restart)
    async with open_api(ca) as api:
        again = await api.post_json(SIGN, {"csr": csr_pem("restart.example"), "ott": token})
        await assert_refused(api, again, 401, "already used")
        # A fresh token still works after the restart.
        issued_leaf(await api.post_json(SIGN, {"csr": csr_pem("restart.example"),
                                               "ott": tokens.mint("restart.example")}))


# -- SIGHUP ---------------------------------------------------------------------------------------
async def hup_and_wait(ca: CaServer, event: str, count: int = 1) -> list[dict[str, Any]]:
    since = ca.log_size()
    ca.signal(signal.SIGHUP)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        found = [e for e in ca.events(since) if e.get("event") == event]
        if len(found) >= count:
            return found
        assert loop.time() < deadline, f"no {event!r} after SIGHUP; log:\n{ca.log_tail()}"
        await asyncio.sleep(0.05)


def break_json(text: str) -> str:
    return text[: len(text) // 2]


def break_schema(text: str) -> str:
    config = json.loads(text)
    config["authority"]["provisioners"] = "everyone"
    return json.dumps(config)


def unknown_field(text: str) -> str:
    config = json.loads(text)
    config["adress"] = config["address"]
    return json.dumps(config)


def bad_claims(text: str) -> str:
    config = json.loads(text)
    config["authority"]["claims"] = {"minTLSCertDuration": "2h", "maxTLSCertDuration": "1h"}
    return json.dumps(config)


@pytest.mark.parametrize("spoil", [break_json, break_schema, unknown_field, bad_claims],
                         ids=lambda f: f.__name__)
async def test_sighup_with_invalid_config_keeps_serving(api: Api, ca: CaServer, tokens: Tokens,
                                                        spoil: Callable[[str], str]) -> None:
    original = ca.config_path.read_bytes()
    try:
        ca.config_path.write_text(spoil(original.decode()))
        (refused,) = await hup_and_wait(ca, "reload_refused")
        assert refused.get("reason"), f"reload_refused does not say why: {refused}"
        assert ca.process is not None and ca.process.poll() is None, "the server died on SIGHUP"
        issued_leaf(await api.post_json(SIGN, {"csr": csr_pem("hup.example"),
                                               "ott": tokens.mint("hup.example")}))
    finally:
        ca.config_path.write_bytes(original)
    await hup_and_wait(ca, "config_reloaded", count=2)  # both workers take the restored file
    issued_leaf(await api.post_json(SIGN, {"csr": csr_pem("hup.example"),
                                           "ott": tokens.mint("hup.example")}))


async def test_sighup_with_valid_config_takes_effect(api: Api, ca: CaServer,
                                                     tokens: Tokens) -> None:
    original = ca.config_path.read_bytes()
    config = json.loads(original)
    config["authority"]["claims"] = {"maxTLSCertDuration": "1h", "defaultTLSCertDuration": "1h"}
    body = lambda: {"csr": csr_pem("claims.example"),  # noqa: E731
                    "ott": tokens.mint("claims.example"), "notAfter": "2h"}
    try:
        ca.config_path.write_text(json.dumps(config))
        await hup_and_wait(ca, "config_reloaded", count=2)
        for _ in range(4):  # whichever worker answers
            await assert_refused(api, await api.post_json(SIGN, body()), 403, "maximum", "1h")
    finally:
        ca.config_path.write_bytes(original)
    await hup_and_wait(ca, "config_reloaded", count=2)
    issued_leaf(await api.post_json(SIGN, body()))


# -- concurrency ----------------------------------------------------------------------------------
async def test_concurrent_signs_are_all_recorded(api: Api, ca: CaServer, tokens: Tokens) -> None:
    n = 50
    bodies = [{"csr": csr_pem(f"c{i}.example"), "ott": tokens.mint(f"c{i}.example")}
              for i in range(n)]
    responses = await asyncio.gather(*(api.post_json(SIGN, b) for b in bodies))
    leaves = [issued_leaf(r) for r in responses]
    assert [str(leaf.subject.rfc4514_string()) for leaf in leaves] == [
        f"CN=c{i}.example" for i in range(n)]
    serials = [format(leaf.serial_number, "x") for leaf in leaves]
    assert len(set(serials)) == n, "serials repeat"

    with contextlib.closing(sqlite3.connect(f"file:{ca.db_path}?mode=ro", uri=True)) as db:
        rows = {serial: (status, der) for serial, status, der in db.execute(
            f"SELECT serial, status, der FROM certificates WHERE serial IN "  # noqa: S608
            f"({','.join('?' * n)})", serials)}
    missing = [s for s in serials if s not in rows]
    assert not missing, f"{len(missing)} returned certificates are not in the database: {missing}"
    for leaf, serial in zip(leaves, serials, strict=True):
        status, der = rows[serial]
        assert status == "issued", f"{serial} has status {status}"
        assert der is not None and der == leaf.public_bytes(serialization.Encoding.DER), (
            f"the database holds other bytes for {serial}")


async def test_one_token_raced_concurrently_issues_once(api: Api, tokens: Tokens) -> None:
    """The same token sent 10 times at once (over both workers): one certificate, 9 refusals."""
    token = tokens.mint("race.example")
    responses = await asyncio.gather(*(
        api.post_json(SIGN, {"csr": csr_pem("race.example"), "ott": token}) for _ in range(10)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [401] * 9, statuses
    for r in responses:
        if r.status == 401:
            assert "already used" in error_message(r, 401)
