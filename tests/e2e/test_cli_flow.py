"""The operator's and the user's path through `applianctl`, against a real server and token.

init -> serve -> bootstrap -> certificate (EC, RSA, OKP) / sign / token, each certificate
verified by openssl against the root, and the CA keys shown to be unextractable from the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import signal
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e_support import (
    PROVISIONER,
    SOFTHSM_MODULE,
    WORKERS,
    CaServer,
    clean_env,
    sha256_hex,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(ca: CaServer) -> CaServer:
    """The client home bootstrapped against the CA by its fingerprint."""
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint)
    return ca


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's failure contract: exit 1, nothing but `error: ...` on one line of stderr."""
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}: {result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (
        f"expected one 'error: ...' line on stderr, got:\n{result.stderr}")
    return lines[0]


def public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def cn_of(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def check_leaf(leaf: x509.Certificate, cn: str, dns: list[str], ips: list[str] = (),
               emails: list[str] = (), rsa_key: bool = False) -> None:
    """CN, SANs, key usages and basic constraints of a leaf the CA issued."""
    assert cn_of(leaf) == cn
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns)
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == sorted(
        str(ipaddress.ip_address(i)) for i in ips)
    assert sorted(san.get_values_for_type(x509.RFC822Name)) == sorted(emails)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku_ext.critical
    ku = ku_ext.value
    assert ku.digital_signature
    assert ku.key_encipherment is rsa_key, "key encipherment is for RSA keys only"
    assert not (ku.key_cert_sign or ku.crl_sign or ku.content_commitment or ku.key_agreement)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    # Default 24 h, plus the 1 minute backdate of notBefore.
    assert 24 * 3600 <= lifetime.total_seconds() <= 24 * 3600 + 60


def check_key_file(path: Path, leaf: x509.Certificate) -> object:
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"{path} has mode {mode:o}, expected 600"
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert public_der(key.public_key()) == public_der(leaf.public_key()), (
        "the key file does not match the certificate")
    return key


# -- init and bootstrap ---------------------------------------------------------------------------
def test_init_prints_root_fingerprint_last(ca: CaServer) -> None:
    assert len(ca.fingerprint) == 64 and int(ca.fingerprint, 16) >= 0
    assert sha256_hex(ca.root) == ca.fingerprint
    for path in (ca.config_path, ca.ca_home / "config" / "defaults.json", ca.root_path,
                 ca.intermediate_path, ca.softhsm_conf):
        assert path.is_file(), f"init did not create {path}"
    assert ca.db_path.is_file(), "the database does not exist (after init and serve)"
    defaults = json.loads((ca.ca_home / "config" / "defaults.json").read_text())
    assert defaults["fingerprint"] == ca.fingerprint
    assert defaults["ca-url"] == ca.url


def test_no_private_ca_key_is_a_file(ca: CaServer) -> None:
    for path in ca.ca_home.rglob("*"):
        if path.is_file() and path.suffix in (".crt", ".json", ".conf", ".pem", ".key"):
            assert b"PRIVATE KEY" not in path.read_bytes(), f"{path} holds a private key"


def test_init_twice_without_force_is_refused_and_changes_nothing(ca: CaServer) -> None:
    before = {p: p.read_bytes() for p in (ca.config_path, ca.root_path, ca.intermediate_path)}
    line = one_error_line(ca.init(check=False))
    assert "already exists" in line and "--force" in line, line
    for path, data in before.items():
        assert path.read_bytes() == data, f"a refused init modified {path}"
    assert ca.run_cli("health", "--ca-url", ca.url, "--root", ca.root_path).stdout.strip() == "ok"


def test_init_force_replaces_a_ca(ca: CaServer, tmp_path: Path) -> None:
    """On a second, unserved home: refused without --force, a new root with it (RSA this time)."""
    home = tmp_path / "other-ca"
    first = ca.init("--kty", "RSA", home=home).stdout.strip().splitlines()[-1]
    root = x509.load_pem_x509_certificate((home / "certs" / "root_ca.crt").read_bytes())
    assert isinstance(root.public_key(), rsa.RSAPublicKey)
    assert sha256_hex(root) == first
    one_error_line(ca.init(home=home, check=False))
    second = ca.init("--force", home=home).stdout.strip().splitlines()[-1]
    assert second != first, "--force did not make a new root"
    root = x509.load_pem_x509_certificate((home / "certs" / "root_ca.crt").read_bytes())
    assert sha256_hex(root) == second
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_bootstrap_pins_the_root(client: CaServer) -> None:
    root_file = client.client_home / "certs" / "root_ca.crt"
    assert root_file.read_bytes().strip() == client.root_path.read_bytes().strip()
    defaults = json.loads((client.client_home / "config" / "defaults.json").read_text())
    assert defaults["ca-url"] == client.url
    assert defaults["fingerprint"] == client.fingerprint
    assert Path(defaults["root"]) == root_file
    assert client.run_cli("health").stdout.strip() == "ok"


def test_bootstrap_with_wrong_fingerprint_fails(ca: CaServer, tmp_path: Path) -> None:
    home = tmp_path / "client"
    wrong = format(int(ca.fingerprint, 16) ^ 1, "064x")
    line = one_error_line(ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", wrong,
                                     home=home, check=False))
    assert "fingerprint" in line or "not found" in line, line
    assert not (home / "config" / "defaults.json").exists(), "defaults written for a wrong root"
    assert not (home / "certs" / "root_ca.crt").exists(), "a root was saved for a wrong fingerprint"


