"""Helpers for the end-to-end tests: the CA under test (CLI, server process, log), token minting
and an HTTPS client that trusts only the CA's root. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance.authority.provisioners.jwk_tokens import TokenSigner

APPLIANCTL = str(Path(sys.executable).with_name("applianctl"))
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PROVISIONER = "admin"
SERVE_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0  # the server drains for up to 30 s
CLI_TIMEOUT = 120.0
WORKERS = 2


def free_port() -> int:
    """A TCP port the OS just handed out on 127.0.0.1 (closed again, so the server can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_secret(path: Path, value: str) -> Path:
    """Write a PIN or password file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)
    return path


def clean_env(home: Path | None) -> dict[str, str]:
    """This process's environment without anything that would steer the CLI elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOFTHSM2_CONF", "APPLIANCE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
                        "REQUESTS_CA_BUNDLE")}
    if home is not None:
        env["APPLIANCE_HOME"] = str(home)
    return env


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return (f"`{' '.join(map(str, result.args))}` exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}")


def load_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def sha256_hex(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass
class CaServer:
    """One CA home, its secrets, a client home and (while running) its `serve` process."""

    base: Path
    port: int
    root_pin_file: Path
    issuer_pin_file: Path
    provisioner_password_file: Path
    issuer_pin: str
    root_pin: str
    provisioner_password: str
    init_stdout: str = ""
    process: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0
    _stderr: Any = field(default=None, repr=False)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def ca_home(self) -> Path:
        return self.base / "ca"

    @property
    def client_home(self) -> Path:
        return self.base / "client"

    @property
    def work(self) -> Path:
        """Scratch directory for certificates, keys and CSRs the tests make."""
        return self.base / "work"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def sign_audience(self) -> str:
        return f"{self.url}/1.0/sign"

    @property
    def root_path(self) -> Path:
        return self.ca_home / "certs" / "root_ca.crt"

    @property
    def intermediate_path(self) -> Path:
        return self.ca_home / "certs" / "intermediate_ca.crt"

    @property
    def config_path(self) -> Path:
        return self.ca_home / "config" / "ca.json"

    @property
    def db_path(self) -> Path:
        return self.ca_home / "db" / "appliance.db"

    @property
    def softhsm_conf(self) -> Path:
        return self.ca_home / "hsm" / "softhsm2.conf"

    @property
    def log_path(self) -> Path:
        return self.base / "serve.log"

    @property
    def pidfile(self) -> Path:
        return self.base / "serve.pid"

    @property
    def fingerprint(self) -> str:
        return self.init_stdout.strip().splitlines()[-1]

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_path.read_bytes())

    @property
    def intermediate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.intermediate_path.read_bytes())

    # -- the CLI -------------------------------------------------------------------------------
    def run_cli(self, *args: str | Path, home: Path | None = None, check: bool = True,
                timeout: float = CLI_TIMEOUT, input: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run `applianctl ARGS` with APPLIANCE_HOME=home (default: the client home).

        `input` (e.g. "" or "y\n") makes stdin a pipe, so the CLI knows it has no terminal.
        """
        result = subprocess.run(
            [APPLIANCTL, *map(str, args)], env=clean_env(home or self.client_home),
            cwd=self.work, capture_output=True, text=True, timeout=timeout, check=False,
            input=input)
        if check and result.returncode != 0:
            pytest.fail(describe(result), pytrace=False)
        return result

    def init(self, *extra: str, home: Path | None = None, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return self.run_cli(
            "init", "--name", "E2E Test", "--dns", "localhost", "--dns", "127.0.0.1",
            "--address", f"127.0.0.1:{self.port}", "--provisioner", PROVISIONER,
            "--password-file", self.root_pin_file,
            "--issuer-password-file", self.issuer_pin_file,
            "--provisioner-password-file", self.provisioner_password_file,
            *extra, home=home or self.ca_home, check=check)

    # -- the server ----------------------------------------------------------------------------
    def start(self, prefix: tuple[str, ...] = (), workers: int | None = WORKERS) -> None:
        """Start `serve` and wait for its "serving" line; fail with the log if it never comes.

        `prefix` runs it under another command (e.g. taskset); `workers=None` leaves the count
        to the server.
        """
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stderr = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        count = ["--workers", str(workers)] if workers is not None else []
        self.process = subprocess.Popen(
            [*prefix, APPLIANCTL, "serve", str(self.config_path),
             "--issuer-password-file", str(self.issuer_pin_file),
             "--pidfile", str(self.pidfile), *count],
            env=clean_env(self.ca_home), cwd=self.base, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True)
        try:
            self.wait_for_event("serving", timeout=SERVE_TIMEOUT)
        except BaseException:
            self.stop(check=False)
            raise

    def stop(self, check: bool = True) -> int | None:
        """SIGTERM the server we started and wait for it; return its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        code = process.poll()
        if code is None:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Our own process group (start_new_session): the supervisor and its workers.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
                code = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if check:
            assert code == 0, (f"the server did not exit 0 after SIGTERM (code {code}); log:\n"
                               f"{self.log_tail()}")
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None and self.process.poll() is None, "server is not running"
        self.process.send_signal(sig)

    def serve_once(self, pin_file: Path, timeout: float = SERVE_TIMEOUT) -> tuple[int, str]:
        """Run a second `serve` on this home that is expected to refuse to start.

        Returns (exit code, stderr). Should it start serving instead, it is stopped with
        SIGTERM (it is ours) and the test fails.
        """
        err_path = self.base / f"serve-once-{time.monotonic_ns()}.log"
        with open(err_path, "wb") as err:
            process = subprocess.Popen(
                [APPLIANCTL, "serve", str(self.config_path), "--issuer-password-file",
                 str(pin_file), "--workers", "1"],
                env=clean_env(self.ca_home), cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
                pytest.fail(f"a second server was still running after {timeout:.0f} s:\n"
                            f"{err_path.read_text(errors='replace')}", pytrace=False)
        return code, err_path.read_text(errors="replace")

    # -- the log -------------------------------------------------------------------------------
    def events(self, since: int | None = None) -> list[dict[str, Any]]:
        """JSON log lines written since `since` (default: since the last start)."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset if since is None else since)
            data = f.read()
        out = []
        for line in data.split(b"\n")[:-1]:  # the last piece may be a line still being written
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for_event(self, event: str, since: int | None = None,
                       timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for item in self.events(since):
                if item.get("event") == event:
                    return item
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}) before logging "
                            f"{event!r}; log:\n{self.log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no {event!r} log line within {timeout:.0f} s; log:\n"
                            f"{self.log_tail()}", pytrace=False)
            time.sleep(0.05)

    # -- checks --------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """Trusts this CA's root and nothing else."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.root_path))
        return ctx

    def raw_tls_request(self, request: bytes) -> bytes:
        """Send bytes no HTTP client would send; return what the server answers before closing."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as plain, \
                self.ssl_context().wrap_socket(plain, server_hostname="localhost") as tls:
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            return answer

    def openssl_verify(self, crt_file: Path, purpose: str = "sslserver") -> list[x509.Certificate]:
        """Split CRT (leaf + intermediate), verify the leaf with openssl; return the chain."""
        chain = load_chain(crt_file)
        assert len(chain) == 2, f"{crt_file} should hold leaf + intermediate, has {len(chain)}"
        stem = crt_file.with_suffix("")
        leaf_pem = Path(f"{stem}.leaf.pem")
        inter_pem = Path(f"{stem}.intermediate.pem")
        leaf_pem.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
        inter_pem.write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile",
             str(self.root_path), "-untrusted", str(inter_pem), str(leaf_pem)],
            capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), (
            f"openssl verify failed for {crt_file}:\n{result.stdout}{result.stderr}")
        assert chain[1] == self.intermediate, "the chain's intermediate is not the CA's"
        return chain


@dataclass(frozen=True)
class Tokens:
    """Mints one-time tokens with the provisioner's decrypted key, as `applianctl token` does."""

    signer: TokenSigner
    audience: str
    fingerprint: str

    @property
    def kid(self) -> str:
        return self.signer.kid

    def mint(self, subject: str, sans: list[str] | None = None, *, audience: str | None = None,
             lifetime: int = 300, now: float | None = None) -> str:
        return self.signer.mint(subject, audience or self.audience,
                                sans=sans if sans is not None else [subject],
                                root_fingerprint=self.fingerprint, lifetime=lifetime, now=now)


@dataclass
class Response:
    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@contextlib.asynccontextmanager
async def open_api(ca: CaServer) -> AsyncIterator[Api]:
    """A fresh HTTPS client session for `ca` (a new one after a restart: no stale connections)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield Api(ca, session)


class Api:
    """HTTPS client that trusts only the CA's root."""

    def __init__(self, ca: CaServer, session: aiohttp.ClientSession) -> None:
        self.ca = ca
        self.session = session
        self.ssl = ca.ssl_context()

    async def request(self, method: str, path: str, **kwargs: Any) -> Response:
        async with self.session.request(method, f"{self.ca.url}{path}", ssl=self.ssl,
                                        **kwargs) as resp:
            return Response(resp.status, resp.content_type, await resp.text())

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def post_json(self, path: str, body: Any) -> Response:
        return await self.request("POST", path, json=body)

    async def post_raw(self, path: str, data: bytes) -> Response:
        return await self.request("POST", path, data=data,
                                  headers={"Content-Type": "application/json"})



# -- helpers shared by the lifecycle and provisioner modules ---------------------------------------
def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's failure contract: exit 1, nothing but `error: ...` on one line of stderr."""
    assert result.returncode == 1, (
        f"expected exit 1, got {result.returncode}:\n{describe(result)}")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (
        f"expected one 'error: ...' line on stderr, got:\n{result.stderr}")
    return lines[0]


def sighup_and_wait(ca: CaServer, event: str = "config_reloaded", count: int = WORKERS,
                    timeout: float = 30.0) -> list[dict[str, Any]]:
    """SIGHUP the server and wait for `count` `event` log lines (one per worker by default)."""
    since = ca.log_size()
    ca.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in ca.events(since) if e.get("event") == event]
        if len(found) >= count:
            return found
        refused = [e for e in ca.events(since) if e.get("event") == "reload_refused"]
        if refused and event != "reload_refused":
            pytest.fail(f"the server refused the reload: {refused[0]}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"no {count} x {event!r} within {timeout:.0f} s of SIGHUP; log:\n"
                        f"{ca.log_tail()}", pytrace=False)
        time.sleep(0.05)


def provisioner_tokens(ca: CaServer, name: str, audience: str | None = None) -> Tokens:
    """Tokens for provisioner `name` of ca.json, its key decrypted with the test password."""
    from appliance.authority.provisioners.jwk_keys import decrypt_private_key

    config = json.loads(ca.config_path.read_text())
    (entry,) = [p for p in config["authority"]["provisioners"] if p["name"] == name]
    key, _ = decrypt_private_key(entry["encryptedKey"], ca.provisioner_password.encode())
    return Tokens(TokenSigner.for_key(key, name), audience or ca.sign_audience, ca.fingerprint)


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """sd_notify datagrams received on `sock` up to and including one with the line `wanted`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"no {wanted!r} from the server within {timeout} s; got {seen}")


@contextlib.contextmanager
def reconfigured(ca: CaServer, **members: Any) -> Iterator[None]:
    """Run the block with these top-level ca.json members (reloaded by SIGHUP), then restore."""
    original = ca.config_path.read_text()
    config = json.loads(original)
    config.update(members)
    ca.config_path.write_text(json.dumps(config))
    sighup_and_wait(ca)
    try:
        yield
    finally:
        ca.config_path.write_text(original)
        sighup_and_wait(ca)


def server_errors(ca: CaServer, since: int = 0) -> list[dict[str, Any]]:
    """Log lines of requests that ended in a 5xx or an unhandled exception."""
    return [e for e in ca.events(since)
            if e.get("event") == "unhandled_error"
            or (e.get("event") == "request" and int(e.get("status", 0)) >= 500)]
