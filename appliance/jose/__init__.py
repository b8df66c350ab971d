"""The one JOSE layer: base64url, compact and flattened JWS over strict JSON, JWK, the key JWE.

Every path that reads or writes JOSE (one-time tokens, the x5c renew token, ACME requests, the
encrypted provisioner key) goes through this package; it imports nothing from appliance but
errors.py and strict_json.py (tests/unit/test_jose_imports.py checks it).
"""