def test_root_file_matches_fingerprint(client: CaServer) -> None:
    out = client.work / "downloaded_root.crt"
    client.run_cli("root", out)
    assert sha256_hex(x509.load_pem_x509_certificate(out.read_bytes())) == client.fingerprint
    line = one_error_line(client.run_cli("root", out, check=False))
    assert "--force" in line, line
    client.run_cli("root", out, "--force")


def test_provisioner_list_is_json(client: CaServer) -> None:
    listed = json.loads(client.run_cli("provisioner", "list").stdout)
    assert isinstance(listed, list) and len(listed) == 1
    (p,) = listed
    config = json.loads(client.config_path.read_text())["authority"]["provisioners"][0]
    assert p["type"] == "JWK" and p["name"] == PROVISIONER
    assert p["key"] == config["key"]
    assert "d" not in p["key"], "the provisioner list shows a private key"
    assert p.get("encryptedKey") == config["encryptedKey"]


# -- certificates ---------------------------------------------------------------------------------
def test_certificate_ec_with_dns_ip_and_email_sans(client: CaServer) -> None:
    crt, key = client.work / "ec.crt", client.work / "ec.key"
    client.run_cli("certificate", "svc.example", crt, key,
                   "--password-file", client.provisioner_password_file,
                   "--san", "svc.example", "--san", "www.svc.example", "--san", "127.0.0.1",
                   "--san", "2001:db8::1", "--san", "ops@svc.example")
    leaf, _ = client.openssl_verify(crt)
    check_leaf(leaf, "svc.example", ["svc.example", "www.svc.example"],
               ["127.0.0.1", "2001:db8::1"], ["ops@svc.example"])
    k = check_key_file(key, leaf)
    assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1"


def test_certificate_rsa(client: CaServer) -> None:
    crt, key = client.work / "rsa.crt", client.work / "rsa.key"
    client.run_cli("certificate", "rsa.example", crt, key, "--kty", "RSA",
                   "--password-file", client.provisioner_password_file)
    leaf, _ = client.openssl_verify(crt)
    check_leaf(leaf, "rsa.example", ["rsa.example"], rsa_key=True)
    k = check_key_file(key, leaf)
    assert isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048


def test_certificate_okp(client: CaServer) -> None:
    crt, key = client.work / "okp.crt", client.work / "okp.key"
    client.run_cli("certificate", "okp.example", crt, key, "--kty", "OKP",
                   "--password-file", client.provisioner_password_file,
                   "--san", "okp.example", "--san", "10.1.2.3")
    leaf, _ = client.openssl_verify(crt)
    check_leaf(leaf, "okp.example", ["okp.example"], ["10.1.2.3"])
    assert isinstance(check_key_file(key, leaf), ed25519.Ed25519PrivateKey)


def test_certificate_not_after(client: CaServer) -> None:
    crt, key = client.work / "short.crt", client.work / "short.key"
    client.run_cli("certificate", "short.example", crt, key, "--not-after", "2h",
                   "--password-file", client.provisioner_password_file)
    leaf, _ = client.openssl_verify(crt)
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert 2 * 3600 <= lifetime <= 2 * 3600 + 60, lifetime


