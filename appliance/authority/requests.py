"""Requests as they arrive at the authority: type-checked, not yet trusted, and the time
arithmetic every provisioner shares for what a requester asks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.authority.plan import RequestedValidity
from appliance.durations import parse_duration
from appliance.errors import BadRequest

# Certificate times are bounded long before datetime arithmetic could overflow.
MAX_TIME_OFFSET = timedelta(days=365 * 100)
# Go's zero time: smallstep's step sends it for "not given" (step-ca treats it as unset).
GO_ZERO_TIMES = frozenset({"0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00"})


@dataclass(frozen=True)
class SignRequest:
    """The body of POST /sign, type-checked but not yet trusted."""

    untrusted_csr: str
    untrusted_ott: str
    untrusted_not_before: str | None = None
    untrusted_not_after: str | None = None
    untrusted_template_data: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, body: Any) -> SignRequest:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        csr, ott = body.get("csr"), body.get("ott")
        if not isinstance(csr, str) or not csr:
            raise BadRequest("missing csr: a PEM certificate request is required")
        if not isinstance(ott, str) or not ott:
            raise BadRequest("missing ott: a one-time token is required")
        nb, na = body.get("notBefore"), body.get("notAfter")
        for field, v in (("notBefore", nb), ("notAfter", na)):
            if v is not None and not isinstance(v, str):
                raise BadRequest(f"{field} must be an RFC 3339 time or a duration string")
        template_data = body.get("templateData")
        if template_data is not None and not isinstance(template_data, dict):
            raise BadRequest("templateData must be a JSON object")
        return cls(csr, ott, nb or None, na or None, template_data)


def parse_time_or_duration(untrusted: str, field: str, now: datetime) -> datetime:
    """step's TimeDuration: an RFC 3339 time, or a duration from now such as "1h" or "+90m"."""
    value = untrusted.strip()
    try:
        delta = parse_duration(value)
    except ValueError:
        delta = None
    if delta is not None:
        if abs(delta) > MAX_TIME_OFFSET:
            raise BadRequest(f"{field} {untrusted[:40]!r} is too far from now")
        return now + delta
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field} {untrusted!r} is neither an RFC 3339 time nor a duration"
                         ) from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{field} must carry a time zone (e.g. Z)")
    parsed = parsed.astimezone(UTC)
    if abs(parsed - now) > MAX_TIME_OFFSET:
        raise BadRequest(f"{field} {untrusted[:40]!r} is too far from now")
    return parsed


def _given(untrusted: str | None) -> str | None:
    """The requester's time text, or None when absent, empty or Go's zero time."""
    if untrusted is None or not untrusted.strip() or untrusted.strip() in GO_ZERO_TIMES:
        return None
    return untrusted


def requested_validity(untrusted_not_before: str | None, untrusted_not_after: str | None,
                       now: datetime) -> RequestedValidity:
    """Parse what a requester asked for; a relative notAfter counts from notBefore."""
    nb_text, na_text = _given(untrusted_not_before), _given(untrusted_not_after)
    not_before = parse_time_or_duration(nb_text, "notBefore", now) if nb_text else None
    not_after = (parse_time_or_duration(na_text, "notAfter", not_before or now)
                 if na_text else None)
    return RequestedValidity(not_before, not_after)
