"""The log redaction processor: secret-looking keys and JWT-shaped values never reach a line."""

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