def test_certificate_needs_force_to_overwrite(client: CaServer) -> None:
    crt, key = client.work / "force.crt", client.work / "force.key"
    args = ["certificate", "force.example", crt, key,
            "--password-file", client.provisioner_password_file]
    client.run_cli(*args)
    before = (crt.read_bytes(), key.read_bytes())
    line = one_error_line(client.run_cli(*args, check=False))
    assert "already exists" in line and "--force" in line, line
    assert (crt.read_bytes(), key.read_bytes()) == before, "a refused run changed the files"
    client.run_cli(*args, "--force")
    assert crt.read_bytes() != before[0] and key.read_bytes() != before[1]
    leaf, _ = client.openssl_verify(crt)
    check_key_file(key, leaf)


def test_sign_an_openssl_csr(client: CaServer) -> None:
    csr, key, crt = (client.work / f"openssl.{s}" for s in ("csr", "key", "crt"))
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
         "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=openssl.example",
         "-addext", "subjectAltName=DNS:openssl.example,IP:192.0.2.7"],
        check=True, capture_output=True, timeout=30)
    client.run_cli("sign", csr, crt, "--password-file", client.provisioner_password_file)
    leaf, _ = client.openssl_verify(crt)
    check_leaf(leaf, "openssl.example", ["openssl.example"], ["192.0.2.7"])
    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert public_der(leaf.public_key()) == public_der(request.public_key())


def test_token_then_certificate_with_token(client: CaServer) -> None:
    token = client.run_cli("token", "tok.example", "--san", "tok.example", "--san", "10.9.8.7",
                           "--password-file", client.provisioner_password_file).stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert claims["iss"] == PROVISIONER and claims["sub"] == "tok.example"
    assert claims["aud"] == client.sign_audience
    assert claims["sha"] == client.fingerprint
    assert claims["sans"] == ["tok.example", "10.9.8.7"]
    assert claims["exp"] - claims["nbf"] == 300 and len(claims["jti"]) >= 16

    crt, key = client.work / "tok.crt", client.work / "tok.key"
    client.run_cli("certificate", "tok.example", crt, key, "--token", token)
    leaf, _ = client.openssl_verify(crt)
    check_leaf(leaf, "tok.example", ["tok.example"], ["10.9.8.7"])
    check_key_file(key, leaf)

    again = client.run_cli("certificate", "tok.example", client.work / "tok2.crt",
                           client.work / "tok2.key", "--token", token, check=False)
    line = one_error_line(again)
    assert "already used" in line, line
    assert not (client.work / "tok2.key").exists(), "a key was written for a refused request"


def test_pidfile_names_the_server(ca: CaServer) -> None:
    assert ca.process is not None
    assert ca.pidfile.read_text().strip() == str(ca.process.pid)


async def test_connections_are_spread_evenly_over_the_workers(ca: CaServer) -> None:
    """The supervisor hands connections to the workers in turn (SO_REUSEPORT's hash does not:
    it put 14 of 32 keep-alive connections on one worker and 18 on the other)."""
    await assert_four_connections_per_worker(ca)


async def assert_four_connections_per_worker(ca: CaServer) -> None:
    connections = 4 * WORKERS
    since = ca.log_size()
    lines = await health_on_new_connections(ca, connections)
    assert all(line.startswith(b"HTTP/1.1 200 ") for line in lines), lines
    deadline = time.monotonic() + 10
    while True:
        served = [e["worker"] for e in ca.events(since)
                  if e.get("event") == "request" and e.get("path") == "/health"]
        if len(served) >= connections or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert sorted(Counter(served).items()) == [(w, 4) for w in range(WORKERS)], served


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def worker_pids(ca: CaServer) -> list[int]:
    """The supervisor's workers, by their process titles (`applianctl: worker N`)."""
    assert ca.process is not None
    assert process_title(ca.process.pid) == "applianctl: supervisor"
    children = Path(f"/proc/{ca.process.pid}/task/{ca.process.pid}/children").read_text().split()
    return [int(pid) for pid in children
            if process_title(int(pid)).startswith("applianctl: worker ")]


