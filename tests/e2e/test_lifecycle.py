"""The life of an issued certificate, against a real server and token: renew (mTLS while valid,
an x5c token once expired, the renewal daemon), rekey, revoke, the CRL and the plain-HTTP
listener that publishes it.

This module's CA gets an `insecureAddress` and three extra provisioners before its first
certificate (a restart applies them), so every certificate here points at the plain-HTTP CRL:
- short:   5 s minimum, 15 s default lifetime, renewal after expiry allowed;
- strict:  the same lifetimes, renewal after expiry not allowed;
- norenew: renewal disabled.
The CA backdates notBefore by a minute, so a certificate asked for 5 s lives 65 s on paper and
expires 5 s after it was issued.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from e2e_support import (
    APPLIANCTL,
    PROVISIONER,
    Api,
    CaServer,
    Response,
    Tokens,
    clean_env,
    free_port,
    load_chain,
    one_error_line,
    provisioner_tokens,
    server_errors,
    sha256_hex,
)

from appliance.client import make_csr

pytestmark = pytest.mark.e2e

PROVISIONERS = {
    "short": ["--x509-min-dur", "5s", "--x509-default-dur", "15s",
              "--allow-renewal-after-expiry"],
    "strict": ["--x509-min-dur", "5s", "--x509-default-dur", "15s"],
    "norenew": ["--disable-renewal"],
}
BACKDATE = timedelta(minutes=1)
REFUSED = "error: the CA refused: "


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(ca: CaServer) -> CaServer:
    """The CA with an insecure listener and the extra provisioners, and a bootstrapped client."""
    config = json.loads(ca.config_path.read_text())
    config["insecureAddress"] = f"127.0.0.1:{free_port()}"
    ca.config_path.write_text(json.dumps(config, indent=2))
    for name, flags in PROVISIONERS.items():
        ca.run_cli("provisioner", "add", name, "--create",
                   "--password-file", ca.provisioner_password_file, *flags, home=ca.ca_home)
    ca.restart()
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint)
    return ca


@pytest.fixture(scope="module")
def http_url(client: CaServer) -> str:
    return f"http://{json.loads(client.config_path.read_text())['insecureAddress']}"


def issue(ca: CaServer, name: str, *, sans: list[str] | None = None,
          not_after: str | None = None, provisioner: str = PROVISIONER) -> tuple[Path, Path]:
    """A certificate for NAME over the API, written as `applianctl certificate` writes it
    (work/NAME.crt: leaf + intermediate, 0644; work/NAME.key: PKCS#8, 0600). Quicker than the
    CLI, which test_cli_flow.py covers; the commands under test here get these files."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = sans or [name]
    body: dict[str, Any] = {
        "csr": make_csr(key, name, names).public_bytes(serialization.Encoding.PEM).decode(),
        "ott": tokens_for(ca, provisioner).mint(name, names)}
    if not_after:
        body["notAfter"] = not_after
    request = urllib.request.Request(f"{ca.url}/1.0/sign", json.dumps(body).encode(),  # noqa: S310
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=ca.ssl_context(), timeout=30) as resp:  # noqa: S310
        chain = json.loads(resp.read())["certChain"]
    crt, key_file = ca.work / f"{name}.crt", ca.work / f"{name}.key"
    crt.write_text("".join(chain))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return crt, key_file


_TOKENS: dict[tuple[Path, str], Tokens] = {}


def tokens_for(ca: CaServer, provisioner: str) -> Tokens:
    if (ca.base, provisioner) not in _TOKENS:
        _TOKENS[ca.base, provisioner] = provisioner_tokens(ca, provisioner)
    return _TOKENS[ca.base, provisioner]


def issue_cli(ca: CaServer, name: str, *extra: str, provisioner: str = PROVISIONER
              ) -> tuple[Path, Path]:
    """`applianctl certificate NAME` into work/NAME.crt and work/NAME.key. The provisioner is
    always named: with several, the CLI's default is not ca.json's first (test_provisioners)."""
    crt, key = ca.work / f"{name}.crt", ca.work / f"{name}.key"
    ca.run_cli("certificate", name, crt, key, "--password-file", ca.provisioner_password_file,
               "--provisioner", provisioner, *extra)
    return crt, key


def leaf_of(crt: Path) -> x509.Certificate:
    return load_chain(crt)[0]


def lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def spki(key_or_cert: Any) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def same_identity(new: x509.Certificate, old: x509.Certificate) -> None:
    assert new.subject == old.subject
    assert sans(new) == sans(old)
    assert new.serial_number != old.serial_number, "a renewed certificate reuses the serial"
    for ext in (x509.ExtendedKeyUsage, x509.BasicConstraints, x509.CRLDistributionPoints):
        assert (new.extensions.get_extension_for_class(ext).value
                == old.extensions.get_extension_for_class(ext).value), ext.__name__


def file_state(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_ino, st.st_mtime_ns


def no_temp_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


async def get_raw(ca: CaServer, url: str, ssl: Any = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.get(url, ssl=ca.ssl_context() if ssl is None else ssl) as resp:
        return resp.status, resp.content_type, await resp.read()


async def get_crl(ca: CaServer, path: str = "/1.0/crl") -> x509.CertificateRevocationList:
    status, content_type, body = await get_raw(ca, f"{ca.url}{path}")
    assert (status, content_type) == (200, "application/pkix-crl"), (status, content_type, body)
    return x509.load_der_x509_crl(body)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def reason_of(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None, f"serial {serial:x} is not on the CRL"
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


async def mtls_post(ca: CaServer, path: str, crt: Path, key: Path, body: Any = None
                    ) -> Response:
    """POST over HTTPS presenting CRT/KEY as the client certificate."""
    ctx = ca.ssl_context()
    ctx.load_cert_chain(str(crt), str(key))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.post(f"{ca.url}{path}", json={} if body is None else body,
                         ssl=ctx) as resp:
        return Response(resp.status, resp.content_type, await resp.text())


def x5c_token(cert: x509.Certificate, key: Any, audience: str, *, lifetime: int = 300) -> str:
    """A renewal token as the API describes it: signed by the certificate's own key, the
    certificate (DER, base64) in the x5c header. Written here, not borrowed from the product."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    else:
        alg = "EdDSA"
    now = int(time.time())
    return jwt.encode(
        {"aud": audience, "sub": cert.subject.rfc4514_string(), "iat": now, "nbf": now,
         "exp": now + lifetime, "jti": secrets.token_hex(16)},
        key, algorithm=alg,
        headers={"x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER))
                         .decode()], "typ": "JWT"})


def load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def error_message(resp: Response, status: int) -> str:
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.text[:500]}"
    body = resp.json()
    assert set(body) == {"status", "message"} and body["status"] == status, body
    return str(body["message"])


def wait_until_expired(crt: Path) -> None:
    """Sleep until the server (whole seconds) and the client both see CRT as expired."""
    remaining = (leaf_of(crt).not_valid_after_utc - datetime.now(UTC)).total_seconds()
    if remaining > -1.5:
        time.sleep(remaining + 1.5)


def wait_for_lines(path: Path, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, (
            f"{path.name} has {len(lines)} of {count} lines after {timeout:.0f} s")
        time.sleep(0.05)


# -- a process to signal, and the renewal daemon --------------------------------------------------
SIGNAL_TARGET = """
import signal, sys, time
def note(signum, frame):
    with open(sys.argv[1], "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
for s in (signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, note)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


class SignalTarget:
    """A process of ours that writes the name of each SIGUSR1/SIGHUP it gets to a file."""

    def __init__(self, work: Path, name: str) -> None:
        self.log = work / f"{name}.signals"
        self.process = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_TARGET, str(self.log)], stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.process.pid

    def received(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def target(client: CaServer, request: pytest.FixtureRequest) -> Iterator[SignalTarget]:
    t = SignalTarget(client.work, request.node.name.replace("[", "-").replace("]", ""))
    try:
        yield t
    finally:
        t.stop()


class RenewDaemon:
    """`applianctl renew --daemon` as a child of ours; stderr goes to a file we can read."""

    def __init__(self, ca: CaServer, crt: Path, key: Path, *extra: str | Path) -> None:
        self.err_path = ca.work / f"{crt.stem}.daemon.err"
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [APPLIANCTL, "renew", str(crt), str(key), "--daemon", *map(str, extra)],
            env=clean_env(ca.client_home), cwd=ca.work, stdin=subprocess.DEVNULL,
            stdout=self._err, stderr=self._err, start_new_session=True)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = self.stderr()
            if out.count(text) >= count:
                return out
            assert self.process.poll() is None, (
                f"the daemon exited {self.process.returncode}:\n{out}")
            assert time.monotonic() < deadline, f"no {count} x {text!r} in:\n{out}"
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process.poll() is None, f"the daemon is gone:\n{self.stderr()}"
        self.process.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM it (if still running) and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                self._err.close()
                return None
        self._err.close()
        return self.process.returncode


# -- short-lived certificates (issued first, so they have expired by the time they are used) ------
@pytest.fixture(scope="module")
def short_lived(client: CaServer) -> dict[str, tuple[Path, Path]]:
    return {p: issue_cli(client, f"expiring-{p}.example", "--not-after", "5s", provisioner=p)
            for p in ("short", "strict")}


def test_short_lived_certificates_have_the_requested_lifetime(
        client: CaServer, short_lived: dict[str, tuple[Path, Path]]) -> None:
    for crt, _ in short_lived.values():
        leaf, _ = client.openssl_verify(crt)
        assert lifetime(leaf) == timedelta(seconds=5) + BACKDATE, lifetime(leaf)
    # And the provisioner's default of 15 s when no --not-after is given.
    crt, _ = issue_cli(client, "default-short.example", provisioner="short")
    assert lifetime(leaf_of(crt)) == timedelta(seconds=15) + BACKDATE


# -- renew ----------------------------------------------------------------------------------------
def test_renew_keeps_identity_key_and_lifetime(client: CaServer) -> None:
    crt, key = issue_cli(client, "renew.example", "--san", "renew.example",
                         "--san", "www.renew.example", "--san", "10.0.0.7", "--not-after", "2h")
    old = leaf_of(crt)
    key_before = file_state(key)
    crt_inode = crt.stat().st_ino
    # Validity has whole-second precision: renew in a later second so "starts now" is visible.
    time.sleep(max(0.0, 1.05 - (datetime.now(UTC) - old.not_valid_before_utc - BACKDATE)
                   .total_seconds()))

    result = client.run_cli("renew", crt, key, "--force")
    assert result.stdout.strip() == f"Your certificate has been saved in {crt}."
    new, _ = client.openssl_verify(crt)
    same_identity(new, old)
    assert spki(new) == spki(old), "renew changed the key"
    assert lifetime(new) == lifetime(old) == timedelta(hours=2) + BACKDATE
    now = datetime.now(UTC)
    assert now - BACKDATE - timedelta(seconds=10) <= new.not_valid_before_utc <= now - BACKDATE
    assert new.not_valid_after_utc > old.not_valid_after_utc

    assert file_state(key) == key_before, "renew touched the key file"
    assert key_before[1] == 0o600
    assert stat.S_IMODE(crt.stat().st_mode) == 0o644
    assert crt.stat().st_ino != crt_inode, "CRT was rewritten in place, not replaced"
    no_temp_files(crt.parent)


def test_renew_without_force_and_without_a_terminal_is_refused(client: CaServer) -> None:
    crt, key = issue(client, "noforce.example")
    before = crt.read_bytes()
    # Even a "y" on stdin does not count: there is no terminal to ask.
    line = one_error_line(client.run_cli("renew", crt, key, input="y\n", check=False))
    assert line == f"error: {crt} would be overwritten; use --force"
    assert crt.read_bytes() == before


def test_renew_expires_in(client: CaServer) -> None:
    crt, key = issue(client, "expires-in.example")  # 24 h
    before = crt.read_bytes()
    result = client.run_cli("renew", crt, key, "--expires-in", "1h", "--force")
    assert result.stdout.startswith("certificate not renewed: it expires at "), result.stdout
    assert crt.read_bytes() == before
    client.run_cli("renew", crt, key, "--expires-in", "25h", "--force")
    assert leaf_of(crt).serial_number != x509.load_pem_x509_certificate(before).serial_number


def test_renew_refused_when_the_provisioner_disables_it(client: CaServer) -> None:
    crt, key = issue(client, "norenew.example", provisioner="norenew")
    before = crt.read_bytes()
    line = one_error_line(client.run_cli("renew", crt, key, "--force", check=False))
    assert line == f"{REFUSED}renewal is disabled for provisioner 'norenew'"
    assert crt.read_bytes() == before


def test_renew_runs_exec_and_signals_pid(client: CaServer, target: SignalTarget) -> None:
    crt, key = issue(client, "hooks.example")
    hook = client.work / "hooks.out"
    command = f"sh -c {shlex.quote(f'echo renewed-$0 >> {shlex.quote(str(hook))}')}"
    client.run_cli("renew", crt, key, "--force", "--exec", command,
                   "--pid", str(target.pid), "--signal", "USR1")
    assert hook.read_text().splitlines() == ["renewed-sh"]
    deadline = time.monotonic() + 5
    while not target.received() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.received() == ["SIGUSR1"]


# -- renew over the API: which credentials are accepted -------------------------------------------
async def test_renew_api_accepts_mtls_and_x5c_tokens_only(client: CaServer, api: Api) -> None:
    crt, key = issue(client, "api-renew.example")
    cert, private = leaf_of(crt), load_key(key)
    audience = f"{client.url}/1.0/renew"

    message = error_message(await api.post_json("/1.0/renew", {}), 401)
    assert message == "renew needs the certificate over mTLS or an x5c Bearer token"

    resp = await mtls_post(client, "/1.0/renew", crt, key)
    assert resp.status == 201, resp.text
    renewed = x509.load_pem_x509_certificate(resp.json()["crt"].encode())
    same_identity(renewed, cert)
    assert spki(renewed) == spki(cert)

    token = x5c_token(cert, private, audience)
    bearer = {"Authorization": f"Bearer {token}"}
    resp = await api.request("POST", "/1.0/renew", json={}, headers=bearer)
    assert resp.status == 201, resp.text
    same_identity(x509.load_pem_x509_certificate(resp.json()["crt"].encode()), cert)
    replay = await api.request("POST", "/1.0/renew", json={}, headers=bearer)
    assert "already used" in error_message(replay, 401)

    async def bearer_refused(tok: str, fragment: str) -> None:
        r = await api.request("POST", "/1.0/renew", json={},
                              headers={"Authorization": f"Bearer {tok}"})
        message = error_message(r, 401)
        assert fragment in message, message

    other = ec.generate_private_key(ec.SECP256R1())
    await bearer_refused(x5c_token(cert, other, audience),
                         "signature does not match the certificate")
    await bearer_refused(x5c_token(cert, private, client.sign_audience), "audience")
    lookalike = (x509.CertificateBuilder().subject_name(cert.subject)
                 .issuer_name(cert.issuer).public_key(other.public_key())
                 .serial_number(cert.serial_number)
                 .not_valid_before(cert.not_valid_before_utc)
                 .not_valid_after(cert.not_valid_after_utc)
                 .sign(other, hashes.SHA256()))
    await bearer_refused(x5c_token(lookalike, other, audience), "not issued by this CA")


# -- rekey ----------------------------------------------------------------------------------------
def test_rekey_makes_a_new_key_for_the_same_identity(client: CaServer) -> None:
    crt, key = issue(client, "rekey.example", sans=["rekey.example", "192.0.2.9"])
    first = leaf_of(crt)
    old_key = key.read_bytes()

    for kty, expected in (("RSA", rsa.RSAPrivateKey), ("OKP", ed25519.Ed25519PrivateKey),
                          ("EC", ec.EllipticCurvePrivateKey)):
        previous = leaf_of(crt)
        result = client.run_cli("rekey", crt, key, "--kty", kty, "--force")
        assert result.stdout.splitlines() == [f"Your certificate has been saved in {crt}.",
                                              f"Your private key has been saved in {key}."]
        new, _ = client.openssl_verify(crt)
        same_identity(new, previous)
        new_key = load_key(key)
        assert isinstance(new_key, expected), type(new_key)
        assert spki(new) == spki(new_key), "the certificate is not for the new key"
        assert spki(new) != spki(previous)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        ku = new.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_encipherment is (kty == "RSA"), "keyEncipherment should follow the key"
        assert lifetime(new) == lifetime(first)
    assert key.read_bytes() != old_key
    no_temp_files(crt.parent)


def test_rekey_without_force_is_refused(client: CaServer) -> None:
    crt, key = issue(client, "rekey-noforce.example")
    before = (crt.read_bytes(), key.read_bytes())
    line = one_error_line(client.run_cli("rekey", crt, key, input="", check=False))
    assert line == f"error: {crt} would be overwritten; use --force"
    assert (crt.read_bytes(), key.read_bytes()) == before


# -- expired certificates -------------------------------------------------------------------------
async def test_expired_certificate_renews_with_an_x5c_token(
        client: CaServer, short_lived: dict[str, tuple[Path, Path]]) -> None:
    crt, key = short_lived["short"]
    wait_until_expired(crt)
    old = leaf_of(crt)
    key_before = file_state(key)
    # mTLS is no longer possible: the handshake refuses an expired client certificate ...
    with pytest.raises(aiohttp.ClientError):
        await mtls_post(client, "/1.0/renew", crt, key)
    # ... so the CLI has to prove possession of the key with an x5c token.
    client.run_cli("renew", crt, key, "--force")
    new, _ = client.openssl_verify(crt)
    same_identity(new, old)
    assert spki(new) == spki(old)
    assert lifetime(new) == lifetime(old) == timedelta(seconds=5) + BACKDATE
    assert new.not_valid_after_utc > datetime.now(UTC)
    assert file_state(key) == key_before


def test_expired_certificate_is_refused_without_renewal_after_expiry(
        client: CaServer, short_lived: dict[str, tuple[Path, Path]]) -> None:
    crt, key = short_lived["strict"]
    wait_until_expired(crt)
    before = crt.read_bytes()
    expired_at = leaf_of(crt).not_valid_after_utc.isoformat()
    line = one_error_line(client.run_cli("renew", crt, key, "--force", check=False))
    assert line == (f"{REFUSED}the certificate expired at {expired_at} and provisioner "
                    "'strict' does not allow renewal after expiry")
    assert crt.read_bytes() == before


# -- revoke and the CRL ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def revoked(client: CaServer) -> dict[str, tuple[Path, Path]]:
    """Five certificates for the revocation tests; r1..r4 get revoked, r5 stays good."""
    return {n: issue(client, f"{n}.revoke.example") for n in ("r1", "r2", "r3", "r4", "r5")}


async def test_revoke_in_each_way_and_the_crl_follows(
        client: CaServer, revoked: dict[str, tuple[Path, Path]]) -> None:
    serial = {n: leaf_of(crt).serial_number for n, (crt, _) in revoked.items()}
    password = ("--password-file", client.provisioner_password_file,
                "--provisioner", PROVISIONER)
    ways: list[tuple[str, list[str | Path], x509.ReasonFlags | None]] = [
        ("r1", [str(serial["r1"]), "--reasonCode", "keyCompromise", "--reason", "laptop stolen",
                *password], x509.ReasonFlags.key_compromise),
        ("r2", [f"0x{serial['r2']:x}", "--reasonCode", "4", *password],
         x509.ReasonFlags.superseded),
        ("r3", ["--cert", revoked["r3"][0], "--key", revoked["r3"][1],
                "--reasonCode", "cessation-of-operation"],
         x509.ReasonFlags.cessation_of_operation),
        ("r4", [str(serial["r4"]), *password], None),  # unspecified: no reason extension
    ]
    number = crl_number(await get_crl(client))
    for name, args, reason in ways:
        result = client.run_cli("revoke", *args)
        assert result.stdout.strip() == (
            f"Certificate with Serial Number {serial[name]} has been revoked.")
        crl = await get_crl(client)
        assert crl_number(crl) > number, f"the CRL number did not grow after revoking {name}"
        number = crl_number(crl)
        assert reason_of(crl, serial[name]) == reason, name
    assert crl.get_revoked_certificate_by_serial_number(serial["r5"]) is None


def test_revoking_twice_is_refused(client: CaServer,
                                   revoked: dict[str, tuple[Path, Path]]) -> None:
    r1 = leaf_of(revoked["r1"][0]).serial_number
    for args in ([str(r1), "--password-file", client.provisioner_password_file],
                 [f"0x{r1:X}", "--password-file", client.provisioner_password_file],
                 ["--cert", revoked["r3"][0], "--key", revoked["r3"][1]]):
        line = one_error_line(client.run_cli("revoke", *args, check=False))
        assert line.startswith(f"{REFUSED}certificate with serial ") and line.endswith(
            " is already revoked"), line
    line = one_error_line(client.run_cli("revoke", "12345", "--password-file",
                                         client.provisioner_password_file, check=False))
    assert line == f"{REFUSED}no certificate with serial 12345 was issued by this CA"


async def test_revoked_certificate_can_neither_renew_nor_rekey(
        client: CaServer, api: Api, revoked: dict[str, tuple[Path, Path]]) -> None:
    for name in ("r1", "r3"):
        crt, key = revoked[name]
        before = (crt.read_bytes(), key.read_bytes())
        for command in ("renew", "rekey"):
            line = one_error_line(client.run_cli(command, crt, key, "--force", check=False))
            assert line == f"{REFUSED}the certificate has been revoked", (command, line)
        assert (crt.read_bytes(), key.read_bytes()) == before
        token = x5c_token(leaf_of(crt), load_key(key), f"{client.url}/1.0/renew")
        resp = await api.request("POST", "/1.0/renew", json={},
                                 headers={"Authorization": f"Bearer {token}"})
        assert error_message(resp, 401) == "the certificate has been revoked"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)


def test_openssl_checks_certificates_against_the_crl(
        client: CaServer, revoked: dict[str, tuple[Path, Path]]) -> None:
    crl_file = client.work / "lifecycle.crl.pem"
    assert client.run_cli("crl", crl_file).stdout.strip() == (
        f"The CRL has been saved in {crl_file}.")
    for name, (crt, _) in revoked.items():
        leaf_pem = client.work / f"{name}.leaf.pem"
        leaf_pem.write_bytes(leaf_of(crt).public_bytes(serialization.Encoding.PEM))
        result = openssl("verify", "-crl_check", "-CAfile", client.root_path,
                         "-untrusted", client.intermediate_path, "-CRLfile", crl_file, leaf_pem)
        if name == "r5":
            assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), (
                result.stdout + result.stderr)
        else:
            assert result.returncode != 0, f"{name} passed the CRL check:\n{result.stdout}"
            assert "certificate revoked" in result.stdout + result.stderr, (
                result.stdout + result.stderr)

    chain = client.work / "root+intermediate.pem"
    chain.write_bytes(client.root_path.read_bytes() + client.intermediate_path.read_bytes())
    for ca_file in (client.intermediate_path, chain):
        result = openssl("crl", "-in", crl_file, "-noout", "-verify", "-CAfile", ca_file)
        assert result.returncode == 0 and "verify OK" in result.stdout + result.stderr, (
            result.stdout + result.stderr)
    # It is the intermediate's signature, not the root's.
    assert openssl("crl", "-in", crl_file, "-noout", "-verify",
                   "-CAfile", client.root_path).returncode != 0


async def test_crl_endpoints_and_formats(client: CaServer,
                                         revoked: dict[str, tuple[Path, Path]]) -> None:
    bodies = {}
    for path in ("/crl", "/1.0/crl"):
        status, content_type, body = await get_raw(client, f"{client.url}{path}")
        assert (status, content_type) == (200, "application/pkix-crl"), (path, status)
        bodies[path] = body
    assert bodies["/crl"] == bodies["/1.0/crl"]
    crl = x509.load_der_x509_crl(bodies["/crl"])

    status, content_type, pem = await get_raw(client, f"{client.url}/1.0/crl?pem")
    assert (status, content_type) == (200, "application/x-pem-file")
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    assert x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER) == bodies["/crl"]

    inter = client.intermediate
    assert crl.issuer == inter.subject
    assert crl.is_signature_valid(inter.public_key())
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    revoked_serials = {e.serial_number for e in crl}
    expected = {leaf_of(revoked[n][0]).serial_number for n in ("r1", "r2", "r3", "r4")}
    assert expected <= revoked_serials

    der_file = client.work / "lifecycle.crl.der"
    client.run_cli("crl", der_file, "--der")
    assert der_file.read_bytes() == bodies["/crl"]
    assert client.run_cli("crl").stdout.encode() == pem


async def test_certificates_point_to_the_crl_on_the_plain_http_listener(
        client: CaServer, http_url: str) -> None:
    crt, _ = issue(client, "crl-dp.example")
    dp = leaf_of(crt).extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not dp.critical
    ((point,),) = [[n.value for n in p.full_name] for p in dp.value]  # type: ignore[union-attr]
    assert point == f"{http_url}/crl"
    status, content_type, body = await get_raw(client, point, ssl=False)
    assert (status, content_type) == (200, "application/pkix-crl")
    _, _, over_https = await get_raw(client, f"{client.url}/crl")
    assert body == over_https


# -- the plain-HTTP listener ----------------------------------------------------------------------
async def insecure(url: str, method: str = "GET", body: Any = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.request(method, url, json=body) as resp:
        return resp.status, resp.content_type, await resp.read()


async def test_insecure_listener_serves_the_crl_and_the_root(client: CaServer,
                                                             http_url: str) -> None:
    root_pem = client.root_path.read_bytes()
    for prefix in ("", "/1.0"):
        status, content_type, body = await insecure(f"{http_url}{prefix}/crl")
        assert (status, content_type) == (200, "application/pkix-crl")
        assert x509.load_der_x509_crl(body).issuer == client.intermediate.subject
        status, content_type, body = await insecure(f"{http_url}{prefix}/crl?pem")
        assert (status, content_type) == (200, "application/x-pem-file")
        x509.load_pem_x509_crl(body)
        status, _, body = await insecure(f"{http_url}{prefix}/roots.pem")
        assert status == 200
        assert x509.load_pem_x509_certificates(body) == [client.root]
        status, _, body = await insecure(f"{http_url}{prefix}/root/{client.fingerprint}")
        assert status == 200
        assert sha256_hex(x509.load_pem_x509_certificate(
            json.loads(body)["ca"].encode())) == client.fingerprint
    assert (await insecure(f"{http_url}/root/{'0' * 64}"))[0] == 404
    assert root_pem.strip() == client.root.public_bytes(serialization.Encoding.PEM).strip()


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/health"), ("GET", "/1.0/health"), ("GET", "/version"), ("GET", "/roots"),
    ("GET", "/intermediates.pem"), ("GET", "/provisioners"), ("POST", "/1.0/sign"),
    ("POST", "/sign"), ("POST", "/1.0/renew"), ("POST", "/1.0/rekey"),
    ("POST", "/1.0/revoke"), ("GET", "/"),
])
async def test_insecure_listener_serves_nothing_else(client: CaServer, http_url: str,
                                                     method: str, path: str) -> None:
    status, content_type, body = await insecure(f"{http_url}{path}", method,
                                                {} if method == "POST" else None)
    assert status == 404, (method, path, status, body[:200])
    assert content_type == "application/json"
    assert json.loads(body)["message"] == f"no such endpoint: {method} {path}"


