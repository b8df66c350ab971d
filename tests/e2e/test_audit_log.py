"""The audit log of a real server: every act recorded, verify passes, tampering is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from e2e_support import CaServer, Tokens

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