async def health_on_new_connections(ca: CaServer, count: int) -> list[bytes]:
    """Status lines of GET /health, each on its own connection, all open at once."""
    streams = []
    try:
        for _ in range(count):
            streams.append(await asyncio.open_connection(
                "127.0.0.1", ca.port, ssl=ca.ssl_context(), server_hostname="localhost"))
        lines = []
        for reader, writer in streams:
            writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            lines.append(await reader.readline())
        return lines
    finally:
        for _, writer in streams:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def test_a_killed_worker_is_replaced_without_losing_a_connection(ca: CaServer) -> None:
    before = worker_pids(ca)
    assert len(before) == WORKERS
    assert sorted(process_title(pid) for pid in before) == [
        f"applianctl: worker {i}" for i in range(WORKERS)], "each worker names its index"
    killed_title = process_title(before[0])
    cpus_before = thread_cpus(before[0])
    since = ca.log_size()
    os.kill(before[0], signal.SIGKILL)
    ca.wait_for_event("worker_died", since)
    # Connections that arrive while the worker is being replaced go to the one still serving
    # (those already handed to the killed worker died with it, as with any listener).
    lines = await health_on_new_connections(ca, 4 * WORKERS)
    assert all(line.startswith(b"HTTP/1.1 200 ") for line in lines), lines
    assert not any(e.get("event") == "worker_ready" for e in ca.events(since)), (
        "the replacement was ready before the connections were made: the test proves nothing")
    ready = ca.wait_for_event("worker_ready", since)
    after = worker_pids(ca)
    assert len(after) == WORKERS and before[0] not in after and ready["pid"] in after, (
        before, after, ready)
    # The replacement takes the place of the worker it replaces, on the same CPU.
    assert thread_cpus(ready["pid"]) == cpus_before, (cpus_before, ready)
    assert process_title(ready["pid"]) == killed_title
    # Once it is ready, the replacement takes its turn again.
    await assert_four_connections_per_worker(ca)


def thread_cpus(pid: int) -> set[str]:
    """The CPU lists every thread of a process may run on (one entry when they all agree)."""
    return {(task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
            for task in Path(f"/proc/{pid}/task").iterdir()}


def test_each_worker_and_all_its_threads_run_on_a_cpu_of_their_own(ca: CaServer) -> None:
    assert ca.process is not None
    allowed = sorted(os.sched_getaffinity(ca.process.pid))
    supervisor = thread_cpus(ca.process.pid)
    pids = worker_pids(ca)
    assert len(pids) == WORKERS
    workers = [thread_cpus(pid) for pid in pids]
    # Several threads per worker (event loop, PKCS#11, database, audit): all on one CPU.
    assert all(len(list(Path(f"/proc/{pid}/task").iterdir())) >= 3 for pid in pids)
    if len(allowed) >= WORKERS:
        assert all(len(cpus) == 1 for cpus in workers), workers
        assert sorted(next(iter(c)) for c in workers) == [str(c) for c in allowed[:WORKERS]]
    else:  # one CPU: nothing to spread over, nothing pinned
        assert all(cpus == supervisor for cpus in workers), (workers, supervisor)

    # pinWorkers false (read at start): the workers may run anywhere the supervisor may.
    original = ca.config_path.read_text()
    ca.stop()
    ca.config_path.write_text(json.dumps(json.loads(original) | {"pinWorkers": False}))
    try:
        ca.start()
        assert all(thread_cpus(pid) == supervisor for pid in worker_pids(ca))
    finally:
        ca.stop()
        ca.config_path.write_text(original)
        ca.start()


def test_by_default_one_worker_per_cpu_the_server_may_use(ca: CaServer) -> None:
    """A cpuset (here: taskset) that allows one CPU gets one worker, however many there are."""
    cpu = str(min(os.sched_getaffinity(0)))  # one this machine (or container) allows
    ca.stop()
    try:
        since = ca.log_size()
        ca.start(prefix=("taskset", "-c", cpu), workers=None)
        serving = [e for e in ca.events(since) if e.get("event") == "serving"]
        assert serving and serving[-1]["workers"] == 1, serving
        (pid,) = worker_pids(ca)
        assert thread_cpus(pid) == {cpu}
    finally:
        ca.stop()
        ca.start()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_descriptors_the_supervisor_waits_instead_of_spinning(ca: CaServer) -> None:
    """accept() failing with EMFILE leaves the socket readable: retrying at once would spin."""
    assert ca.process is not None
    pid = ca.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    since = ca.log_size()
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)  # the number accept() would get
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
    try:
        waiting = asyncio.create_task(health_on_new_connections(ca, 1))
        await asyncio.to_thread(ca.wait_for_event, "accept_failed", since)
        before = cpu_seconds(pid)
        await asyncio.sleep(2)
        spent = cpu_seconds(pid) - before
        assert spent < 0.5, f"the supervisor used {spent:.2f} s of CPU in 2 s while out of fds"
        assert not waiting.done(), "a connection was served although accept() kept failing"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    # Descriptors again: the queued connection is served, nothing was dropped.
    lines = await asyncio.wait_for(waiting, 15)
    assert lines[0].startswith(b"HTTP/1.1 200 "), lines


