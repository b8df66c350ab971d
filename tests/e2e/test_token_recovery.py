"""The issuer token goes away under load and comes back: 503 + Retry-After while it is away,
/health says "token unavailable", then issuance resumes without a restart and every 201 is
recorded; in quorum mode a token that stays away seals the CA (docs/operations.md, "When the
token goes away")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from e2e_support import (
    APPLIANCTL,
    CaServer,
    Tokens,
    clean_env,
    free_port,
    server_errors,
    write_secret,
)

from appliance.client import make_csr

pytestmark = pytest.mark.e2e

LOAD_SECONDS_MAX = 60.0  # the load stops when the test is done, or after this at the latest
LOAD_REQUESTS_MAX = 4000
AWAY_SECONDS = 4.0  # how long the token stays away once the CA has noticed
RESUME_WITHIN = 12.0  # backoff capped at 5 s, plus a signature's round trip


@dataclass
class Outcome:
    at: float
    status: int
    retry_after: str | None
    body: str
    crt: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.at >= t]


def token_dir(ca_home: Path) -> Path:
    conf = ca_home / "hsm" / "softhsm2.conf"
    match = re.search(r"^directories\.tokendir\s*=\s*(.+)$", conf.read_text(), re.M)
    assert match, f"no tokendir in {conf}"
    return Path(match.group(1).strip())


async def sign_loop(ca: CaServer, tokens: Tokens, session: aiohttp.ClientSession,
                    load: Load, name: str) -> None:
    deadline = time.monotonic() + LOAD_SECONDS_MAX
    key = ec.generate_private_key(ec.SECP256R1())
    i = 0
    while not load.stop.is_set() and time.monotonic() < deadline and \
            len(load.outcomes) < LOAD_REQUESTS_MAX:
        i += 1
        subject = f"{name}-{i}.recovery.test"
        csr = make_csr(key, subject, [subject]).public_bytes(serialization.Encoding.PEM).decode()
        async with session.post(f"{ca.url}/1.0/sign",
                                json={"csr": csr, "ott": tokens.mint(subject)}) as resp:
            text = await resp.text()
            outcome = Outcome(time.monotonic(), resp.status, resp.headers.get("Retry-After"),
                              text)
            if resp.status == 201:
                outcome.crt = json.loads(text)["crt"]
            load.outcomes.append(outcome)
        if outcome.status != 201:
            await asyncio.sleep(0.05)  # a light load, also while refused


async def health(ca: CaServer, session: aiohttp.ClientSession) -> tuple[int, dict[str, object],
                                                                         str | None]:
    async with session.get(f"{ca.url}/health") as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def wait_for(what: str, check, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s", pytrace=False)
        await asyncio.sleep(0.1)


def audit_events(ca: CaServer) -> list[dict[str, object]]:
    path = ca.ca_home / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_token_away_and_back_under_load(ca: CaServer, tokens: Tokens) -> None:
    assert ca.process is not None
    supervisor_pid = ca.process.pid
    log_start = ca.log_size()
    audit_start = len(audit_events(ca))
    tokens_path = token_dir(ca.ca_home)
    away_path = tokens_path.with_name(tokens_path.name + ".away")
    # A fresh connection per request, so the supervisor hands each one to a worker of its
    # choice (keep-alive would pin a client to one worker).
    connector = aiohttp.TCPConnector(ssl=ca.ssl_context(), force_close=True, limit=4)
    load = Load()
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        loops = [asyncio.create_task(sign_loop(ca, tokens, session, load, f"c{n}"))
                 for n in range(2)]
        moved = False
        try:
            await wait_for("the first issuance", lambda: _issued_since(load, 0.0), 30)
            # The token goes away (a device unplugged: its directory disappears).
            tokens_path.rename(away_path)
            moved = True
            away_at = time.monotonic()

            async def refused() -> bool:
                return any(o.status == 503 for o in load.since(away_at))
            await wait_for("a 503 on /1.0/sign", refused, 15)

            async def health_down() -> tuple[int, dict[str, object], str | None] | None:
                answer = await health(ca, session)
                return answer if answer[0] == 503 else None
            status, body, health_retry = await wait_for(
                "/health answering 503", health_down, 15)
            assert body["status"] == "token unavailable", body
            assert "worker" in body and body.get("node") and body.get("reason"), body
            assert "CKR_" not in json.dumps(body), f"a PKCS#11 code in /health: {body}"
            assert health_retry is not None and int(health_retry) > 0, body
            await asyncio.sleep(AWAY_SECONDS)
            # Back again.
            away_path.rename(tokens_path)
            moved = False
            back_at = time.monotonic()
            await wait_for("issuance after the token came back",
                           lambda: _issued_since(load, back_at), RESUME_WITHIN)

            async def health_up() -> bool:
                return (await health(ca, session))[0] == 200
            await wait_for("/health answering 200 again", health_up, RESUME_WITHIN)
            resumed_at = time.monotonic()
            await wait_for("five issuances in a row after recovery",
                           lambda: _run_of_201s(load, resumed_at, 5), 15)
        finally:
            load.stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            if moved:
                with contextlib.suppress(OSError):
                    away_path.rename(tokens_path)
    for task in loops:
        assert task.exception() is None, f"a load loop failed: {task.exception()!r}"

    away = [o for o in load.since(away_at) if o.at < back_at]
    refusals = [o for o in load.outcomes if o.status != 201]
    assert refusals, "no request was refused while the token was away"
    assert {o.status for o in refusals} == {503}, (
        f"refused with other than 503: {[(o.status, o.body[:200]) for o in refusals][:5]}")
    without_header = [o for o in refusals if not (o.retry_after or "").isdigit()]
    assert not without_header, f"503 without Retry-After: {without_header[0].body[:300]}"
    assert all("CKR_" not in o.body for o in refusals), "a PKCS#11 code in a response"
    assert any(o.status == 503 for o in away), "no 503 while the token was away"

    # No restart: the same supervisor, no worker died or was replaced.
    assert ca.process is not None and ca.process.poll() is None, "the server exited"
    assert int(ca.pidfile.read_text()) == supervisor_pid
    events = ca.events(log_start)
    died = [e for e in events if e.get("event") in ("worker_died", "worker_start_failed")]
    assert not died, f"a worker was restarted: {died}"
    names = {e.get("event") for e in events}
    assert {"token_unavailable", "token_available"} <= names, sorted(n for n in names if n)
    assert not [e for e in server_errors(ca, log_start) if int(e.get("status", 0)) != 503]

    # Every certificate a client received is recorded, with its DER.
    issued = [x509.load_pem_x509_certificate(o.crt.encode()) for o in load.outcomes if o.crt]
    with contextlib.closing(sqlite3.connect(ca.db_path)) as db:
        for cert in issued:
            row = db.execute("SELECT status, der FROM certificates WHERE serial = ?",
                             (format(cert.serial_number, "x"),)).fetchone()
            assert row is not None, f"serial {cert.serial_number:x} was returned, not recorded"
            assert row[0] == "issued" and bytes(row[1]) == cert.public_bytes(
                serialization.Encoding.DER), f"serial {cert.serial_number:x}: {row[0]}"

    # The audit log marks the loss and the recovery.
    audit = audit_events(ca)[audit_start:]
    kinds = [a.get("event") for a in audit]
    assert "token.lost" in kinds and "token.restored" in kinds, kinds[-20:]
    assert kinds.index("token.lost") < kinds.index("token.restored")
    result = ca.run_cli("audit", "verify", home=ca.ca_home, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def _issued_since(load: Load, t: float) -> bool:
    return any(o.status == 201 for o in load.since(t))


async def _run_of_201s(load: Load, t: float, count: int) -> bool:
    recent = load.since(t)
    return len(recent) >= count and all(o.status == 201 for o in recent[-count:])


def _health(home: Path, port: int) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(home / "certs" / "root_ca.crt"))
    try:
        with urllib.request.urlopen(f"https://localhost:{port}/health", context=context,
                                    timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_health(home: Path, port: int, status: str, timeout: float, log: Path
                 ) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            code, body = _health(home, port)
            if body.get("status") == status:
                return body
            last = (code, body)
        except OSError as e:
            last = e
        time.sleep(0.2)
    pytest.fail(f"/health never said {status!r} within {timeout:.0f} s; last: {last}\n"
                f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)


def test_quorum_ca_seals_when_the_token_stays_away(tmp_path: Path) -> None:
    home, port = tmp_path / "ca", free_port()
    shares = tmp_path / "shares"
    root_pin = write_secret(tmp_path / "root-pin", "root-pin-for-token-loss")
    password = write_secret(tmp_path / "prov-pass", "provisioner-password")

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([APPLIANCTL, *map(str, args)], env=clean_env(home),
                                capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL, check=False)
        assert result.returncode == 0, f"applianctl {args[0]}: {result.stderr}"
        return result

    cli("init", "--name", "Token Loss", "--address", f"127.0.0.1:{port}", "--password-file",
        root_pin, "--provisioner-password-file", password, "--quorum", "2/3",
        "--share-dir", shares)
    config_path = home / "config" / "ca.json"
    config = json.loads(config_path.read_text())
    config["unlock"]["tokenLossSealAfter"] = "2s"
    config_path.write_text(json.dumps(config))
    log = tmp_path / "serve.log"
    tokens_path = token_dir(home)
    away_path = tokens_path.with_name(tokens_path.name + ".away")
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [APPLIANCTL, "serve", str(config_path), "--workers", "1"], env=clean_env(home),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True)
    try:
        _wait_health(home, port, "sealed", 60, log)
        for i in (1, 2):
            cli("unlock", "--share-file", shares / f"share-{i}-of-3.txt")
        _wait_health(home, port, "ok", 60, log)
        tokens_path.rename(away_path)
        # A signature finds the token gone (the sign request itself is refused: no token).
        subprocess.run([APPLIANCTL, "certificate", "loss.test", str(tmp_path / "l.crt"),
                        str(tmp_path / "l.key"), "--password-file", str(password), "--force",
                        "--ca-url", f"https://localhost:{port}",
                        "--root", str(home / "certs" / "root_ca.crt")],
                       env=clean_env(tmp_path / "client"), capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL, check=False)
        _wait_health(home, port, "token unavailable", 15, log)
        body = _wait_health(home, port, "sealed", 30, log)
        assert body["progress"] == "0/2", body
        away_path.rename(tokens_path)
        audit = [json.loads(line) for line in
                 (home / "audit" / "audit.jsonl").read_text().splitlines()]
        seals = [a for a in audit if a.get("event") == "seal"]
        assert seals and "token was unavailable" in json.dumps(seals[-1]), seals
        assert process.poll() is None, "the server exited instead of sealing"
    finally:
        if away_path.exists():
            away_path.rename(tokens_path)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(10)
    assert code == 0, log.read_text(errors="replace")[-3000:]
