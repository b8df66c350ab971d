from datetime import timedelta

import pytest

from appliance.authority.claims import Claims
from appliance.config import ClaimsConfig
from appliance.durations import format_duration, parse_duration
from appliance.errors import ConfigError, Forbidden


@pytest.mark.parametrize(("text", "seconds"), [
    ("5m", 300), ("24h", 86400), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("+2h", 7200),
    ("-1m", -60), ("0", 0), ("500ms", 0.5),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "5", "h", "5 m", "1d", "5m3", "abc", "--5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(hours=24)) == "24h"
    assert format_duration(timedelta(hours=1, minutes=30, seconds=5)) == "1h30m5s"
    assert format_duration(timedelta(0)) == "0s"


def test_claims_defaults_and_override() -> None:
    base = Claims()
    assert (base.min_duration, base.max_duration, base.default_duration) == (
        timedelta(minutes=5), timedelta(hours=24), timedelta(hours=24))
    merged = base.merged(ClaimsConfig(max_tls_cert_duration="1h", default_tls_cert_duration="30m"))
    assert merged.max_duration == timedelta(hours=1)
    assert merged.default_duration == timedelta(minutes=30)
    assert merged.min_duration == timedelta(minutes=5)


def test_claims_incoherent_refused() -> None:
    with pytest.raises(ConfigError, match="minTLSCertDuration <= defaultTLSCertDuration"):
        Claims().merged(ClaimsConfig(max_tls_cert_duration="1h"))  # default 24h > max 1h


def test_claims_check_duration_messages() -> None:
    claims = Claims()
    claims.check_duration(timedelta(hours=1))
    with pytest.raises(Forbidden, match="more than the authorized maximum .* 24h"):
        claims.check_duration(timedelta(hours=48))
    with pytest.raises(Forbidden, match="less than the authorized minimum .* 5m"):
        claims.check_duration(timedelta(minutes=1))
