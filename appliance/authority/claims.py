"""Claims: certificate duration bounds and renewal switches, authority-wide and per provisioner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from appliance.config import ClaimsConfig
from appliance.durations import Duration, format_duration
from appliance.errors import ConfigError, Forbidden


@dataclass(frozen=True)
class Claims:
    min_duration: timedelta = timedelta(minutes=5)
    max_duration: timedelta = timedelta(hours=24)
    default_duration: timedelta = timedelta(hours=24)
    disable_renewal: bool = False
    allow_renewal_after_expiry: bool = False

    def merged(self, override: ClaimsConfig | None) -> Claims:
        """These claims with `override`'s set fields winning; checks the result is coherent."""
        if override is None:
            return self
        merged = Claims(
            min_duration=_dur(override.min_tls_cert_duration, self.min_duration),
            max_duration=_dur(override.max_tls_cert_duration, self.max_duration),
            default_duration=_dur(override.default_tls_cert_duration, self.default_duration),
            disable_renewal=_flag(override.disable_renewal, self.disable_renewal),
            allow_renewal_after_expiry=_flag(override.allow_renewal_after_expiry,
                                             self.allow_renewal_after_expiry),
        )
        if not merged.min_duration <= merged.default_duration <= merged.max_duration:
            raise ConfigError(
                "claims must satisfy minTLSCertDuration <= defaultTLSCertDuration <= "
                f"maxTLSCertDuration (got {format_duration(merged.min_duration)}, "
                f"{format_duration(merged.default_duration)}, "
                f"{format_duration(merged.max_duration)})")
        return merged

    def check_duration(self, requested: timedelta) -> None:
        """Refuse a certificate lifetime outside [min, max]."""
        if requested < self.min_duration:
            raise Forbidden(
                f"requested duration of {format_duration(requested)} is less than the authorized "
                f"minimum certificate duration of {format_duration(self.min_duration)}")
        if requested > self.max_duration:
            raise Forbidden(
                f"requested duration of {format_duration(requested)} is more than the authorized "
                f"maximum certificate duration of {format_duration(self.max_duration)}")


def _dur(value: Duration | None, default: timedelta) -> timedelta:
    return value.value if value is not None else default


def _flag(value: bool | None, default: bool) -> bool:
    return value if value is not None else default