# -- the renewal daemon ---------------------------------------------------------------------------
def test_renew_daemon_renews_at_two_thirds_of_the_lifetime(client: CaServer,
                                                           target: SignalTarget) -> None:
    """Two renewals of a 15 s certificate on schedule; then SIGHUP renews at once and SIGTERM
    stops it with exit 0. Each renewal runs --exec and signals the --pid-file process."""
    crt, key = issue(client, "daemon.example", provisioner="short")
    hook = client.work / "daemon.hook"
    command = f"sh -c {shlex.quote(f'echo renewed >> {shlex.quote(str(hook))}')}"
    pid_file = client.work / "daemon-target.pid"
    pid_file.write_text(f"{target.pid}\n")
    key_before = file_state(key)
    daemon = RenewDaemon(client, crt, key, "--exec", command, "--pid-file", pid_file,
                         "--signal", "USR1")
    try:
        daemon.wait_for("renewal daemon: next renewal in ")
        received = crt.stat().st_mtime
        previous = leaf_of(crt)
        for n in (1, 2):
            span = previous.not_valid_after_utc.timestamp() - received  # lifetime from receipt
            due = received + span * 2 / 3
            wait_for_lines(hook, n, timeout=span + 15)
            renewed_at = crt.stat().st_mtime
            assert due - span / 20 - 1.0 <= renewed_at <= due + 5.0, (
                f"renewal {n} came {renewed_at - received:.1f} s after receipt of a "
                f"{span:.1f} s certificate (due at {due - received:.1f} s, less jitter)\n"
                f"{daemon.stderr()}")
            new, _ = client.openssl_verify(crt)
            same_identity(new, previous)
            assert spki(new) == spki(previous)
            assert lifetime(new) == timedelta(seconds=15) + BACKDATE
            previous, received = new, renewed_at
        assert daemon.stderr().count(f"Your certificate has been saved in {crt}.") == 2

        hup_at = time.time()
        daemon.signal(signal.SIGHUP)
        wait_for_lines(hook, 3, timeout=10)
        assert crt.stat().st_mtime - hup_at < 5, "SIGHUP did not renew at once"
        assert leaf_of(crt).serial_number != previous.serial_number

        deadline = time.monotonic() + 5
        while len(target.received()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.received() == ["SIGUSR1"] * 3
        assert file_state(key) == key_before, "the daemon touched the key file"
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(15) == 0, daemon.stderr()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    no_temp_files(crt.parent)


def test_renew_daemon_keeps_running_after_a_refusal(client: CaServer) -> None:
    crt, key = issue(client, "daemon-norenew.example", provisioner="norenew")
    before = crt.read_bytes()
    hook = client.work / "daemon-norenew.hook"
    daemon = RenewDaemon(client, crt, key, "--exec",
                         f"sh -c {shlex.quote(f'echo x >> {shlex.quote(str(hook))}')}")
    try:
        out = daemon.wait_for("renewal daemon: next renewal in ")
        first_delay = int(out.split("next renewal in ")[1].split()[0])
        span = 24 * 3600  # 2/3 of it, less a jitter of up to 1/20 of it
        assert span * 2 / 3 - span / 20 - 60 <= first_delay <= span * 2 / 3, out
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("error: renewal failed: the CA refused: renewal is disabled for "
                        "provisioner 'norenew'; retrying in 60 s")
        time.sleep(0.5)
        assert daemon.process.poll() is None, "the daemon gave up after one failure"
        assert crt.read_bytes() == before and not hook.exists()
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(15) == 0
    finally:
        daemon.stop()


def test_renew_daemon_with_a_fixed_period(client: CaServer) -> None:
    crt, key = issue(client, "daemon-period.example")
    serials = {leaf_of(crt).serial_number}
    daemon = RenewDaemon(client, crt, key, "--renew-period", "1s")
    try:
        daemon.wait_for("renewal daemon: next renewal in 1 s")
        daemon.wait_for(f"Your certificate has been saved in {crt}.", count=2, timeout=15)
        serials.add(leaf_of(crt).serial_number)
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(15) == 0
    finally:
        daemon.stop()
    assert len(serials) == 2
    assert lifetime(leaf_of(crt)) == timedelta(hours=24) + BACKDATE


def test_no_server_errors_in_the_log(client: CaServer) -> None:
    assert not server_errors(client), server_errors(client)
