"""The log redaction processor: secret-looking keys and JWT-shaped values never reach a line."""

from pathlib import Path

from appliance.audit import AuditEvent, AuditLog, tail
from appliance.logs import redact_secrets


def test_secret_keys_and_jwts_redacted_every_time() -> None:
    for _ in range(3):  # the key classification is remembered: the answer must not change
        event = {"event": "request", "pin": "1234", "issuer_password": "x", "ott": "y",
                 "path": "/1.0/sign", "note": "got eyJhbGciOi.eyJzdWIi.c2ln here",
                 "status": 201}
        out = redact_secrets(None, "info", event)
        assert out["pin"] == out["issuer_password"] == out["ott"] == "[redacted]"
        assert out["note"] == "got [redacted-jwt] here"
        assert (out["event"], out["path"], out["status"]) == ("request", "/1.0/sign", 201)


# Keys the two old rules disagreed on (logs matched substrings, the audit log words): each is now
# a secret in a log line and in an audit record alike, and the look-alikes are secret in neither.
SECRET_IN_BOTH = ("pin", "issuer_pin", "issuerPin", "pinFile", "password", "token", "ott",
                  "secret", "private_key", "hmac_key", "jwt", "mnemonic", "key", "key_pem",
                  "passwd", "cookie", "share")
SECRET_IN_NEITHER = ("shipping", "spinner", "bottom", "key_id", "public_key_sha256", "serial",
                     "shared_with", "opinion")


async def test_a_name_is_secret_in_a_log_line_exactly_when_it_is_in_an_audit_record(
        tmp_path: Path) -> None:
    values = {name: f"VALUE-{i}" for i, name in enumerate(SECRET_IN_BOTH + SECRET_IN_NEITHER)}
    line = redact_secrets(None, "info", {"event": "request", **values})
    log = AuditLog(tmp_path / "audit.jsonl")
    await log.append(AuditEvent("token.login", "success", "test", values))
    await log.close()
    details = tail(tmp_path / "audit.jsonl", 1)[0]["details"]
    for name in SECRET_IN_BOTH:
        assert line[name] == "[redacted]", f"{name} reached a log line"
        assert name not in details, f"{name} reached an audit record"
    for name in SECRET_IN_NEITHER:
        assert line[name] == values[name], f"{name} was redacted from a log line"
        assert details[name] == values[name], f"{name} was left out of an audit record"


def test_private_keys_and_nested_secrets_are_redacted_from_log_lines() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----\n"
    out = redact_secrets(None, "error", {"event": "x", "csr_key": pem,
                                         "provisioner": {"name": "admin", "password": "p"},
                                         "custodians": [{"index": 1, "mnemonic": "m"}]})
    assert out["csr_key"] == "[redacted]"
    assert out["provisioner"] == {"name": "admin", "password": "[redacted]"}
    assert out["custodians"] == [{"index": 1, "mnemonic": "[redacted]"}]
