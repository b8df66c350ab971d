"""The audit log of a real server: every act recorded, verify passes, tampering is named."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_support import APPLIANCTL, CaServer, Tokens, clean_env

pytestmark = pytest.mark.e2e


def records(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_chain_through_a_real_run(ca: CaServer, tokens: Tokens, tmp_path: Path) -> None:
    audit = ca.ca_home / "audit" / "audit.jsonl"
    crt, key = ca.work / "audited.crt", ca.work / "audited.key"
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint, "--force")
    ca.run_cli("certificate", "audited.test", crt, key, "--password-file",
               ca.provisioner_password_file, "--force")
    ca.run_cli("renew", crt, key, "--force")
    serial = ca.run_cli("certificate", "revoked.test", ca.work / "r.crt", ca.work / "r.key",
                        "--password-file", ca.provisioner_password_file, "--force")
    from cryptography import x509

    revoked = x509.load_pem_x509_certificates((ca.work / "r.crt").read_bytes())[0]
    ca.run_cli("revoke", str(revoked.serial_number), "--password-file",
               ca.provisioner_password_file)
    refused = ca.run_cli("certificate", "x.test", ca.work / "x.crt", ca.work / "x.key",
                         "--password-file", ca.provisioner_password_file, "--not-after", "72h",
                         check=False)
    assert refused.returncode == 1
    del serial
    ca.stop()  # the supervisor signs a checkpoint over the chain head at stop
    try:
        events = [r["event"] for r in records(audit)]
        for wanted in ("ca.init", "server.start", "token.login", "cert.issue", "cert.renew",
                       "cert.revoke", "crl.generate", "request.refused", "token.logout",
                       "checkpoint", "server.stop"):
            assert wanted in events, f"no {wanted} record in {events}"
        refusal = next(r for r in records(audit) if r["event"] == "request.refused")
        assert "maximum" in refusal["details"]["reason"]
        text = audit.read_text()
        assert ca.issuer_pin not in text and ca.provisioner_password not in text

        ok = ca.run_cli("audit", "verify", home=ca.ca_home)
        assert ok.stdout.startswith("ok: "), ok.stdout

        lines = audit.read_bytes().splitlines(keepends=True)
        cases = {
            "edited": lambda ls: ls[:3] + [ls[3].replace(b'"success"', b'"failure"')] + ls[4:],
            "deleted": lambda ls: ls[:4] + ls[5:],
            "swapped": lambda ls: ls[:4] + [ls[5], ls[4]] + ls[6:],
        }
        for name, tamper in cases.items():
            copy = tmp_path / f"{name}.jsonl"
            copy.write_bytes(b"".join(tamper(list(lines))))
            bad = ca.run_cli("audit", "verify", copy, home=ca.ca_home, check=False)
            assert bad.returncode == 1, f"{name}: verify passed a tampered log"
            message = bad.stderr.strip().splitlines()[-1]
            assert message.startswith("error: audit log") and "record " in message, message
        # One byte anywhere in a record.
        raw = bytearray(audit.read_bytes())
        raw[len(lines[0]) + len(lines[1]) + 20] ^= 0x01
        copy = tmp_path / "byte.jsonl"
        copy.write_bytes(bytes(raw))
        assert ca.run_cli("audit", "verify", copy, home=ca.ca_home, check=False).returncode == 1
        tail = ca.run_cli("audit", "tail", "-n", "3", home=ca.ca_home).stdout.splitlines()
        # The stop checkpoint comes last, so its signature covers the final records too.
        assert len(tail) == 3 and [json.loads(t)["event"] for t in tail[1:]] == [
            "server.stop", "checkpoint"], tail
        shutil.copy(audit, tmp_path / "kept.jsonl")
    finally:
        ca.start()


def test_issuance_fails_closed_when_the_audit_log_cannot_be_written(ca: CaServer,
                                                                     tokens: Tokens) -> None:
    import subprocess

    audit = ca.ca_home / "audit" / "audit.jsonl"
    immutable = subprocess.run(["chattr", "+i", str(audit)], capture_output=True, text=True)
    assert immutable.returncode == 0, f"chattr +i failed: {immutable.stderr}"
    try:
        ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint, "--force")
        refused = ca.run_cli("certificate", "closed.test", ca.work / "c.crt", ca.work / "c.key",
                             "--password-file", ca.provisioner_password_file, "--force",
                             check=False)
        assert refused.returncode == 1
        assert "the audit log cannot be written" in refused.stderr, refused.stderr
        assert not (ca.work / "c.crt").exists()
        assert not [e for e in ca.events() if e.get("status") == 500], "a 500 was served"
    finally:
        subprocess.run(["chattr", "-i", str(audit)], check=True)
    ok = ca.run_cli("certificate", "open.test", ca.work / "o.crt", ca.work / "o.key",
                    "--password-file", ca.provisioner_password_file, "--force")
    assert ok.returncode == 0
    assert ca.run_cli("audit", "verify", home=ca.ca_home).returncode == 0


# -- a torn last record (a writer died mid-write) is cut off, kept and recorded -----------------
TORN = b'{"seq":999999,"time":"2026-12-08T10:11:12.000000Z","actor":"process:1","event":"cert.is'


def issue(ca: CaServer, name: str) -> None:
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint, "--force")
    ca.run_cli("certificate", name, ca.work / f"{name}.crt", ca.work / f"{name}.key",
               "--password-file", ca.provisioner_password_file, "--force")
    assert (ca.work / f"{name}.crt").exists()


def assert_repaired(ca: CaServer, audit: Path, since_line: int) -> None:
    """One audit.repair after `since_line` naming TORN, the bytes kept aside, verify reports it."""
    after = records(audit)[since_line:]
    (repair,) = [r for r in after if r["event"] == "audit.repair"]
    assert repair["details"]["torn_bytes"] == len(TORN), repair
    assert repair["details"]["torn_sha256"] == hashlib.sha256(TORN).hexdigest(), repair
    kept = audit.parent / repair["details"]["kept_in"]
    assert kept.read_bytes() == TORN and kept.stat().st_mode & 0o777 == 0o600
    ok = ca.run_cli("audit", "verify", home=ca.ca_home)
    assert ok.stdout.startswith("ok: "), ok.stdout
    assert (f"repaired: record {repair['seq']} (line {since_line + after.index(repair) + 1}) "
            f"cut off a torn record of {len(TORN)} bytes (sha256 "
            f"{hashlib.sha256(TORN).hexdigest()})") in ok.stdout, ok.stdout
    assert "(present, its bytes match)" in ok.stdout, ok.stdout


def test_a_running_ca_repairs_a_torn_record_and_issues(ca: CaServer, tokens: Tokens) -> None:
    audit = ca.ca_home / "audit" / "audit.jsonl"
    before = len(records(audit))
    with audit.open("ab") as f:
        f.write(TORN)  # what a worker killed in the middle of its write leaves
    issue(ca, "after-tear.test")
    assert_repaired(ca, audit, before)
    assert [r for r in records(audit)[before:] if r["event"] == "cert.issue"
            and "after-tear.test" in json.dumps(r["details"])], "the issuance was not recorded"


def test_a_stopped_ca_with_a_torn_record_starts_repaired(ca: CaServer, tokens: Tokens) -> None:
    audit = ca.ca_home / "audit" / "audit.jsonl"
    ca.stop()
    try:
        before = len(records(audit))
        with audit.open("ab") as f:
            f.write(TORN)
    finally:
        ca.start()
    assert_repaired(ca, audit, before)
    issue(ca, "after-restart.test")


HOLD_AND_DIE = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, sys.stdin.buffer.read())
print("holding", flush=True)
time.sleep(120)
"""