# -- the CA keys stay in the token ----------------------------------------------------------------
@pytest.mark.parametrize("token_label", ["appliance-root", "appliance-issuer"])
def test_ca_keys_are_sensitive_and_not_extractable(ca: CaServer, token_label: str) -> None:
    pin = ca.root_pin if token_label == "appliance-root" else ca.issuer_pin
    env = clean_env(None) | {"SOFTHSM2_CONF": str(ca.softhsm_conf), "E2E_TOKEN_PIN": pin}

    # pkcs11-tool takes the PIN from the environment ("env:VAR"), so it is never in argv.
    listing = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", token_label, "--login",
         "--pin", "env:E2E_TOKEN_PIN", "-O"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Private Key Object")]
    assert len(starts) == 1, f"expected one private key in {token_label}:\n{listing.stdout}"
    access = next(line for line in lines[starts[0]:] if line.strip().startswith("Access:"))
    flags = {f.strip() for f in access.split(":", 1)[1].split(",")}
    assert {"sensitive", "always sensitive", "never extractable"} <= flags, access
    assert "extractable" not in flags, access

    # And directly: the attributes, and an attempt to read the private value.
    script = textwrap.dedent("""
        import json, os, sys
        import pkcs11
        from pkcs11 import Attribute, ObjectClass
        lib = pkcs11.lib(sys.argv[1])
        token = lib.get_token(token_label=sys.argv[2])
        out = []
        with token.open(user_pin=os.environ["E2E_TOKEN_PIN"]) as session:
            for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                item = {"label": key[Attribute.LABEL],
                        "sensitive": bool(key[Attribute.SENSITIVE]),
                        "extractable": bool(key[Attribute.EXTRACTABLE])}
                try:
                    key[Attribute.VALUE]
                    item["value_read"] = "read"
                except Exception as e:
                    item["value_read"] = type(e).__name__
                try:
                    key[Attribute.PRIVATE_EXPONENT]
                    item["exponent_read"] = "read"
                except Exception as e:
                    item["exponent_read"] = type(e).__name__
                out.append(item)
        print(json.dumps(out))
    """)
    probe = subprocess.run([sys.executable, "-c", script,
                            SOFTHSM_MODULE, token_label],
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0, probe.stderr
    (key,) = json.loads(probe.stdout)
    assert key["sensitive"] is True and key["extractable"] is False, key
    assert key["value_read"] == "AttributeSensitive", (
        f"reading CKA_VALUE of {key['label']} should be refused as sensitive: {key}")
    assert key["exponent_read"] in ("AttributeSensitive", "AttributeTypeInvalid"), key


def test_kms_check_shows_from_the_token_that_both_keys_stay_in_it(ca: CaServer) -> None:
    out = ca.run_cli("kms", "check", "--issuer-password-file", ca.issuer_pin_file,
                     "--root-password-file", ca.root_pin_file, home=ca.ca_home)
    text = out.stdout
    assert text.count("=> in the token, and it cannot leave it") == 2, text
    for line in ("CKA_SENSITIVE          true", "CKA_EXTRACTABLE        false",
                 "CKA_NEVER_EXTRACTABLE  true", "CKA_LOCAL              true",
                 "CKA_MODIFIABLE         false",
                 "read CKA_VALUE         refused  CKR_ATTRIBUTE_SENSITIVE",
                 "test signature         verifies"):
        assert text.count(line) == 2, (line, text)
    assert ca.issuer_pin not in text + out.stderr and ca.root_pin not in text + out.stderr
    doc = json.loads(ca.run_cli("kms", "check", "--json", "--issuer-password-file",
                                ca.issuer_pin_file, home=ca.ca_home).stdout)
    assert doc["ok"] is True and [k["role"] for k in doc["keys"]] == ["issuer"], doc
    checks = {c["name"]: c["value"] for c in doc["keys"][0]["checks"]}
    assert checks["certificate"] == "matches" and checks["CKA_ALWAYS_SENSITIVE"] == "true"
    root_only = json.loads(ca.run_cli("kms", "check", "--json", "--root-password-file",
                                      ca.root_pin_file, home=ca.ca_home).stdout)
    assert [k["role"] for k in root_only["keys"]] == ["root"], root_only
    records = [json.loads(line) for line in
               (ca.ca_home / "audit" / "audit.jsonl").read_text().splitlines()]
    checked = [r for r in records if r["event"] == "kms.check"]
    assert checked and checked[-1]["outcome"] == "success", checked


def test_kms_check_fails_on_a_certificate_that_is_not_the_keys(ca: CaServer,
                                                                tmp_path: Path) -> None:
    config = json.loads(ca.config_path.read_text())
    config["crt"] = str(ca.root_path)  # the issuer key against the root's certificate
    wrong = ca.config_path.with_name("ca-wrong-crt.json")
    wrong.write_text(json.dumps(config))
    try:
        out = ca.run_cli("kms", "check", wrong, "--issuer-password-file", ca.issuer_pin_file,
                         home=ca.ca_home, check=False)
    finally:
        wrong.unlink()
    assert out.returncode == 1, out.stdout
    assert f"error: issuer key: its public key is not the one in {ca.root_path}" in out.stderr
    assert "certificate            DIFFERS" in out.stdout
    assert "error: issuer key: a signature made in the token does not verify with" in out.stderr

    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("not-the-pin-1234\n")
    bad_pin.chmod(0o600)  # like serve, kms check refuses a PIN file others can read
    out = ca.run_cli("kms", "check", "--issuer-password-file", bad_pin, home=ca.ca_home,
                     check=False)
    assert out.returncode == 1 and out.stdout == "", out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not-the-pin-1234" not in out.stderr and "PIN" in out.stderr, out.stderr


def test_failed_certificate_write_leaves_no_stray_key(client: CaServer) -> None:
    """A CRT path that cannot be written: one error line naming it, and no orphaned key file."""
    crt = client.work / "no-such-dir" / "stray.crt"
    key = client.work / "stray.key"
    result = client.run_cli("certificate", "stray.example", crt, key,
                            "--password-file", client.provisioner_password_file, check=False)
    line = one_error_line(result)
    problems = []
    if key.exists():
        problems.append(f"the command failed but left the private key {key} without its "
                        "certificate (the certificate was issued and lost)")
    if str(crt) not in line:
        problems.append(f"the error should name {crt}, not a temporary file: {line}")
    assert not problems, "\n".join(problems)


# -- serve refuses to start when it cannot be what it claims --------------------------------------
def test_serve_with_wrong_issuer_pin_refuses_to_start(ca: CaServer) -> None:
    wrong = "wrong-" + ca.issuer_pin[::-1]
    pin_file = ca.base / "wrong-issuer.pin"
    if not pin_file.exists():
        pin_file.write_text(wrong + "\n")
        pin_file.chmod(0o600)
    code, stderr = ca.serve_once(pin_file)
    assert code == 1, f"serve with a wrong PIN exited {code}:\n{stderr}"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "PIN" in last, last
    assert wrong not in stderr and ca.issuer_pin not in stderr, "a PIN reached the log"
    assert "Traceback" not in stderr, stderr


def test_second_server_on_the_same_port_is_refused(ca: CaServer) -> None:
    code, stderr = ca.serve_once(ca.issuer_pin_file)
    assert code == 1, f"a second serve on port {ca.port} exited {code}:\n{stderr}"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(ca.port) in last, last
    assert ca.run_cli("health", "--ca-url", ca.url, "--root", ca.root_path).stdout.strip() == "ok"
