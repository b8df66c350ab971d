"""Quorum unlock end to end: init 3/5, start sealed, refuse bad shares, unseal, seal, rotate."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import APPLIANCTL, clean_env, free_port, receive_until, write_secret

from appliance.unlock.admin import admin_request

pytestmark = pytest.mark.e2e


class QuorumCa:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "ca"
        self.port = free_port()
        self.root_pin = write_secret(base / "root-pin", "root-pin-for-quorum-test")
        self.prov_pass = write_secret(base / "prov-pass", "provisioner-password")
        self.shares = base / "shares"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = base / "serve.log"

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([APPLIANCTL, *map(str, args)], env=clean_env(self.home),
                                capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            pytest.fail(f"applianctl {args[0]} failed: {result.stderr}", pytrace=False)
        return result

    def share(self, i: int) -> Path:
        return self.shares / f"share-{i}-of-5.txt"

    def health(self) -> tuple[int, dict[str, str]]:
        context = ssl.create_default_context(cafile=str(self.home / "certs" / "root_ca.crt"))
        try:
            with urllib.request.urlopen(f"https://localhost:{self.port}/health",
                                        context=context, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_health(self, status: int, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                code, body = self.health()
                if code == status:
                    return body
                last = (code, body)
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.2)
        log = self.log.read_text()[-3000:]
        pytest.fail(f"/health never answered {status}; last: {last}\n{log}", pytrace=False)

    def start(self, notify_socket: Path | None = None) -> None:
        env = clean_env(self.home)
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = str(notify_socket)
        with open(self.log, "ab") as err:
            self.process = subprocess.Popen(
                [APPLIANCTL, "serve", str(self.home / "config" / "ca.json"), "--workers", "1"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.process = None
        return code

    def sign(self, name: str) -> subprocess.CompletedProcess[str]:
        client = self.base / "client"
        return subprocess.run(
            [APPLIANCTL, "certificate", name, str(self.base / f"{name}.crt"),
             str(self.base / f"{name}.key"), "--password-file", str(self.prov_pass), "--force",
             "--ca-url", f"https://localhost:{self.port}",
             "--root", str(self.home / "certs" / "root_ca.crt")],
            env=clean_env(client), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def qca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumCa]:
    ca = QuorumCa(tmp_path_factory.mktemp("quorum"))
    out = ca.cli("init", "--name", "Quorum", "--address", f"127.0.0.1:{ca.port}",
                 "--password-file", ca.root_pin, "--provisioner-password-file", ca.prov_pass,
                 "--quorum", "3/5", "--share-dir", ca.shares)
    assert "5 shares" in out.stdout
    ca.start()
    yield ca
    if ca.process is not None:
        assert ca.stop() == 0


def test_init_never_shows_the_issuer_pin(qca: QuorumCa) -> None:
    config = json.loads((qca.home / "config" / "ca.json").read_text())
    assert config["unlock"]["mode"] == "quorum"
    sealed = (qca.home / "config" / "sealed-pin.json")
    assert sealed.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in qca.shares.iterdir()) == [
        f"share-{i}-of-5.txt" for i in range(1, 6)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in qca.shares.iterdir())


def test_quorum_ceremony(qca: QuorumCa, tmp_path: Path) -> None:
    body = qca.wait_health(503)
    assert body == {"status": "sealed", "progress": "0/3"}
    refused = qca.sign("sealed.test")
    assert refused.returncode == 1 and "sealed" in refused.stderr, refused.stderr

    # A corrupted share is refused by name, on its own.
    words = qca.share(1).read_text().splitlines()[-1].split()
    words[7] = "academic" if words[7] != "academic" else "acid"
    bad = tmp_path / "bad-share.txt"
    bad.write_text(" ".join(words) + "\n")
    out = qca.cli("unlock", "--share-file", bad, check=False)
    assert out.returncode == 1
    assert f"share starting '{words[0]} {words[1]}' refused: its checksum" in out.stderr

    # A share from another set is refused.
    other = tmp_path / "other"
    other_home = tmp_path / "other-home"
    from appliance.unlock.quorum import seal_pin, write_shares

    _, mnemonics = seal_pin("x" * 12, 3, 5)
    write_shares(other, mnemonics, 3)
    out = qca.cli("unlock", "--share-file", other / "share-1-of-5.txt", check=False)
    assert out.returncode == 1 and "belongs to another share set" in out.stderr
    del other_home

    # Two good shares: still sealed at 2/3.
    qca.cli("unlock", "--share-file", qca.share(2))
    qca.cli("unlock", "--share-file", qca.share(4))
    assert qca.health() == (503, {"status": "sealed", "progress": "2/3"})
    assert qca.cli("unlock", "--status").stdout.strip() == "sealed, progress 2/3"
    assert qca.sign("still-sealed.test").returncode == 1

    # The third unseals. Until the workers serve, the state is "unsealing": never "unsealed"
    # while /health still answers 503 (polled on the admin socket, faster than the CLI starts).
    out = qca.cli("unlock", "--share-file", qca.share(5))
    assert "quorum reached" in out.stdout
    admin = qca.home / "run" / "admin.sock"
    states = []
    deadline = time.monotonic() + 60
    while True:
        state = admin_request(admin, {"op": "status"})["state"]
        states.append(state)
        if state == "unsealed":
            assert qca.health()[0] == 200, "the status said unsealed before /health did"
            break
        assert state == "unsealing", states
        assert time.monotonic() < deadline, "the workers never started serving"
        time.sleep(0.02)
    assert states[0] == "unsealing", states  # logging in and starting workers takes a while
    assert qca.cli("unlock", "--status").stdout.strip() == "unsealed, progress 0/3"
    assert qca.wait_health(200) == {"status": "ok"}
    issued = qca.sign("unsealed.test")
    assert issued.returncode == 0, issued.stderr

    # seal: signing is refused again.
    assert qca.cli("seal").stdout.strip() == "sealed"
    assert qca.wait_health(503)["status"] == "sealed"
    assert qca.sign("resealed.test").returncode == 1

    # --reset discards partial progress.
    qca.cli("unlock", "--share-file", qca.share(1))
    assert qca.health()[1]["progress"] == "1/3"
    qca.cli("unlock", "--reset")
    assert qca.health()[1]["progress"] == "0/3"


def test_systemd_hears_sealed_unsealing_serving_and_sealing(qca: QuorumCa,
                                                             tmp_path: Path) -> None:
    qca.wait_health(503)  # up (and sealed) before the restart, when this test runs alone
    assert qca.stop() == 0
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        qca.start(notify_path)
        try:
            started = receive_until(sock, "READY=1", 60)
            assert "STATUS=sealed: 0/3 unseal shares" in started[-1].split("\n"), started
            qca.cli("unlock", "--share-file", qca.share(1), "--share-file", qca.share(2))
            qca.cli("unlock", "--share-file", qca.share(3))
            unsealed = receive_until(sock, "READY=1", 60)
            statuses = [line for m in unsealed for line in m.split("\n")
                        if line.startswith("STATUS=")]
            assert statuses[-2:] == [
                "STATUS=unsealing: logging into the token, starting the workers",
                f"STATUS=serving on 127.0.0.1:{qca.port} with 1 workers"], statuses
            qca.cli("seal")
            sealed = receive_until(sock, "READY=1", 60)
            assert [line for m in sealed for line in m.split("\n")
                    if line.startswith("STATUS=")] == [
                "STATUS=sealing: draining", "STATUS=sealed: 0/3 unseal shares"], sealed
        finally:
            assert qca.stop() == 0
    qca.start()  # without the notify socket, for the tests after this one
    qca.wait_health(503)


def test_rekey_shares(qca: QuorumCa, tmp_path: Path) -> None:
    new_dir = tmp_path / "new-shares"
    out = qca.cli("rekey-shares", "--quorum", "2/3", "--share-dir", new_dir,
                  "--share-file", qca.share(1), "--share-file", qca.share(2),
                  "--share-file", qca.share(3))
    assert "3 new shares" in out.stdout
    # The old set no longer works...
    refused = qca.cli("unlock", "--share-file", qca.share(1), check=False)
    assert refused.returncode == 1 and "another share set" in refused.stderr, refused.stderr
    # ...the new one does.
    qca.cli("unlock", "--share-file", new_dir / "share-1-of-3.txt")
    qca.cli("unlock", "--share-file", new_dir / "share-3-of-3.txt")
    assert qca.wait_health(200) == {"status": "ok"}
    assert qca.sign("rotated.test").returncode == 0
    assert os.stat(new_dir).st_mode & 0o777 == 0o700