def test_a_writer_killed_mid_record_under_the_lock(ca: CaServer, tokens: Tokens) -> None:
    """A process that holds the audit lock, has written half a record and is killed -9.

    Killing a real worker inside its one write(2) cannot be timed; this process stands in for
    it at the one moment that matters: lock held, fragment on disk. While it lives, the CA's
    writers wait (a write in progress is not torn); once it is killed, one of them repairs.
    """
    audit = ca.ca_home / "audit" / "audit.jsonl"
    before = len(records(audit))
    ca.run_cli("bootstrap", "--ca-url", ca.url, "--fingerprint", ca.fingerprint, "--force")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, str(audit)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = None
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(TORN)
        holder.stdin.close()
        assert holder.stdout.readline() == b"holding\n"
        client = subprocess.Popen(
            [APPLIANCTL, "certificate", "held.test", str(ca.work / "held.crt"),
             str(ca.work / "held.key"), "--password-file", str(ca.provisioner_password_file),
             "--force"], env=clean_env(ca.client_home), cwd=ca.work,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert client.poll() is None, "a certificate was issued while another held the lock"
        assert audit.read_bytes().endswith(TORN), "a write still in progress was cut off"
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert client is not None
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert_repaired(ca, audit, before)


def test_a_mid_file_edit_refuses_to_start_and_says_why(ca: CaServer, tmp_path: Path) -> None:
    audit = ca.ca_home / "audit" / "audit.jsonl"
    ca.stop()
    original = audit.read_bytes()
    try:
        lines = original.splitlines(keepends=True)
        lines[2] = lines[2].replace(b'"success"', b'"failure"', 1)
        audit.write_bytes(b"".join(lines))
        code, stderr = ca.serve_once(ca.issuer_pin_file)
        assert code != 0
        assert ("the audit log cannot be written; the CA will not start without it: the audit "
                f"log {audit} is broken at record 4 (line 4): prev does not match the SHA-256 of "
                "line 3") in stderr, stderr
        assert audit.read_bytes() == b"".join(lines), "a refused start changed the log"
    finally:
        audit.write_bytes(original)
        ca.start()
