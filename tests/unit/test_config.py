import json
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config, parse_config, write_json_atomic
from appliance.errors import ConfigError

KEY = {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "k1", "alg": "ES256"}


def minimal(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "root": "certs/root_ca.crt", "crt": "certs/intermediate_ca.crt",
        "key": "pkcs11:token=i;object=intermediate-ca",
        "kms": {"type": "pkcs11", "uri": "pkcs11:token=i?module-path=/m.so"},
        "address": "127.0.0.1:9000", "dnsNames": ["localhost"],
        "db": {"type": "sqlite", "dataSource": "db/a.db"},
        "authority": {"provisioners": [{"type": "JWK", "name": "admin", "key": KEY}]},
    }
    doc.update(over)
    return doc


def test_minimal_config_loads_with_step_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.tls.min_version == 1.2
    assert "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" in cfg.tls.cipher_suites
    assert cfg.host_port() == ("127.0.0.1", 9000)
    assert cfg.to_json()["dnsNames"] == ["localhost"]


@pytest.mark.parametrize(("override", "fragment"), [
    ({"address": "nope"}, "address"),
    ({"dnsNames": []}, "dnsNames"),
    ({"key": "/etc/key.pem"}, "pkcs11: URI"),
    ({"kms": {"type": "pkcs11", "uri": "pkcs11:token=i?pin-value=1234"}}, "PIN does not belong"),
    ({"tls": {"minVersion": 1.0}}, "TLS versions"),
    ({"tls": {"cipherSuites": ["TLS_RSA_WITH_RC4_128_SHA"]}}, "unsupported cipher suites"),
    ({"authority": {"provisioners": [{"type": "OIDC", "name": "x"}]}}, "unsupported type"),
    ({"authority": {"provisioners": [{"type": "JWK", "name": "a", "key": {**KEY, "d": "s"}}]}},
     "public JWK"),
    ({"authority": {"provisioners": [{"type": "JWK", "name": "a", "key": KEY},
                                     {"type": "JWK", "name": "a", "key": {**KEY, "kid": "2"}}]}},
     "unique"),
    ({"authority": {"claims": {"maxTLSCertDuration": "forever"}}}, "invalid duration"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_config_names_the_field(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config(minimal(**override))


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "ca.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_write_json_atomic_mode_and_content(tmp_path: Path) -> None:
    path = tmp_path / "config" / "ca.json"
    write_json_atomic(path, minimal())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["address"] == "127.0.0.1:9000"
    assert [p.name for p in path.parent.iterdir()] == ["ca.json"]  # no temp file left behind


def test_durations_are_parsed_once_and_keep_their_spelling() -> None:
    from datetime import timedelta

    cfg = parse_config(minimal(requestTimeout="1m30s",
                               authority={"provisioners": [], "backdate": "90s"}))
    assert cfg.request_timeout.value == timedelta(seconds=90)
    assert cfg.authority.backdate.value == timedelta(seconds=90)
    assert cfg.crl.cache_duration.value == timedelta(hours=24)  # a default is typed too
    written = cfg.model_dump(by_alias=True, exclude_none=True)
    assert (written["requestTimeout"], written["authority"]["backdate"]) == ("1m30s", "90s")
    with pytest.raises(ConfigError, match="must not be negative"):
        parse_config(minimal(authority={"provisioners": [], "backdate": "-1m"}))
    with pytest.raises(ConfigError, match="must be positive"):
        parse_config(minimal(requestTimeout="0s"))
